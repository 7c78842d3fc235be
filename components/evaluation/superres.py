"""Super-resolution metrics on the test split, with the interpolation baselines beside them.

    metrics = superres_metrics(upscaled, lowres, originals, labels, "digits", root, factor=2, levels=17)
    # {"eval/sr_psnr", "eval/sr_class_acc", "eval/sr_fd", "eval/fd", "eval/class_acc", ...,
    #  "baseline/bicubic_psnr", ..., "baseline/nearest_fd"}

Every image is (N, H, W) grey or (N, H, W, C) colour in [0, 1] on the dataset's levels. The low-res images are the
test images shrunk by `factor` (components/sampling/superres.downsample); each method brings them
back to full size and is scored against the originals:
- psnr: 10 log10(1 / MSE) in dB, the MSE over every pixel (and every channel) of every image (one
  number for the set, finite unless every image is reproduced exactly);
- class_acc: the share of upscaled images the reference classifier of components/evaluation/images.py
  assigns to the original's true label (does the upscaling keep the digit?); not measured for an
  unlabelled (or one-class) dataset, whose table says why (images.py's not_applicable);
- fd: the Frechet distance of their reference features to the train split's (images.py's eval/fd).
Baselines: bicubic and nearest-neighbour interpolation of the same low-res images (PIL, per channel), rounded
to the grey levels like the model's output. The model's upscalings are also scored like every
image model's samples (eval/fd, eval/kid, eval/precision, eval/recall, eval/class_acc,
eval/nn_ratio of images.py, so eval/fd == eval/sr_fd), which puts them in the MLflow UI's charts
beside the other digits models; the family adds images.py's baselines (baseline/real_* is the
originals: the ceiling for class_acc, the floor for fd).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from components.evaluation.editing import class_metrics_reason
from components.evaluation.images import UNLABELLED, ImageMetricsError, image_metrics

BASELINES = ("bicubic", "nearest")


def psnr(images: np.ndarray, originals: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images against originals, both (N, H, W[, C]) in [0, 1]
    (the MSE over every channel)."""
    images, originals = np.asarray(images, np.float64), np.asarray(originals, np.float64)
    if images.shape != originals.shape:
        raise ImageMetricsError(f"upscaled images: shape {images.shape}, the originals are {originals.shape}")
    mse = float(np.mean((images - originals) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def interpolate(lowres: np.ndarray, factor: int, method: str, levels: int) -> np.ndarray:
    """Low-res images (N, h, w) in [0, 1] -> (N, h*factor, w*factor) by PIL's bicubic or nearest
    interpolation, clipped and rounded to the data's levels; colour images (N, h, w, C) channel by channel."""
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[method]
    lowres = np.asarray(lowres)
    if lowres.ndim == 4:   # each channel on its own, as a grey image
        return np.stack([interpolate(lowres[..., c], factor, method, levels) for c in range(lowres.shape[-1])],
                        axis=-1)
    N, h, w = lowres.shape
    out = np.stack([np.asarray(Image.fromarray(img.astype(np.float32)).resize((w * factor, h * factor),
                                                                                        resample))
                    for img in lowres]) if N else np.zeros((0, h * factor, w * factor), np.float32)
    return (np.rint(np.clip(out, 0.0, 1.0) * (levels - 1)) / (levels - 1)).astype(np.float32)


def scores(images: np.ndarray, originals: np.ndarray, labels, dataset: str,
           root: Path) -> tuple[dict[str, float], dict[str, float]]:
    """({"psnr", "class_acc", "fd"}, images.py's eval/ metrics) of upscaled images against their
    originals and true labels; labels None (an unlabelled dataset): no class_acc."""
    quality = image_metrics(images, labels, dataset, root)
    sr = {"psnr": psnr(images, originals), "fd": quality["eval/fd"]}
    if labels is not None:
        sr["class_acc"] = quality["eval/class_acc"]
    return sr, quality


def superres_metrics(upscaled: np.ndarray, lowres: np.ndarray, originals: np.ndarray, labels: np.ndarray,
                     dataset: str, root: Path, factor: int, levels: int) -> dict[str, float]:
    """eval/sr_{psnr,class_acc,fd} and images.py's eval/ metrics of the model's upscalings;
    baseline/{bicubic,nearest}_{psnr,class_acc,fd} of the interpolations of the same low-res images
    (no class_acc for an unlabelled or one-class dataset)."""
    labels = None if class_metrics_reason(dataset, root) else labels
    sr, quality = scores(upscaled, originals, labels, dataset, root)
    out = {**{f"eval/sr_{k}": v for k, v in sr.items()}, **quality}
    for method in BASELINES:
        got, _ = scores(interpolate(lowres, factor, method, levels), originals, labels, dataset, root)
        out.update({f"baseline/{method}_{k}": v for k, v in got.items()})
    return out


def superres_table(metrics: dict[str, float], not_applicable: str = UNLABELLED) -> str:
    """Markdown: the model's row and each baseline's, psnr / class_acc / fd (class acc: the reason
    `not_applicable` when the metrics have none)."""
    def acc(name: str) -> str:
        return f"{metrics[name]:.3f}" if name in metrics else not_applicable

    lines = ["| method | PSNR (dB) | class acc | FD |", "|---|---:|---:|---:|"]
    rows = [("diffusion (this model)", "eval/sr_")] + [(m, f"baseline/{m}_") for m in BASELINES]
    for name, prefix in rows:
        lines.append(f"| {name} | {metrics[prefix + 'psnr']:.2f} | {acc(prefix + 'class_acc')} | "
                     f"{metrics[prefix + 'fd']:.4f} |")
    if "baseline/real_fd" in metrics:
        lines.append(f"| originals (ceiling) | | {acc('baseline/real_class_acc')} | "
                     f"{metrics['baseline/real_fd']:.4f} |")
    return "\n".join(lines) + "\n"
