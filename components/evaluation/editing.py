"""Inpainting metrics on the test split, with the baselines beside them.

    metrics = inpaint_evaluation(complete, "digits", root, n=100)              # every mask
    metrics = inpaint_evaluation(complete, "digits", root, n=100, masks=("bottom",))   # a pixel GPT

`complete(levels (N, H, W) uint8, keep (N, H, W) bool) -> (N, H, W) float in [0, 1]` fills the
pixels where keep is False (colour images: levels and completions (N, H, W, C), keep still per
pixel, (N, H, W), for every channel of it); the family's evaluate supplies it (RePaint for a diffusion model, a
prefix completion for a pixel GPT). The same n test images (balanced over classes) and the same
masks go to every model, so the numbers of two models and of the baselines are comparable.

Masks (keep = False where the image is regenerated): ``bottom`` (the lower half of the rows),
``left`` (the left half of the columns), ``centre`` (a square of half the side in the middle),
``random`` (half of the pixels, drawn per image). Metrics, per mask and (only when every mask
was done) as their mean over the masks:

- ``inpaint_class_acc``: share of completions the reference classifier of
  components/evaluation/images.py assigns to the image's true label (the model is never told it);
  not measured for an unlabelled (or one-class) dataset: images.py's not_applicable says why;
- ``inpaint_mse``: mean squared error on the regenerated pixels (intensities in [0, 1], every channel);
- ``inpaint_consistency``: mean squared difference between 4-neighbour pixels on either side of
  the mask border; the true images have their own value (``baseline/real_inpaint_*``): a fill
  that is far rougher at the border than that does not fit what it continues.

Named eval/inpaint_<mask>_<metric> and eval/inpaint_<metric>; the baselines
baseline/nn_inpaint_* (the training image closest on the kept pixels fills the hole),
baseline/mean_inpaint_* (the per-pixel mean of the training images) and baseline/real_inpaint_*
(the true test images: the classifier's ceiling and the data's own border consistency).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from components.evaluation.images import ImageMetricsError, balanced_pick, load_reference, not_applicable

MASKS = ("bottom", "left", "centre", "random")
INPAINT_METRICS = ("class_acc", "mse", "consistency")

Complete = Callable[[np.ndarray, np.ndarray], np.ndarray]   # (levels (N,H,W[,C]), keep (N,H,W)) -> (N,H,W[,C])


def class_metrics_reason(dataset: str, root: Path) -> Optional[str]:
    """Why the dataset has no class accuracy (images.py's not_applicable: unlabelled, one class), or None."""
    return not_applicable(dataset, Path(root)).get("class_acc")


def pixel_mask(keep: np.ndarray, images: np.ndarray) -> np.ndarray:
    """keep (N, H, W) per pixel, as the images' shape: unchanged for grey, every channel for (N, H, W, C)."""
    keep = np.asarray(keep, dtype=bool)
    if np.ndim(images) == keep.ndim + 1:
        return np.broadcast_to(keep[..., None], np.shape(images))
    return keep


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------

def inpaint_masks(n: int, height: int, width: int, masks: Sequence[str] = MASKS,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """{mask name: keep (n, H, W) bool}, True where the pixel is kept; the random mask is drawn per image."""
    unknown = [m for m in masks if m not in MASKS]
    if unknown:
        raise ImageMetricsError(f"masks: {unknown[0]!r} is not an inpainting mask; known: {', '.join(MASKS)}")
    rows, cols = np.mgrid[:height, :width]
    side_h, side_w = max(1, height // 2), max(1, width // 2)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    fixed = {"bottom": rows < height - height // 2,
             "left": cols >= width // 2,
             "centre": ~((rows >= top) & (rows < top + side_h) & (cols >= left) & (cols < left + side_w))}
    out = {}
    for name in masks:
        if name == "random":
            rng = np.random.default_rng(seed)
            order = np.argsort(rng.random((n, height * width)), axis=1)           # a random half per image
            keep = np.ones((n, height * width), dtype=bool)
            np.put_along_axis(keep, order[:, :height * width // 2], False, axis=1)
            out[name] = keep.reshape(n, height, width)
        else:
            out[name] = np.broadcast_to(fixed[name], (n, height, width)).copy()
    return out


def raster_prefix_length(keep: np.ndarray) -> int:
    """P when every row of keep (N, H, W) keeps exactly the first P pixels in raster order, else -1.

    The one kind of mask an autoregressive pixel model can complete: the rest after a prefix.
    """
    flat = np.asarray(keep, dtype=bool).reshape(len(keep), -1)
    p = int(flat[0].sum())
    want = np.arange(flat.shape[1]) < p
    return p if 0 < p < flat.shape[1] and bool((flat == want).all()) else -1


# ---------------------------------------------------------------------------
# Metrics of completions (pure numpy; images (N, H, W) in [0, 1])
# ---------------------------------------------------------------------------

def masked_mse(completions: np.ndarray, truth: np.ndarray, keep: np.ndarray) -> float:
    """Mean squared error over the regenerated pixels (keep False; every channel of them) of all images."""
    hole = ~pixel_mask(keep, completions)
    return float(((np.asarray(completions, np.float64) - truth)[hole] ** 2).mean())


def border_consistency(images: np.ndarray, keep: np.ndarray) -> float:
    """Mean squared difference between horizontally or vertically adjacent pixels of which one is
    kept and the other regenerated (every such pair of every image counts once; colour images
    (N, H, W, C) with keep (N, H, W): every channel of the pair)."""
    x, k = np.asarray(images, np.float64), np.asarray(keep, dtype=bool)
    diffs = []
    for a, b, ka, kb in ((x[:, :, :-1], x[:, :, 1:], k[:, :, :-1], k[:, :, 1:]),     # left-right pairs
                         (x[:, :-1], x[:, 1:], k[:, :-1], k[:, 1:])):                  # up-down pairs
        across = ka != kb
        diffs.append(((a - b)[across]) ** 2)
    d = np.concatenate(diffs)
    return float(d.mean()) if d.size else float("nan")


def score_inpaint(completions: np.ndarray, truth: np.ndarray, keep: np.ndarray, labels: Optional[np.ndarray],
                  predict: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """{"class_acc", "mse", "consistency"} of completions (N, H, W[, C]) of truth with keep (N, H, W);
    labels None (an unlabelled dataset): no class_acc.

    predict: flattened images (N, H*W[*C]) -> class ids (the reference classifier's).
    """
    c = np.asarray(completions, dtype=np.float64)
    if c.shape != truth.shape:
        raise ImageMetricsError(f"completions: shape {c.shape}, expected {truth.shape}")
    if not np.isfinite(c).all() or c.min() < 0 or c.max() > 1:
        raise ImageMetricsError("completions: values must be finite and in [0, 1]")
    out = {} if labels is None else {"class_acc": float((predict(c.reshape(len(c), -1)) == labels).mean())}
    return {**out, "mse": masked_mse(c, truth, keep), "consistency": border_consistency(c, keep)}


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------

def nearest_neighbour_fill(truth: np.ndarray, keep: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each image's hole filled from the training image closest (squared distance) on its kept pixels.

    truth (N, H, W[, C]), keep (N, H, W), train (M, H, W[, C]); returns truth's shape.
    """
    x = np.asarray(truth, np.float64).reshape(len(truth), -1)
    k = pixel_mask(keep, truth).reshape(len(keep), -1).astype(np.float64)
    t = np.asarray(train, np.float64).reshape(len(train), -1)
    # sum_k (x - t)^2 over kept pixels = k.x^2 - 2 (k x) t^T + k (t^2)^T, per image's own mask
    d = (k * x * x).sum(1)[:, None] - 2 * (k * x) @ t.T + k @ (t * t).T         # (N, M)
    nearest = t[d.argmin(1)]
    return np.where(k > 0, x, nearest).reshape(truth.shape)


def mean_fill(truth: np.ndarray, keep: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each image's hole filled with the per-pixel mean of the training images."""
    mean = np.asarray(train, np.float64).mean(0)
    return np.where(pixel_mask(keep, truth), truth, mean[None])


# ---------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------

def metric_name(source: str, metric: str, mask: Optional[str] = None) -> str:
    """eval/inpaint_[<mask>_]<metric> for source "eval", else baseline/<source>_inpaint_[<mask>_]<metric>."""
    tail = f"inpaint_{mask}_{metric}" if mask else f"inpaint_{metric}"
    return f"eval/{tail}" if source == "eval" else f"baseline/{source}_{tail}"


def inpaint_evaluation(complete: Complete, dataset: str, root: Path, n: int, masks: Sequence[str] = MASKS,
                       seed: int = 0) -> dict[str, float]:
    """eval/inpaint_*, baseline/{nn,mean,real}_inpaint_* and perf/inpaint_* on n test images per mask.

    The mean names (eval/inpaint_class_acc, ...) are written only when `masks` holds every mask,
    so that one chart in the MLflow UI compares like with like; perf/inpaint_ms_per_item is the
    completion time per image over the masks done, perf/inpaint_seconds the whole evaluation's.
    Colour datasets: images (N, H, W, C), the masks per pixel. An unlabelled (or one-class) dataset
    gets no *_class_acc (components.evaluation.images.not_applicable says why).
    """
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    if n < 1:
        raise ImageMetricsError(f"eval.inpaint_samples: {n}; give at least 1 (0 turns inpainting evaluation off)")
    ref = load_reference(dataset, Path(root))
    pick = balanced_pick(ref.test_y, n, seed)
    shape = tuple(ref.image_shape)                     # (H, W) grey, (H, W, C) colour
    h, w = shape[:2]
    truth = ref.test_x[pick].reshape(-1, *shape)
    labels = ref.test_y[pick] if ref.labelled else None      # unlabelled: no classifier to score with
    levels = np.rint(truth * (ref.levels - 1)).astype(np.uint8)
    train = ref.train_x.reshape(-1, *shape)
    out: dict[str, float] = {}
    ms = []
    for mask, keep in inpaint_masks(len(pick), h, w, masks, seed).items():
        t0 = time.perf_counter()
        filled = np.asarray(complete(levels, keep), dtype=np.float64)
        ms.append((time.perf_counter() - t0) * 1000 / len(pick))
        with threadpool_limits(1):  # small matrices: one BLAS thread is faster on a shared machine
            fills = {"eval": filled, "nn": nearest_neighbour_fill(truth, keep, train),
                     "mean": mean_fill(truth, keep, train), "real": truth}
            for source, x in fills.items():
                s = score_inpaint(x, truth, keep, labels, ref.net.predict)
                if source == "real":  # the truth: mse is 0 by construction
                    s.pop("mse")
                out.update({metric_name(source, k, mask): v for k, v in s.items()})
    if set(masks) == set(MASKS):
        for source in ("eval", "nn", "mean", "real"):
            for k in INPAINT_METRICS:
                per_mask = [out.get(metric_name(source, k, m)) for m in MASKS]
                if all(v is not None for v in per_mask):
                    out[metric_name(source, k)] = float(np.mean(per_mask))
    out["perf/inpaint_ms_per_item"] = float(np.mean(ms))
    out["perf/inpaint_seconds"] = time.perf_counter() - started
    return out
