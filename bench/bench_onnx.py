"""onnxruntime against eager PyTorch, in one process, on the default networks of params.yaml.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_onnx.py [--repeats 5] [--threads 2]

Cases (random weights: the timing depends on the shapes only):
  denoiser step      one U-Net call at batch 1 and at batch 64              target ORT >= 1.3x
  DDIM-50 sampling   64 images, guidance 2 (cond + uncond: batch 128/call)  target ORT >= 1.5x
  cached generation  256 new tokens with the pydoc-gpt network, batch 1     target ORT >= 2x
                     (block_size 128: the cache slides once, in both engines)

Both engines get the same thread count, no spinning (OMP_WAIT_POLICY=PASSIVE, onnxruntime's
allow_spinning=0). Repeats alternate PyTorch and onnxruntime so that load from other processes
hits both alike; the table shows medians and the ratio PyTorch time / onnxruntime time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning stalls shared cores
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.config import load_params  # noqa: E402
from components.export import export_model  # noqa: E402
from components.inference import load_engine  # noqa: E402
from components.models.diffusion import GaussianDiffusion  # noqa: E402
from components.models.gpt import GPT  # noqa: E402
from components.models.unet import UNet  # noqa: E402

TEXT_VOCAB = 97  # about the pydoc corpus' distinct characters + the unknown id


def timed(fn, inner: int) -> float:
    """Seconds per call, over `inner` calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def compare(name: str, torch_fn, ort_fn, repeats: int, inner: int, target: float) -> dict:
    torch_fn(), ort_fn()  # warm-up: first calls allocate and pick kernels
    t_torch, t_ort = [], []
    for _ in range(repeats):  # alternate, so that a burst of load from elsewhere hits both
        t_torch.append(timed(torch_fn, inner))
        t_ort.append(timed(ort_fn, inner))
    mt, mo = statistics.median(t_torch), statistics.median(t_ort)
    row = {"case": name, "torch_ms": mt * 1e3, "ort_ms": mo * 1e3, "ratio": mt / mo, "target": target}
    print(f"{name:<34} {row['torch_ms']:>10.2f} {row['ort_ms']:>10.2f} {row['ratio']:>7.2f}x  "
          f"(target {target:.1f}x: {'met' if row['ratio'] >= target else 'MISSED'})", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    params = load_params(a.params)
    du, pg = params.model("digits-unet"), params.model("pydoc-gpt")
    digits = params.dataset(du.dataset)
    torch.manual_seed(0)
    unet = UNet(du.unet, digits.image_size, 1, 10)
    for p in unet.parameters():  # random weights (the zero-initialised output layers included)
        torch.nn.init.normal_(p, std=0.05)
    unet.eval()
    gpt = GPT(pg.gpt, TEXT_VOCAB).eval()
    unet_cfg = {"backbone": "unet", "family": "diffusion", "image_size": digits.image_size, "num_classes": 10,
                "levels": digits.levels, "diffusion": {"timesteps": du.diffusion.timesteps,
                                                       "schedule": du.diffusion.schedule}}
    gpt_cfg = {"backbone": "gpt", "family": "transformer", "kind": "text", "vocab": "".join(map(chr, range(32, 128)))}

    with tempfile.TemporaryDirectory(prefix="genflow-bench-") as tmp:
        for key, net, cfg in (("digits-unet", unet, unet_cfg), ("pydoc-gpt", gpt, gpt_cfg)):
            r = export_model(key, net, cfg, params.export, Path(tmp))
            assert r["passed"], r.get("reason")
        den = load_engine(Path(tmp) / "exports" / "digits-unet", threads=a.threads, prefer_gpu=False)
        lm = load_engine(Path(tmp) / "exports" / "pydoc-gpt", threads=a.threads, prefer_gpu=False)

        print(f"threads={a.threads}, repeats={a.repeats}, load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores (other processes share them: timings are noisy)")
        print(f"{'case':<34} {'torch ms':>10} {'ORT ms':>10} {'ratio':>8}")
        rows = []
        rng = np.random.default_rng(0)
        for B, inner in ((1, 50), (64, 5)):
            x = rng.standard_normal((B, 1, 8, 8)).astype(np.float32)
            t = rng.integers(0, du.diffusion.timesteps, B).astype(np.int64)
            y = rng.integers(0, 11, B).astype(np.int64)
            xt, tt, yt = map(torch.from_numpy, (x, t, y))

            def torch_step():
                with torch.inference_mode():
                    unet(xt, tt, yt)

            rows.append(compare(f"denoiser step, batch {B}", torch_step, lambda: den.denoise(x, t, y),
                                a.repeats, inner, 1.3))

        steps, guidance = du.sample.steps, du.sample.guidance
        process = GaussianDiffusion.from_config(du.diffusion, 10)
        labels = np.arange(64) % 10

        def torch_sample():
            with torch.inference_mode():
                process.sample(unet, torch.from_numpy(labels), (1, 8, 8), sampler="ddim", steps=steps,
                               guidance=guidance, generator=torch.Generator().manual_seed(0))

        rows.append(compare(f"DDIM-{steps} sampling, 64 images", torch_sample,
                            lambda: den.sample(labels, sampler="ddim", steps=steps, guidance=guidance),
                            max(3, a.repeats // 2), 1, 1.5))

        prompt = np.zeros((1, 1), dtype=np.int64)

        def torch_generate():
            gpt.generate(torch.from_numpy(prompt), 256, generator=torch.Generator().manual_seed(0))

        rows.append(compare("cached generation, 256 tokens", torch_generate, lambda: lm.generate(prompt, 256),
                            a.repeats, 1, 2.0))
    missed = [r["case"] for r in rows if r["ratio"] < r["target"]]
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
