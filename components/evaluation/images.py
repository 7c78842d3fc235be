"""Image metrics shared by every image model (diffusion or autoregressive), and honest baselines.

    image_metrics(samples, labels, "digits", root)  -> {"eval/fd": ..., "eval/kid": ..., ...}
    image_baselines("digits", root, n=360)         -> {"baseline/real_fd": ..., "baseline/kde_fd": ..., ...}
    save_grid(samples, "reports/digits-unet/samples.png", nrow=10)

What is measured (samples are (N, H, W) floats in [0, 1]; real images are scaled the same way):
- A reference network, a one-hidden-layer MLP classifier (128 ReLU units, L2 penalty 0.1, L-BFGS)
  trained with a fixed seed on the train split, gives features (its hidden layer) and class
  predictions. It is cached under root/.genflow/cache/reference-<hash>.npz, the hash taken from
  the prepared manifest's file hashes.
- eval/fd: Frechet distance between Gaussians fitted to the features of the samples and of the
  train split. eval/kid: kernel inception distance (unbiased MMD^2, cubic polynomial kernel) on the
  same features. eval/precision, eval/recall: k-NN manifold precision and recall (k=3,
  Kynkaanniemi et al. 2019) against the train split's features.
- eval/class_acc: share of samples the reference classifier assigns to the label they were drawn for.
- eval/nn_ratio: median distance (raw pixels) from each sample to its nearest train image, divided
  by the same median for the real test images. About 1 for a model that generalises like fresh
  data, near 0 for a model that copies its training set (which FD alone would reward).
Baselines with the same number of images n: the real test split (the floor a model can reach),
a Gaussian fitted per class to the train pixels, and a per-class Gaussian KDE in PCA-15 space
(bandwidth chosen on the val split). The baselines are class-conditional, like the models, and
are drawn for the same cycling labels. Samples are compared with the train split (the
distribution the model learned), the real test split at the same n is the floor.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from components.errors import DataError
from components.files import atomic_file
from components.layout import Layout

METRICS = ("fd", "kid", "precision", "recall", "class_acc", "nn_ratio")
REFERENCE_HIDDEN = 128
REFERENCE_SEED = 0
REFERENCE_ALPHA = 0.1       # L2 penalty: tames the hidden activations, so FD and KID are less noisy
PR_K = 3                    # neighbours for the precision/recall manifolds
KDE_COMPONENTS = 15


class ImageMetricsError(DataError):
    """Samples or labels that cannot be scored against the dataset; the message says what to fix."""


# ---------------------------------------------------------------------------
# Distances between feature sets (pure numpy)
# ---------------------------------------------------------------------------

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for features a (N, D), b (M, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of sqrt eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD: stable)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_covmean = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3 (KID, Binkowski et al. 2018)."""
    d = a.shape[1]
    k_aa = (a @ a.T / d + 1) ** 3
    k_bb = (b @ b.T / d + 1) ** 3
    k_ab = (a @ b.T / d + 1) ** 3
    m, n = len(a), len(b)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
                 + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1)) - 2 * k_ab.mean())


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (N, M) between rows of a (N, D) and b (M, D)."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """k-NN manifold precision (fake inside the real manifold) and recall (real inside the fake one)."""
    def radii(x: np.ndarray) -> np.ndarray:          # distance to the k-th neighbour, self excluded
        return np.sort(pairwise_distances(x, x), axis=1)[:, k]
    d = pairwise_distances(fake, real)               # (N_fake, N_real)
    precision = (d <= radii(real)[None, :]).any(axis=1).mean()
    recall = (d <= radii(fake)[:, None]).any(axis=0).mean()
    return float(precision), float(recall)


def median_nn_distance(x: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> float:
    """Median over rows of x of the distance to the nearest row of ref (raw pixels)."""
    nearest = np.concatenate([pairwise_distances(x[i:i + chunk], ref).min(1) for i in range(0, len(x), chunk)])
    return float(np.median(nearest))


# ---------------------------------------------------------------------------
# Reference network and the per-dataset reference set
# ---------------------------------------------------------------------------

@dataclass
class ReferenceNet:
    """A fitted one-hidden-layer MLP: features = relu(x W0 + b0), logits = features W1 + b1."""
    w0: np.ndarray
    b0: np.ndarray
    w1: np.ndarray
    b1: np.ndarray

    def features(self, x: np.ndarray) -> np.ndarray:     # (N, D) in [0, 1] -> (N, hidden)
        return np.maximum(x @ self.w0 + self.b0, 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:      # (N, D) -> (N,) class ids
        return (self.features(x) @ self.w1 + self.b1).argmax(1)


def fit_reference_net(x: np.ndarray, y: np.ndarray, seed: int = REFERENCE_SEED) -> ReferenceNet:
    """Train the reference MLP on flattened images x (N, D) in [0, 1] and labels y (N,)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    # full-batch L-BFGS: deterministic, and as accurate as Adam here (0.97 on the digits' test split)
    clf = MLPClassifier(hidden_layer_sizes=(REFERENCE_HIDDEN,), solver="lbfgs", alpha=REFERENCE_ALPHA,
                        max_iter=500, random_state=seed)
    # one BLAS thread: small matrices, and spinning BLAS threads stall on a busy machine (6x here)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    if not np.array_equal(clf.classes_, np.arange(len(clf.classes_))):
        raise ImageMetricsError(f"train split: classes {clf.classes_.tolist()} are not 0..C-1; every class needs "
                                "training images (see datasets.<name>.image_validation.min_per_class)")
    w1, b1 = clf.coefs_[1], clf.intercepts_[1]
    if w1.shape[1] == 1:  # sklearn keeps one logit for two classes: make it two
        w1, b1 = np.concatenate([-w1, w1], 1), np.concatenate([-b1, b1])
    return ReferenceNet(clf.coefs_[0], clf.intercepts_[0], w1, b1)


