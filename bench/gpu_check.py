"""On a machine with a CUDA GPU: train, export and sample each default model on the GPU and on the CPU.

    bench/gpu_check.sh                       # makes a venv with CUDA torch + onnxruntime-gpu, then runs this
    python bench/gpu_check.py [--models digits-unet,pydoc-gpt] [--seconds 30] [--samples 16]

For each model (default: those a plain `genflow run` trains), in a scratch folder:
  1. ingest, validate and prepare its dataset (builtin sources: no network);
  2. train for `--seconds` on CUDA in bf16 (train.device cuda, train.precision bf16), export to
     ONNX (from the fp32 CPU weights in model.pt) and check parity; then the same on the CPU in fp32;
  3. sample `--samples` items through onnxruntime with the CUDA provider and with the CPU provider
     (one warm-up call each first).
It prints, side by side: training items/s CUDA vs CPU and sampling ms/item CUDA provider vs CPU
provider, and refuses (exit 1) when CUDA is missing, when training did not run on the GPU or when
the CUDA provider was not the one onnxruntime used. Three default models at 30 s of training per
device take about 4-5 minutes in all.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from components.config import load_params  # noqa: E402
from components.inference import load_engine  # noqa: E402
from components.inference.engines import DiffusionEngine  # noqa: E402
from flows import stages  # noqa: E402

DATA_STAGES = ("ingest", "validate", "prepare")


def params_for(key: str, device: str, precision: str, seconds: float):
    """params.yaml with one model trained for `seconds` (the clock binds) on `device` in `precision`."""
    train = f"models.{key}.train"
    return load_params(ROOT / "params.yaml", [f"{train}.device={device}", f"{train}.precision={precision}",
                                              f"{train}.max_seconds={seconds}", f"{train}.max_steps=1000000",
                                              f"{train}.checkpoint_every=0"])


def sample_once(engine, n: int) -> None:
    """n items of the model's own kind through its onnxruntime engine."""
    if isinstance(engine, DiffusionEngine):
        engine.sample([i % max(1, engine.num_classes) for i in range(n)], steps=20)
    elif engine.kind == "image" and hasattr(engine, "sample_digits"):
        engine.sample_digits([i % 10 for i in range(n)])
    else:
        engine.sample_text(count=n, length=64)


def sampling_ms_per_item(folder: Path, prefer_gpu: bool, n: int) -> tuple[float, str]:
    engine = load_engine(folder, prefer_gpu=prefer_gpu)
    sample_once(engine, n)   # warm-up: the provider's first call allocates and tunes
    t = time.perf_counter()
    sample_once(engine, n)
    return 1000 * (time.perf_counter() - t) / n, engine.provider


def check_model(key: str, seconds: float, samples: int, scratch: Path) -> dict:
    out = {}
    for device, precision in (("cuda", "bf16"), ("cpu", "fp32")):
        root = scratch / f"{key}-{device}"
        root.mkdir(parents=True)
        params = params_for(key, device, precision, seconds)
        dataset = params.model(key).dataset
        for stage in DATA_STAGES:
            stages.run_stage(params, stage, dataset, root)
        metrics = stages.run_stage(params, "train", key, root)
        schedule = (root / "models" / key / "schedule.json").read_text()
        want = '"device": "cuda:0"' if device == "cuda" else '"device": "cpu"'
        if want not in schedule:
            raise SystemExit(f"{key}: training on {device} did not record {want} in schedule.json")
        parity = stages.run_stage(params, "export", key, root)
        out[f"train_{device}"] = metrics["perf/train_items_per_s"]
        out[f"parity_{device}"] = parity.get("max_abs")
        if device == "cuda":
            folder = root / "exports" / key
            out["sample_cuda"], provider = sampling_ms_per_item(folder, True, samples)
            if provider != "CUDAExecutionProvider":
                raise SystemExit(f"{key}: onnxruntime ran on {provider}, not the CUDA provider; install "
                                 "onnxruntime-gpu matching this CUDA (and not onnxruntime beside it)")
            out["sample_cpu"], _ = sampling_ms_per_item(folder, False, samples)
        print(f"{key} {device}/{precision}: {out[f'train_{device}']:.0f} items/s, parity {out[f'parity_{device}']}",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated model keys (default: the enabled ones)")
    ap.add_argument("--seconds", type=float, default=30.0, help="training seconds per model per device")
    ap.add_argument("--samples", type=int, default=16, help="items per timed sampling call")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"torch {torch.__version__} sees no CUDA GPU: run this on a GPU machine (bench/gpu_check.sh)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
    params = load_params(ROOT / "params.yaml")
    keys = [k for k in args.models.split(",") if k] or [k for k, m in params.models.items() if m.enabled]
    scratch = Path(tempfile.mkdtemp(prefix="genflow-gpu-check-"))
    rows, t0 = {}, time.perf_counter()
    try:
        for key in keys:
            rows[key] = check_model(key, args.seconds, args.samples, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{'model':14} {'train items/s':>28} {'sample ms/item (onnxruntime)':>36}")
    print(f"{'':14} {'CUDA bf16':>9} {'CPU fp32':>9} {'ratio':>8} {'CUDA prov.':>11} {'CPU prov.':>11} {'ratio':>8}")
    for key, r in rows.items():
        print(f"{key:14} {r['train_cuda']:9.0f} {r['train_cpu']:9.0f} {r['train_cuda'] / r['train_cpu']:7.1f}x "
              f"{r['sample_cuda']:11.2f} {r['sample_cpu']:11.2f} {r['sample_cpu'] / r['sample_cuda']:7.1f}x")
    print(f"\n{len(rows)} model(s) in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
