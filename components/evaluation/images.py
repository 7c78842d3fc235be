"""Image metrics shared by every image model (diffusion or autoregressive), and honest baselines.

    image_metrics(samples, labels, "digits", root)  -> {"eval/fd": ..., "eval/kid": ..., ...}
    image_baselines("digits", root, n=360)         -> {"baseline/real_fd": ..., "baseline/kde_fd": ..., ...}
    not_applicable("digits", root)                 -> {} ({"class_acc": "not applicable (...)"} unlabelled)
    save_grid(samples, "reports/digits-unet/samples.png", nrow=10)

What is measured (samples are (N, H, W) grey or (N, H, W, C) colour floats in [0, 1], channels
last; real images are scaled the same way):
- A reference network, a one-hidden-layer MLP classifier (128 ReLU units, L2 penalty 0.1, L-BFGS)
  trained with a fixed seed on the train split, gives features (its hidden layer) and class
  predictions. It is cached under root/.genflow/cache/reference-<hash>.npz, the hash taken from
  the prepared manifest's file hashes and from the recipe (for colour, larger or unlabelled data
  also its channels, size, pooling, image cap and feature map).
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

Grey images of at most 16x16 with classes (the digits) are scored exactly as above, pixel for
pixel. Colour (C = 3) or larger images keep the cost bounded:
- each channel is average-pooled by p = ceil(max(H, W) / 16) (32x32 -> 16x16, 64x64 -> 16x16; a
  size that p does not divide loses its last rows/columns) before the reference network, so it
  sees at most 16 * 16 * C = 768 inputs; nn_ratio's distances are taken on the same pooled pixels
  (a copied image is still at distance 0);
- at most REFERENCE_MAX_TRAIN (4000) train images, a balanced pick with the reference seed, stand
  for the train split in every metric and baseline (the fit is full-batch L-BFGS: its time grows
  with images x inputs and is cut at 500 iterations). Measured on a shared 2-core machine (load
  about 3): 2000 colour 32x32 images (768 pooled inputs, 3 classes of coloured shapes) fit in
  1.3 s (load_reference 1.5 s, then 0.8 s to score 360 samples and 3.8 s for the baselines); a
  fit that runs all 500 iterations (random labels) takes 49 s, about twice that at the 4000 cap.
  64x64x3, 2100 train images: reference 4.0 s, 360 samples scored in 0.9 s, baselines 4.1 s,
  0.9 GB peak memory;
- the Gaussian baseline is sampled in data space, x = mean + z (X_c - mean) / sqrt(n_c - 1) with
  z ~ N(0, I): exactly the Gaussian with the train pixels' sample covariance, without the D x D
  covariance (12288 x 12288 at 64x64x3).
Unlabelled data (manifest "labelled": false, one class; also a dataset with a single class) has no
classifier to train: the feature map is a PCA of the pooled pixels (REFERENCE_PCA = 32 components,
full SVD, fitted on the train split's images above) plus each image's distance from that subspace
(so that what the components miss still counts). The map is linear, so FD and KID see little
beyond the first two moments there: the Gaussian baseline comes close to the real-data floor on
FD (KID, precision and nn_ratio still tell it apart). eval/class_acc is not computed, nor the
baselines' class_acc. `not_applicable` gives the reason callers show instead of a number. The
baselines then fit the one class: the whole train split.
"""
from __future__ import annotations

import hashlib
import json
import math
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
REFERENCE_POOL_TO = 16      # colour or larger images: each channel average-pooled to at most 16x16
REFERENCE_MAX_TRAIN = 4000  # colour or larger images: at most this many train images stand for the split
REFERENCE_PCA = 32          # unlabelled data: PCA components of the label-free feature map (+ residual norm)
UNLABELLED = "not applicable (unlabelled: no classes)"
ONE_CLASS = "not applicable (one class: nothing to tell apart)"


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
    """k-NN manifold precision (fake inside the real manifold) and recall (real inside the fake one);
    a set of at most k items uses its farthest neighbour (NaN for a single item)."""
    if min(len(real), len(fake)) < 2:
        return float("nan"), float("nan")

    def radii(x: np.ndarray) -> np.ndarray:          # distance to the k-th neighbour, self excluded
        return np.sort(pairwise_distances(x, x), axis=1)[:, min(k, len(x) - 1)]
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

def pool_factor(image_shape: tuple[int, ...]) -> int:
    """The average-pooling factor that brings an (H, W[, C]) image to at most REFERENCE_POOL_TO per side."""
    return max(1, math.ceil(max(image_shape[:2]) / REFERENCE_POOL_TO))