@dataclass
class Reference:
    """Everything samples are compared with, for one prepared dataset."""
    net: ReferenceNet
    levels: int
    image_shape: tuple[int, int]
    num_classes: int
    train_x: np.ndarray        # (N_train, D) float64 in [0, 1]
    train_y: np.ndarray
    train_features: np.ndarray
    val_x: np.ndarray          # (N_val, D): picks the KDE baseline's bandwidth
    val_y: np.ndarray
    test_x: np.ndarray         # (N_test, D)
    test_y: np.ndarray
    test_nn: float             # median NN distance test -> train (the nn_ratio denominator)


def data_hash(manifest: dict) -> str:
    """Short hash of the prepared files (their md5s) and of the reference recipe."""
    blob = json.dumps([manifest.get("files", {}), REFERENCE_HIDDEN, REFERENCE_SEED, REFERENCE_ALPHA], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_unit(x: np.ndarray, levels: int) -> np.ndarray:
    """uint8 levels (N, H, W) -> flattened floats (N, H*W) in [0, 1]."""
    return x.reshape(len(x), -1).astype(np.float64) / (levels - 1)


_REFERENCES: dict[tuple[str, str], Reference] = {}


def load_reference(dataset: str, root: Path) -> Reference:
    """The reference set of a prepared image dataset (reference net trained once, then cached)."""
    from components.data import load_images, load_manifest

    root = Path(root)
    manifest = load_manifest(dataset, root)
    if manifest.get("kind") not in ("image", "captions") or not manifest.get("classes"):
        raise ImageMetricsError(f"datasets.{dataset}: image metrics need images with classes (an image or "
                                f"labelled captions dataset), got {manifest.get('kind')!r} data")
    h = data_hash(manifest)
    key = (str(root.resolve()), h)
    if key in _REFERENCES:
        return _REFERENCES[key]
    levels = int(manifest["levels"])
    x_tr, y_tr = load_images(dataset, "train", root)
    x_va, y_va = load_images(dataset, "val", root)
    x_te, y_te = load_images(dataset, "test", root)
    train_x, test_x = _to_unit(x_tr, levels), _to_unit(x_te, levels)

    cache = Layout(root).cache / f"reference-{h}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            net = ReferenceNet(z["w0"], z["b0"], z["w1"], z["b1"])
    else:
        net = fit_reference_net(train_x, y_tr)
        with atomic_file(cache) as tmp:
            np.savez(tmp, w0=net.w0, b0=net.b0, w1=net.w1, b1=net.b1)

    ref = Reference(net=net, levels=levels, image_shape=tuple(x_tr.shape[1:]),
                    num_classes=len(manifest["classes"]),
                    train_x=train_x, train_y=y_tr, train_features=net.features(train_x),
                    val_x=_to_unit(x_va, levels), val_y=y_va,
                    test_x=test_x, test_y=y_te, test_nn=median_nn_distance(test_x, train_x))
    _REFERENCES[key] = ref
    return ref


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def score(x: np.ndarray, labels: Optional[np.ndarray], ref: Reference) -> dict[str, float]:
    """The metrics of flattened images x (N, D) in [0, 1] against a reference set (names without prefix)."""
    feats = ref.net.features(x)
    precision, recall = precision_recall(ref.train_features, feats)
    out = {"fd": frechet_distance(feats, ref.train_features),
           "kid": kernel_distance(feats, ref.train_features),
           "precision": precision, "recall": recall}
    if labels is not None:
        out["class_acc"] = float((ref.net.predict(x) == labels).mean())
    out["nn_ratio"] = median_nn_distance(x, ref.train_x) / max(ref.test_nn, 1e-12)
    return out


def _check_samples(samples: np.ndarray, labels: Optional[np.ndarray], ref: Reference, dataset: str) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 3 or tuple(samples.shape[1:]) != ref.image_shape:
        raise ImageMetricsError(f"samples: shape {samples.shape}, expected (N, {ref.image_shape[0]}, "
                                f"{ref.image_shape[1]}) for dataset {dataset}")
    if len(samples) < PR_K + 2:
        raise ImageMetricsError(f"samples: {len(samples)} images are too few to score; give at least {PR_K + 2}")
    if not np.isfinite(samples).all() or samples.min() < 0 or samples.max() > 1:
        raise ImageMetricsError("samples: values must be finite and in [0, 1] (scale images before scoring)")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),):
            raise ImageMetricsError(f"labels: shape {labels.shape}, expected ({len(samples)},)")
        if labels.size and (labels.min() < 0 or labels.max() >= ref.num_classes):
            raise ImageMetricsError(f"labels: values must be class ids 0..{ref.num_classes - 1}")
    return samples.reshape(len(samples), -1).astype(np.float64)


