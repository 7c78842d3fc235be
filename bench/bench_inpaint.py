"""What inpainting costs in the evaluation: RePaint variants side by side, on the default U-Net of params.yaml.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_inpaint.py [--repeats 3] [--images 100] [--threads 2]

Cases (random weights: the timing depends on the shapes only), `--images` 8x8 digits-sized images
with the bottom half to fill, the headline sampler of params.yaml (DDIM-50, eta 1):
  unconditional          eval.inpaint_label none, no resampling (the baseline of the ratios)
  jump 5, resample 2/3   RePaint's resampling: each resample adds the jumped steps again
  class inferred         eval.inpaint_label infer (the default): an unconditional pass, the
                         diffusion classifier (5 timesteps x 2 draws x every class), a class-conditional pass
Repeats alternate the cases so that load from other processes hits all alike; the table shows the
median ms per completion and its ratio to the unconditional case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning stalls shared cores
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.config import load_params  # noqa: E402
from components.families import diffusion as fam  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mc = load_params(ROOT / "params.yaml").model("digits-unet")
    config = {"backbone": "unet", "unet": vars(mc.unet), "image_size": 8, "channels": 1, "num_classes": 10,
              "levels": 17, "diffusion": vars(mc.diffusion)}
    torch.manual_seed(0)
    net = fam.build_network(config).eval()
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 17, (args.images, 8, 8)).astype(np.uint8)
    keep = np.ones((args.images, 8, 8), dtype=bool)
    keep[:, 4:] = False
    s = mc.sample
    base = dict(sampler=s.sampler, steps=s.steps, eta=s.eta, guidance=s.guidance, seed=0)
    cases = {"unconditional": dict(), "jump 5, resample 2": dict(jump_length=5, jump_n_sample=2),
             "jump 5, resample 3": dict(jump_length=5, jump_n_sample=3), "class inferred": dict(infer_label=True)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, kw in cases.items():  # warm-up
        fam.inpaint_images(net, config, levels[:4], keep[:4], **base, **kw)
    for _ in range(args.repeats):
        for name, kw in cases.items():
            t0 = time.perf_counter()
            fam.inpaint_images(net, config, levels, keep, **base, **kw)
            times[name].append((time.perf_counter() - t0) * 1000 / args.images)
    ref = statistics.median(times["unconditional"])
    print(f"{args.images} images, {s.sampler}-{s.steps} eta {s.eta}, {args.threads} threads, "
          f"{args.repeats} alternating repeats (median)")
    print(f"{'case':<22} {'ms/completion':>14} {'vs unconditional':>17}")
    for name in cases:
        m = statistics.median(times[name])
        print(f"{name:<22} {m:>14.2f} {m / ref:>16.2f}x")


if __name__ == "__main__":
    main()
