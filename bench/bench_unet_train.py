"""Training throughput of genflow's U-Net against diffusers' UNet2DModel at a similar size.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_unet_train.py [--batch 64 --steps 20 --repeats 5 --threads 2]

Both networks do the same training step (eps-prediction MSE, AdamW) on the same random batch.
They alternate, `repeats` times `steps` steps each, and the median images/s of each is compared,
so a neighbour process slowing the machine slows both. diffusers is a benchmark extra
(`pip install -e .[bench]`), never a runtime dependency.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--model", default="digits-unet")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="training steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = ap.parse_args()

    import torch
    try:
        from diffusers import UNet2DModel
    except ImportError:
        sys.exit("diffusers is not installed: pip install -e '.[bench]'")

    from components.config import load_params
    from components.models.unet import UNet, count_params

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    mc = load_params(args.params).model(args.model)
    size, classes, T = 8, 10, mc.diffusion.timesteps
    ours = UNet(mc.unet, image_size=size, in_channels=1, num_classes=classes)
    n_levels = len(mc.unet.channels)
    theirs = UNet2DModel(sample_size=size, in_channels=1, out_channels=1,
                         block_out_channels=tuple(mc.unet.channels), layers_per_block=mc.unet.blocks_per_level,
                         down_block_types=("DownBlock2D",) * n_levels, up_block_types=("UpBlock2D",) * n_levels,
                         norm_num_groups=mc.unet.groups, num_class_embeds=classes + 1)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, size, size, generator=gen)
    eps = torch.randn(args.batch, 1, size, size, generator=gen)
    t = torch.randint(0, T, (args.batch,), generator=gen)
    y = torch.randint(0, classes + 1, (args.batch,), generator=gen)

    def stepper(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.mse_loss(call(model), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    runs = {"genflow UNet": (stepper(ours, lambda m: m(x, t, y)), count_params(ours)),
            "diffusers UNet2DModel": (stepper(theirs, lambda m: m(x, t, class_labels=y).sample), count_params(theirs))}
    for step, _ in runs.values():  # warm-up: allocator, oneDNN primitives
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (step, _) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))

    print(f"batch {args.batch}, {args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'network':<24}{'params':>10}{'median img/s':>14}{'min':>8}{'max':>8}")
    for name, (_, n_params) in runs.items():
        r = rates[name]
        print(f"{name:<24}{n_params:>10,}{statistics.median(r):>14.0f}{min(r):>8.0f}{max(r):>8.0f}")
    ratio = statistics.median(rates["genflow UNet"]) / statistics.median(rates["diffusers UNet2DModel"])
    print(f"ratio genflow / diffusers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
