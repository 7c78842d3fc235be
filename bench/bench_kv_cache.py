"""Sampling speed of the GPT with and without the KV cache: time to generate N tokens, and the ratio.

Without the cache every new token re-runs the whole context (up to block_size tokens) through the
network; with it, one token per step goes through, attending to the cached keys and values.
Uses the trained models/<key>/model.pt when present, else a freshly initialised network of the
same shape (speed does not depend on the weights). Alternating repeats, medians.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_kv_cache.py [--model pydoc-gpt] [--tokens 256] [--repeats 5]
    OMP_WAIT_POLICY=PASSIVE python bench/bench_kv_cache.py --block-size 128 --n-embd 192   # a longer context
    OMP_WAIT_POLICY=PASSIVE python bench/bench_kv_cache.py --onnx   # onnxruntime too (exports the model first)

--onnx also exports the network (components/export.py, into a temporary folder) and times
CausalLMEngine.generate on onnxruntime the same way: with the cache against re-running the
exported graph on the whole context (empty past) for every token. Same thread count for both
engines; onnxruntime with components/inference.py's session options (no spinning).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pydoc-gpt")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    ap.add_argument("--block-size", type=int, default=0,
                    help="untrained network with this context instead (the cache pays more as it grows)")
    ap.add_argument("--n-embd", type=int, default=0, help="with --block-size: this width instead")
    ap.add_argument("--onnx", action="store_true", help="also onnxruntime: export, then the same comparison")
    args = ap.parse_args()

    from components.config import load_params
    from components.models.gpt import GPT

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    ckpt = Path(args.root) / "models" / args.model / "model.pt"
    if ckpt.exists() and not args.block_size:
        from components.families.transformer import load_model

        model, config = load_model(args.model, Path(args.root))
        source = str(ckpt)
    else:
        import dataclasses

        torch.manual_seed(0)
        shape = load_params(args.params).model(args.model).gpt
        shape = dataclasses.replace(shape, block_size=args.block_size or shape.block_size,
                                    n_embd=args.n_embd or shape.n_embd)
        model = GPT(shape, 100).eval()
        config = {"backbone": "gpt", "family": "transformer", "kind": "text", "vocab": None}
        source = "random weights" + ("" if args.block_size else " (no trained model found)")
    c = model.config
    print(f"model: {args.model} ({source}); n_layer={c.n_layer} n_embd={c.n_embd} block_size={c.block_size}; "
          f"{args.tokens} new tokens, batch {args.batch}, threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them: timings are noisy)")

    prompt = torch.zeros(args.batch, 1, dtype=torch.long)

    def run(use_cache: bool) -> float:
        gen = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        model.generate(prompt, args.tokens, use_cache=use_cache, generator=gen)
        return time.perf_counter() - t

    compare("PyTorch", run, args.tokens, args.repeats)
    if args.onnx:
        with tempfile.TemporaryDirectory(prefix="genflow-bench-") as tmp:
            engine = export_engine(model, config, args.model, args.params, Path(tmp), torch.get_num_threads())

            def run_onnx(use_cache: bool) -> float:
                t = time.perf_counter()
                engine.generate(prompt.numpy(), args.tokens, seed=0, use_cache=use_cache)
                return time.perf_counter() - t

            compare("onnxruntime", run_onnx, args.tokens, args.repeats)


def compare(engine: str, run: Callable[[bool], float], tokens: int, repeats: int) -> float:
    """Alternating repeats of run(use_cache=True) and run(False); prints and returns the median ratio."""
    run(True), run(False)  # warm-up
    cached, nocache = [], []
    for r in range(repeats):
        cached.append(run(True))
        nocache.append(run(False))
        print(f"{engine} repeat {r + 1}: cached {cached[-1] * 1e3:7.1f} ms   no cache {nocache[-1] * 1e3:7.1f} ms",
              flush=True)
    a, b = statistics.median(cached), statistics.median(nocache)
    print(f"{engine} median per token: cached {a * 1e3 / tokens:.3f} ms, no cache {b * 1e3 / tokens:.3f} ms; "
          f"speed-up with the KV cache = {b / a:.1f}x", flush=True)
    return b / a


def export_engine(model, config: dict, key: str, params_path: str, root: Path, threads: int):
    """Export the network to root/exports/<key>/ and load it on onnxruntime (CPU)."""
    from components.config import load_params
    from components.export import export_model
    from components.inference import load_engine

    result = export_model(key, model, config, load_params(params_path).export, root)
    if not result["passed"]:
        sys.exit(f"{key}: the ONNX export failed its parity check ({result.get('reason')})")
    return load_engine(root / "exports" / key, threads=threads, prefer_gpu=False)


if __name__ == "__main__":
    main()