def image_metrics(samples: np.ndarray, labels: Optional[np.ndarray], dataset: str, root: Path) -> dict[str, float]:
    """eval/fd, eval/kid, eval/precision, eval/recall, eval/class_acc (if labels), eval/nn_ratio.

    samples: (N, H, W) float32 in [0, 1]; labels: (N,) int64 class each sample was drawn for, or None.
    Compare against baselines computed with the same N (image_baselines(dataset, root, n=N)).
    """
    from threadpoolctl import threadpool_limits

    ref = load_reference(dataset, root)
    x = _check_samples(samples, labels, ref, dataset)
    with threadpool_limits(1):  # small matrices: one BLAS thread is faster on a shared machine
        return {f"eval/{k}": v for k, v in score(x, labels, ref).items()}


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------

def _quantise(x: np.ndarray, levels: int) -> np.ndarray:
    """Clip to [0, 1] and round to the dataset's grey levels, as real images are."""
    return np.round(np.clip(x, 0.0, 1.0) * (levels - 1)) / (levels - 1)


def cycling_labels(n: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., C-1, 0, 1, ...: the labels every generator here is asked for."""
    return np.arange(n, dtype=np.int64) % num_classes


def gaussian_baseline(ref: Reference, labels: np.ndarray, seed: int) -> np.ndarray:
    """One full-covariance Gaussian per class fitted to train pixels; (N, D) samples."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(labels), ref.train_x.shape[1]))
    for c in np.unique(labels):
        xc = ref.train_x[ref.train_y == c]
        where = np.flatnonzero(labels == c)
        out[where] = rng.multivariate_normal(xc.mean(0), np.cov(xc, rowvar=False), size=len(where), method="eigh")
    return _quantise(out, ref.levels)


def kde_bandwidth(z_fit: np.ndarray, y_fit: np.ndarray, z_held: np.ndarray, y_held: np.ndarray) -> float:
    """The per-class KDE bandwidth (one for all classes) with the best held-out log-likelihood."""
    from sklearn.neighbors import KernelDensity

    def loglik(h: float) -> float:
        return sum(KernelDensity(bandwidth=h).fit(z_fit[y_fit == c]).score(z_held[y_held == c])
                   for c in np.unique(y_held) if (y_fit == c).any())
    grid = np.geomspace(0.05, 2.0, 17)
    return float(grid[int(np.argmax([loglik(h) for h in grid]))])


def kde_baseline(ref: Reference, labels: np.ndarray, seed: int) -> np.ndarray:
    """A Gaussian KDE per class in the train split's PCA-15 space; (N, D) samples.

    The bandwidth maximises the likelihood of the val split (of a held-out fifth of train if
    there is no val split).
    """
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KernelDensity

    k = min(KDE_COMPONENTS, ref.train_x.shape[1], len(ref.train_x) - 1)
    pca = PCA(n_components=k, random_state=seed).fit(ref.train_x)
    z, y = pca.transform(ref.train_x), ref.train_y
    if len(ref.val_x):
        h = kde_bandwidth(z, y, pca.transform(ref.val_x), ref.val_y)
    else:
        held = np.random.default_rng(seed).random(len(z)) < 0.2
        h = kde_bandwidth(z[~held], y[~held], z[held], y[held])
    out = np.zeros((len(labels), ref.train_x.shape[1]))
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        kde = KernelDensity(bandwidth=h).fit(z[y == c])
        out[where] = pca.inverse_transform(kde.sample(len(where), random_state=seed + int(c)))
    return _quantise(out, ref.levels)


def image_baselines(dataset: str, root: Path, n: int, seed: int = 0) -> dict[str, float]:
    """baseline/{real,kde,gaussian}_{fd,kid,precision,recall,class_acc,nn_ratio} with n images each.

    real: n test images (all of them if the test split is smaller); kde and gaussian: n samples
    with labels cycling over the classes, fitted on the train split.
    """
    from threadpoolctl import threadpool_limits

    ref = load_reference(dataset, root)
    if n < PR_K + 2:
        raise ImageMetricsError(f"n: {n} images are too few for baselines; give at least {PR_K + 2}")
    with threadpool_limits(1):
        return _baselines(ref, n, seed)


def balanced_pick(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices of y taken round-robin over classes (each class shuffled): class shares stay even."""
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    order: list[int] = []
    for rnd in range(max(len(idx) for idx in per_class)):
        order += [int(idx[rnd]) for idx in per_class if rnd < len(idx)]
    return np.sort(np.array(order[:n], dtype=np.int64))


def _baselines(ref: Reference, n: int, seed: int) -> dict[str, float]:
    # an unbalanced subset would shift the feature means (FD) for reasons that are not quality
    pick = balanced_pick(ref.test_y, n, seed)
    labels = cycling_labels(n, ref.num_classes)
    sets = {"real": (ref.test_x[pick], ref.test_y[pick]),
            "kde": (kde_baseline(ref, labels, seed), labels),
            "gaussian": (gaussian_baseline(ref, labels, seed), labels)}
    out = {}
    for name, (x, y) in sets.items():
        out.update({f"baseline/{name}_{k}": v for k, v in score(x, y, ref).items()})
    return out


# ---------------------------------------------------------------------------
# Sample grid
# ---------------------------------------------------------------------------

def save_grid(samples: np.ndarray, path: Path, nrow: int = 10, cell: int = 32, pad: int = 2) -> Path:
    """Write samples (N, H, W) in [0, 1] as a PNG grid, `nrow` images per row, each upscaled to ~`cell` px.

    For a class-conditional grid, order samples class by class so that each row is one class.
    """
    from PIL import Image

    samples = np.clip(np.asarray(samples, dtype=np.float64), 0, 1)
    n, h, w = samples.shape
    scale = max(1, cell // max(h, w))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad), 0.5)
    for i, img in enumerate(samples):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[y0:y0 + h * scale, x0:x0 + w * scale] = np.kron(img, np.ones((scale, scale)))
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(np.round(grid * 255).astype(np.uint8), mode="L").save(tmp)
    return path