def average_pool(x: np.ndarray, image_shape: tuple[int, ...], p: int) -> np.ndarray:
    """Flattened images (N, H*W*C) -> flattened (N, (H//p)*(W//p)*C), each channel averaged over p x p blocks."""
    if p == 1:
        return x
    h, w = image_shape[:2]
    c = image_shape[2] if len(image_shape) == 3 else 1
    img = x.reshape(len(x), h, w, c)[:, :h // p * p, :w // p * p]
    return img.reshape(len(x), h // p, p, w // p, p, c).mean((2, 4)).reshape(len(x), -1)


@dataclass
class ReferenceNet:
    """A fitted one-hidden-layer MLP: features = relu(pool(x) W0 + b0), logits = features W1 + b1.

    pool and image_shape: the average pooling applied to flattened images first (1: none)."""
    w0: np.ndarray
    b0: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    image_shape: tuple[int, ...] = ()
    pool: int = 1

    def inputs(self, x: np.ndarray) -> np.ndarray:       # (N, D) flattened images -> what the network sees
        return average_pool(x, self.image_shape, self.pool)

    def features(self, x: np.ndarray) -> np.ndarray:     # (N, D) in [0, 1] -> (N, hidden)
        return self.features_of_inputs(self.inputs(x))

    def features_of_inputs(self, x: np.ndarray) -> np.ndarray:   # images already pooled -> (N, hidden)
        return np.maximum(x @ self.w0 + self.b0, 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:      # (N, D) -> (N,) class ids
        return (self.features(x) @ self.w1 + self.b1).argmax(1)


@dataclass
class PCAFeatures:
    """The label-free feature map of unlabelled data: the PCA projection of the pooled pixels and the
    distance from the PCA subspace (without it, whatever the components miss, noise say, is invisible)."""
    mean: np.ndarray           # (D',)
    components: np.ndarray     # (k, D')
    image_shape: tuple[int, ...] = ()
    pool: int = 1
    reason: str = UNLABELLED

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return average_pool(x, self.image_shape, self.pool)

    def features(self, x: np.ndarray) -> np.ndarray:     # (N, D) in [0, 1] -> (N, k + 1)
        return self.features_of_inputs(self.inputs(x))

    def features_of_inputs(self, x: np.ndarray) -> np.ndarray:   # images already pooled -> (N, k + 1)
        centred = x - self.mean
        z = centred @ self.components.T
        residual = np.linalg.norm(centred - z @ self.components, axis=1, keepdims=True)
        return np.concatenate([z, residual], 1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise ImageMetricsError(f"reference: no classifier for this dataset, class predictions are {self.reason}; "
                                "skip class-based metrics (see components.evaluation.images.not_applicable)")


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


def fit_pca_features(x: np.ndarray, k: int = REFERENCE_PCA) -> PCAFeatures:
    """The label-free feature map: PCA (full SVD: deterministic) of flattened pooled images x (N, D')."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    k = max(1, min(k, x.shape[1], len(x) - 1))
    with threadpool_limits(1):
        pca = PCA(n_components=k, svd_solver="full", random_state=REFERENCE_SEED).fit(x)
    return PCAFeatures(pca.mean_, pca.components_)


@dataclass(frozen=True)
class Recipe:
    """How the reference of one dataset is built; `plain` is the original recipe (grey, <= 16x16, classes)."""
    image_shape: tuple[int, ...]   # (H, W) grey, (H, W, C) colour
    channels: int
    labelled: bool                 # a classifier can be trained: labels and at least two classes
    reason: str                    # why class metrics are not applicable ("" when labelled)

    @property
    def plain(self) -> bool:
        return self.labelled and self.channels == 1 and max(self.image_shape[:2]) <= REFERENCE_POOL_TO

    @property
    def pool(self) -> int:
        return 1 if self.plain else pool_factor(self.image_shape)

    @property
    def max_train(self) -> Optional[int]:
        return None if self.plain else REFERENCE_MAX_TRAIN

    def key(self) -> dict:
        """What changes the features beyond the data (in the cache hash; the plain recipe adds nothing)."""
        return {"channels": self.channels, "image_shape": list(self.image_shape), "pool": self.pool,
                "pool_to": REFERENCE_POOL_TO, "max_train": self.max_train,
                "features": "mlp" if self.labelled else f"pca{REFERENCE_PCA}"}


def manifest_recipe(manifest: dict) -> Recipe:
    """The reference recipe a prepared manifest calls for ("channels" absent: 1; "labelled" absent: True)."""
    c = int(manifest.get("channels", 1))
    s = int(manifest.get("image_size", 8))
    classes = manifest.get("classes") or []
    if manifest.get("labelled", True) is False:
        reason = UNLABELLED
    elif len(classes) < 2:
        reason = ONE_CLASS
    else:
        reason = ""
    return Recipe((s, s) if c == 1 else (s, s, c), c, not reason, reason)


def not_applicable(dataset: str, root: Path) -> dict[str, str]:
    """{metric: why} for the metrics this dataset cannot have (names without prefix); {} for labelled data.

    Unlabelled data: {"class_acc": "not applicable (unlabelled: no classes)"}: show it where the
    number would be (eval/class_acc and every baseline's class_acc are left out of the metrics).
    """
    from components.data import load_manifest

    reason = manifest_recipe(load_manifest(dataset, Path(root))).reason
    return {"class_acc": reason} if reason else {}


@dataclass
class Reference:
    """Everything samples are compared with, for one prepared dataset."""
    net: ReferenceNet          # or PCAFeatures (unlabelled data): .features(x), .inputs(x)
    levels: int
    image_shape: tuple[int, ...]   # (H, W) grey, (H, W, C) colour: the shape of one sample
    num_classes: int
    train_x: np.ndarray        # (N_train, D) float64 in [0, 1] (float32 beyond the plain recipe)
    train_y: np.ndarray
    train_features: np.ndarray
    val_x: np.ndarray          # (N_val, D): picks the KDE baseline's bandwidth
    val_y: np.ndarray
    test_x: np.ndarray         # (N_test, D)
    test_y: np.ndarray
    test_nn: float             # median NN distance test -> train (the nn_ratio denominator)
    labelled: bool = True      # False: no classifier, no class_acc (see not_applicable)
    plain: bool = True         # the original recipe (grey, <= 16x16, labelled): every number as before
    train_nn: Optional[np.ndarray] = None   # train images as nn_ratio compares them (pooled); None: train_x

    @property
    def nn_train(self) -> np.ndarray:
        return self.train_x if self.train_nn is None else self.train_nn


def data_hash(manifest: dict) -> str:
    """Short hash of the prepared files (their md5s) and of the reference recipe."""
    recipe = manifest_recipe(manifest)
    parts = [manifest.get("files", {}), REFERENCE_HIDDEN, REFERENCE_SEED, REFERENCE_ALPHA]
    if not recipe.plain:   # the plain recipe keeps its hash: references cached before colour stay valid
        parts.append(recipe.key())
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_unit(x: np.ndarray, levels: int, dtype=np.float64) -> np.ndarray:
    """uint8 levels (N, H, W) or (N, H, W, C) -> flattened floats (N, H*W*C) in [0, 1]."""
    return x.reshape(len(x), -1).astype(dtype) / dtype(levels - 1)


def _capped(x: np.ndarray, y: np.ndarray, cap: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """At most `cap` images of a split, a balanced pick with the reference seed (all of them if fewer)."""
    if cap is None or len(y) <= cap:
        return x, y
    pick = balanced_pick(y, cap, REFERENCE_SEED)
    return x[pick], y[pick]


_REFERENCES: dict[tuple[str, str], Reference] = {}


def load_reference(dataset: str, root: Path) -> Reference:
    """The reference set of a prepared image dataset (reference net trained once, then cached)."""
    from components.data import image_channels, load_images, load_manifest

    root = Path(root)
    manifest = load_manifest(dataset, root)
    unlabelled = manifest.get("labelled", True) is False
    if manifest.get("kind") not in ("image", "captions") or not (manifest.get("classes") or unlabelled):
        raise ImageMetricsError(f"datasets.{dataset}: image metrics need images with classes (an image or "
                                f"labelled captions dataset), got {manifest.get('kind')!r} data")
    h = data_hash(manifest)
    key = (str(root.resolve()), h)
    if key in _REFERENCES:
        return _REFERENCES[key]
    recipe = manifest_recipe(manifest)
    levels = int(manifest["levels"])
    x_tr, y_tr = load_images(dataset, "train", root)
    shape = tuple(x_tr.shape[1:])
    if "image_size" in manifest and shape != recipe.image_shape:
        raise ImageMetricsError(f"data/prepared/{dataset}/train.npz: images of shape {shape}, the manifest says "
                                f"{recipe.image_shape}; run `genflow stage prepare {dataset}` again")
    recipe = Recipe(shape, image_channels(x_tr), recipe.labelled, recipe.reason)
    if recipe.plain:
        ref = _plain_reference(dataset, root, manifest, h, levels, x_tr, y_tr)
    else:
        ref = _pooled_reference(dataset, root, manifest, h, levels, recipe, x_tr, y_tr)
    _REFERENCES[key] = ref
    return ref


def _plain_reference(dataset: str, root: Path, manifest: dict, h: str, levels: int,
                     x_tr: np.ndarray, y_tr: np.ndarray) -> Reference:
    """Grey, at most 16x16, with classes: the network sees every pixel of every train image."""
    from components.data import load_images

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

    return Reference(net=net, levels=levels, image_shape=tuple(x_tr.shape[1:]),
                     num_classes=len(manifest["classes"]),
                     train_x=train_x, train_y=y_tr, train_features=net.features(train_x),
                     val_x=_to_unit(x_va, levels), val_y=y_va,
                     test_x=test_x, test_y=y_te, test_nn=median_nn_distance(test_x, train_x))


def _pooled_reference(dataset: str, root: Path, manifest: dict, h: str, levels: int, recipe: Recipe,
                      x_tr: np.ndarray, y_tr: np.ndarray) -> Reference:
    """Colour, larger or unlabelled images: pooled inputs, at most REFERENCE_MAX_TRAIN images per split."""
    from threadpoolctl import threadpool_limits

    from components.data import load_images

    cap, shape, pool = recipe.max_train, recipe.image_shape, recipe.pool
    x_tr, y_tr = _capped(x_tr, y_tr, cap)
    x_va, y_va = _capped(*load_images(dataset, "val", root), cap)
    x_te, y_te = _capped(*load_images(dataset, "test", root), cap)
    f32 = np.float32
    train_x, val_x, test_x = _to_unit(x_tr, levels, f32), _to_unit(x_va, levels, f32), _to_unit(x_te, levels, f32)
    train_in = average_pool(train_x, shape, pool).astype(np.float64)

    cache = Layout(root).cache / f"reference-{h}.npz"
    net: ReferenceNet | PCAFeatures
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            net = (ReferenceNet(z["w0"], z["b0"], z["w1"], z["b1"], shape, pool) if recipe.labelled
                   else PCAFeatures(z["mean"], z["components"], shape, pool, recipe.reason))
    else:
        if recipe.labelled:
            net = fit_reference_net(train_in, y_tr)
            net.image_shape, net.pool = shape, pool
            arrays = {"w0": net.w0, "b0": net.b0, "w1": net.w1, "b1": net.b1}
        else:
            net = fit_pca_features(train_in)
            net.image_shape, net.pool, net.reason = shape, pool, recipe.reason
            arrays = {"mean": net.mean, "components": net.components}
        with atomic_file(cache) as tmp:
            np.savez(tmp, **arrays)

    with threadpool_limits(1):
        test_in = average_pool(test_x, shape, pool).astype(np.float64)
        return Reference(net=net, levels=levels, image_shape=shape,
                         num_classes=len(manifest["classes"]) if recipe.labelled else 1,
                         train_x=train_x, train_y=y_tr if recipe.labelled else np.zeros_like(y_tr),
                         train_features=net.features_of_inputs(train_in),
                         val_x=val_x, val_y=y_va if recipe.labelled else np.zeros_like(y_va),
                         test_x=test_x, test_y=y_te if recipe.labelled else np.zeros_like(y_te),
                         test_nn=median_nn_distance(test_in, train_in), labelled=recipe.labelled, plain=False,
                         train_nn=train_in)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def score(x: np.ndarray, labels: Optional[np.ndarray], ref: Reference) -> dict[str, float]:
    """The metrics of flattened images x (N, D) in [0, 1] against a reference set (names without prefix).

    class_acc only with labels and a labelled reference (see not_applicable)."""
    x = np.asarray(x, dtype=np.float64)     # float32 splits (beyond the plain recipe) score as samples do
    x_in = ref.net.inputs(x)                 # the pixels themselves for the plain recipe, else pooled
    feats = ref.net.features_of_inputs(x_in)
    precision, recall = precision_recall(ref.train_features, feats)
    out = {"fd": frechet_distance(feats, ref.train_features),
           "kid": kernel_distance(feats, ref.train_features),
           "precision": precision, "recall": recall}
    if labels is not None and ref.labelled:
        out["class_acc"] = float((ref.net.predict(x) == labels).mean())
    out["nn_ratio"] = median_nn_distance(x_in, ref.nn_train) / max(ref.test_nn, 1e-12)
    return out


def _shape_words(shape: tuple[int, ...]) -> str:
    return "(N, " + ", ".join(map(str, shape)) + ")" + (" (channels last)" if len(shape) == 3 else "")


def _check_samples(samples: np.ndarray, labels: Optional[np.ndarray], ref: Reference, dataset: str) -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 1 + len(ref.image_shape) or tuple(samples.shape[1:]) != ref.image_shape:
        hint = ""
        if len(ref.image_shape) == 3 and samples.ndim == 4 and samples.shape[1] == ref.image_shape[2]:
            hint = "; convert (N, C, H, W) model output with components.data.from_nchw"
        raise ImageMetricsError(f"samples: shape {samples.shape}, expected {_shape_words(ref.image_shape)} "
                                f"for dataset {dataset}{hint}")
    if len(samples) < PR_K + 2:
        raise ImageMetricsError(f"samples: {len(samples)} images are too few to score; give at least {PR_K + 2}")
    if not np.isfinite(samples).all() or samples.min() < 0 or samples.max() > 1:
        raise ImageMetricsError("samples: values must be finite and in [0, 1] (scale images before scoring)")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(samples),):
            raise ImageMetricsError(f"labels: shape {labels.shape}, expected ({len(samples)},)")
        # unlabelled data: labels are not scored (no class_acc), so any ids are accepted
        if ref.labelled and labels.size and (labels.min() < 0 or labels.max() >= ref.num_classes):
            raise ImageMetricsError(f"labels: values must be class ids 0..{ref.num_classes - 1}")
    return samples.reshape(len(samples), -1).astype(np.float64)


def image_metrics(samples: np.ndarray, labels: Optional[np.ndarray], dataset: str, root: Path) -> dict[str, float]:
    """eval/fd, eval/kid, eval/precision, eval/recall, eval/class_acc (if labels), eval/nn_ratio.

    samples: (N, H, W) grey or (N, H, W, C) colour float32 in [0, 1]; labels: (N,) int64 class each
    sample was drawn for, or None. Unlabelled data: no eval/class_acc whatever the labels (show
    not_applicable(dataset, root) instead). Compare against baselines computed with the same N
    (image_baselines(dataset, root, n=N)).
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
    """One full-covariance Gaussian per class fitted to train pixels; (N, D) samples.

    Beyond the plain recipe it is sampled in data space (mean + z (X_c - mean) / sqrt(n_c - 1),
    z ~ N(0, I_{n_c})): the same Gaussian, without forming the D x D covariance.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((len(labels), ref.train_x.shape[1]))
    for c in np.unique(labels):
        xc = ref.train_x[ref.train_y == c]
        where = np.flatnonzero(labels == c)
        if ref.plain:
            out[where] = rng.multivariate_normal(xc.mean(0), np.cov(xc, rowvar=False), size=len(where),
                                                 method="eigh")
        else:
            mean = xc.mean(0, dtype=np.float64)
            z = rng.standard_normal((len(where), len(xc)))
            out[where] = mean + (z @ (xc - mean)) / math.sqrt(max(len(xc) - 1, 1))
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
    with labels cycling over the classes, fitted on the train split. Unlabelled data: one class
    (the whole train split) and no class_acc.
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
    """Write samples (N, H, W) grey or (N, H, W, 3) colour in [0, 1] as a PNG grid (mode L or RGB),
    `nrow` images per row, each upscaled to ~`cell` px (grey padding between them).

    For a class-conditional grid, order samples class by class so that each row is one class.
    """
    samples = np.clip(np.asarray(samples, dtype=np.float64), 0, 1)
    if samples.ndim == 4 and samples.shape[-1] == 1:
        samples = samples[..., 0]
    if samples.ndim == 4 and samples.shape[-1] == 3:
        return _save_rgb_grid(samples, Path(path), nrow, cell, pad)
    if samples.ndim != 3:
        raise ImageMetricsError(f"samples: shape {samples.shape}: a grid takes (N, H, W) grey or (N, H, W, 3) "
                                "colour images (channels last; components.data.from_nchw converts model output)")
    from PIL import Image

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


def _save_rgb_grid(samples: np.ndarray, path: Path, nrow: int, cell: int, pad: int) -> Path:
    from PIL import Image

    n, h, w, _ = samples.shape
    scale = max(1, cell // max(h, w))
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h * scale + pad) + pad, nrow * (w * scale + pad) + pad, 3), 0.5)
    for i, img in enumerate(samples):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[y0:y0 + h * scale, x0:x0 + w * scale] = img.repeat(scale, 0).repeat(scale, 1)
    with atomic_file(path) as tmp:
        Image.fromarray(np.round(grid * 255).astype(np.uint8), mode="RGB").save(tmp)
    return path
