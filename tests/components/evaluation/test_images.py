"""Image metrics and baselines: distances, real-vs-real floor, memorisation, errors, sample grid."""
import numpy as np
import pytest

from components import data
from components.evaluation import images as im


def unit(x):
    return x.astype(np.float32) / 16


# --- distances (pure) --------------------------------------------------------

def test_frechet_distance_closed_form():
    a = np.random.default_rng(0).normal(size=(500, 4))
    assert im.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert im.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert im.frechet_distance(a, 2 * a) > 0.5   # same mean, wider spread


def test_kernel_distance_and_precision_recall():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    assert abs(im.kernel_distance(a, b)) < 0.05
    assert im.kernel_distance(a, b + 3) > 1.0
    assert im.precision_recall(a, a) == (1.0, 1.0)
    assert im.precision_recall(a, b + 50) == (0.0, 0.0)
    p, r = im.precision_recall(a, 0.1 * b)       # fakes collapsed near the middle: precise, poor recall
    assert p > 0.9 and r < 0.5


# --- metrics on the digits --------------------------------------------------------

def test_real_test_images_score_as_the_floor_below_the_baselines(digits_root):
    x, y = data.load_images("digits", "test", digits_root)
    base = im.image_baselines("digits", digits_root, n=len(x))
    real = im.image_metrics(unit(x), y, "digits", digits_root)
    for m in im.METRICS:                          # the floor is exactly the real test split's score
        assert real[f"eval/{m}"] == pytest.approx(base[f"baseline/real_{m}"])
    assert real["eval/nn_ratio"] == pytest.approx(1.0)
    assert real["eval/class_acc"] > 0.93
    assert base["baseline/real_fd"] < 0.8 * base["baseline/kde_fd"]
    assert base["baseline/real_fd"] < 0.8 * base["baseline/gaussian_fd"]
    assert set(base) == {f"baseline/{b}_{m}" for b in ("real", "kde", "gaussian") for m in im.METRICS}


def test_copies_of_training_images_are_flagged_as_memorised(digits_root):
    x, y = data.load_images("digits", "train", digits_root)
    pick = im.balanced_pick(y, 300, seed=0)
    copies = im.image_metrics(unit(x[pick]), y[pick], "digits", digits_root)
    assert copies["eval/nn_ratio"] < 0.01
    assert copies["eval/precision"] == 1.0


def test_bad_samples_score_badly(digits_root):
    x, y = data.load_images("digits", "test", digits_root)
    floor = im.image_metrics(unit(x), y, "digits", digits_root)
    noise = np.random.default_rng(0).random(x.shape).astype(np.float32)
    bad = im.image_metrics(noise, y, "digits", digits_root)
    assert bad["eval/fd"] > 5 * floor["eval/fd"] and bad["eval/precision"] < 0.2
    wrong = im.image_metrics(unit(x), (y + 1) % 10, "digits", digits_root)
    assert wrong["eval/class_acc"] < 0.2
    assert "eval/class_acc" not in im.image_metrics(unit(x), None, "digits", digits_root)


def test_reference_net_is_cached_by_data_hash(digits_root):
    im.load_reference("digits", digits_root)
    cached = list((digits_root / ".genflow" / "cache").glob("reference-*.npz"))
    assert len(cached) == 1
    h = im.data_hash(data.load_manifest("digits", digits_root))
    assert cached[0].name == f"reference-{h}.npz"


@pytest.mark.parametrize("samples,labels,match", [
    (np.zeros((10, 4, 4), np.float32), None, "shape"),
    (np.full((10, 8, 8), 2.0, np.float32), None, r"\[0, 1\]"),
    (np.zeros((10, 8, 8), np.float32), np.arange(5), "labels"),
    (np.zeros((10, 8, 8), np.float32), np.full(10, 10), "class ids"),
])
def test_unusable_samples_are_refused(digits_root, samples, labels, match):
    with pytest.raises(im.ImageMetricsError, match=match):
        im.image_metrics(samples, labels, "digits", digits_root)


def test_balanced_pick_keeps_classes_even():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    counts = np.bincount(y[im.balanced_pick(y, 20, seed=1)], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]


def test_save_grid_writes_one_row_per_class(tmp_path):
    from PIL import Image
    samples = np.tile(np.linspace(0, 1, 30, dtype=np.float32)[:, None, None], (1, 8, 8))
    path = im.save_grid(samples, tmp_path / "grid.png", nrow=10)
    img = np.asarray(Image.open(path))
    assert img.shape == (3 * (32 + 2) + 2, 10 * (32 + 2) + 2)
    assert img[2 + 16, 2 + 16] == 0 and img[2 + 2 * 34 + 16, 2 + 9 * 34 + 16] == 255
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# --- colour, larger and unlabelled images ------------------------------------------
# Prepared splits are written the way components/data.py writes them (save_npz, manifest with the
# files' md5s, "channels" and "labelled"), from arrays: each class a colour and a shape.

COLOUR_LEVELS = 16


def colour_images(n_per_class: int, size: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 in 0..15: class 0 a red square, 1 a green disc, 2 a blue bar, at random places."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    xs, ys = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            img = 0.1 * rng.random((size, size, 3))
            r = size // 4
            cy, cx = rng.integers(r, size - r, 2)
            shape = [(abs(yy - cy) < r) & (abs(xx - cx) < r), (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
                     (abs(yy - cy) < r // 2 + 1)][c % 3]
            img[shape, c % 3] = 0.7 + 0.3 * rng.random()
            xs.append(img)
            ys.append(c)
    x = np.round(np.clip(np.array(xs), 0, 1) * (COLOUR_LEVELS - 1)).astype(np.uint8)
    return x, np.array(ys, dtype=np.int64)


def write_prepared(root, name, x, y, classes, labelled=True):
    from components.config import SplitConfig
    from components.files import write_json

    out = data.prepared_dir(name, root)
    out.mkdir(parents=True)
    idx = data.split_indices(len(y), SplitConfig(), labels=y)
    for s in data.SPLITS:
        data.save_npz(out / f"{s}.npz", x=x[idx[s]], y=y[idx[s]])
    manifest = {"name": name, "kind": "image", "source": f"imagefolder:{name}", "image_size": x.shape[1],
                "levels": COLOUR_LEVELS, "classes": classes, "channels": x.shape[-1] if x.ndim == 4 else 1,
                "labelled": labelled, "counts": {s: int(len(idx[s])) for s in data.SPLITS},
                "files": data.tree_md5s(out)}
    write_json(out / "manifest.json", manifest)
    return root


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory):
    """rgb16, rgb32: 3 classes x 40 colour images; plain16: 300 such images, unlabelled; single16: one class."""
    root = tmp_path_factory.mktemp("colour")
    for size in (16, 32):
        x, y = colour_images(40, size)
        write_prepared(root, f"rgb{size}", x, y, ["red", "green", "blue"])
    x, y = colour_images(100, 16, seed=1)
    write_prepared(root, "plain16", x, np.zeros_like(y), ["images"], labelled=False)
    write_prepared(root, "single16", x[y == 1], y[y == 1] * 0, ["green"])
    return root


def colour_unit(x):
    return x.astype(np.float32) / (COLOUR_LEVELS - 1)


@pytest.mark.parametrize("size,pool", [(16, 1), (32, 2)])
def test_colour_reference_features_pool_to_16_and_classify(colour_root, size, pool):
    ref = im.load_reference(f"rgb{size}", colour_root)
    assert ref.image_shape == (size, size, 3) and ref.net.pool == pool and not ref.plain
    assert ref.net.w0.shape == (16 * 16 * 3, im.REFERENCE_HIDDEN)        # at most 16x16 per channel
    assert ref.train_features.shape == (len(ref.train_x), im.REFERENCE_HIDDEN)
    assert np.isfinite(ref.train_features).all() and ref.train_features.std(0).max() > 0
    x, y = data.load_images(f"rgb{size}", "test", colour_root)
    assert (ref.net.predict(colour_unit(x).reshape(len(x), -1)) == y).mean() > 0.9


def test_pooling_averages_each_channel_separately():
    x = np.zeros((1, 4, 4, 3))
    x[0, :2, :2, 0], x[0, :, :, 2] = 1.0, 0.5
    pooled = im.average_pool(x.reshape(1, -1), (4, 4, 3), 2).reshape(2, 2, 3)
    assert pooled[..., 0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and (pooled[..., 1] == 0).all()
    assert (pooled[..., 2] == 0.5).all()
    assert [im.pool_factor((s, s, 3)) for s in (8, 16, 32, 64)] == [1, 1, 2, 4]


def test_colour_cache_key_follows_channels_size_and_labels(colour_root):
    m = data.load_manifest("rgb32", colour_root)
    hashes = {im.data_hash(m), im.data_hash({**m, "channels": 1}), im.data_hash({**m, "image_size": 64}),
              im.data_hash({**m, "labelled": False})}
    assert len(hashes) == 4
    im.load_reference("rgb32", colour_root)
    assert (colour_root / ".genflow" / "cache" / f"reference-{im.data_hash(m)}.npz").exists()
    # the grey recipe's hash is the one it always had: files and the three reference constants
    grey = {"files": {"train.npz": "x"}, "image_size": 8, "classes": ["a", "b"]}
    import hashlib
    import json
    blob = json.dumps([grey["files"], im.REFERENCE_HIDDEN, im.REFERENCE_SEED, im.REFERENCE_ALPHA], sort_keys=True)
    assert im.data_hash(grey) == hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize("size", [16, 32])
def test_colour_fd_small_for_real_images_large_for_noise(colour_root, size):
    ds = f"rgb{size}"
    x, y = data.load_images(ds, "test", colour_root)
    real = im.image_metrics(colour_unit(x), y, ds, colour_root)
    noise = im.image_metrics(np.random.default_rng(0).random(x.shape).astype(np.float32), y, ds, colour_root)
    assert set(real) == {f"eval/{m}" for m in im.METRICS}
    assert real["eval/nn_ratio"] == pytest.approx(1.0) and real["eval/class_acc"] > 0.9
    assert noise["eval/fd"] > 10 * real["eval/fd"] and noise["eval/precision"] < 0.2
    grey = np.repeat(colour_unit(x).mean(-1, keepdims=True), 3, -1)     # the colour taken out
    assert im.image_metrics(grey, y, ds, colour_root)["eval/fd"] > 3 * real["eval/fd"]
    base = im.image_baselines(ds, colour_root, n=len(x))
    assert base["baseline/real_fd"] == pytest.approx(real["eval/fd"])
    assert set(base) == {f"baseline/{b}_{m}" for b in ("real", "kde", "gaussian") for m in im.METRICS}


def test_colour_samples_in_the_wrong_layout_are_refused(colour_root):
    x, y = data.load_images("rgb16", "test", colour_root)
    with pytest.raises(im.ImageMetricsError, match=r"expected \(N, 16, 16, 3\).*from_nchw"):
        im.image_metrics(colour_unit(x).transpose(0, 3, 1, 2), y, "rgb16", colour_root)
    with pytest.raises(im.ImageMetricsError, match=r"expected \(N, 16, 16, 3\)"):
        im.image_metrics(colour_unit(x).mean(-1), y, "rgb16", colour_root)


def test_gaussian_baseline_in_data_space_matches_the_covariance_route(colour_root):
    import dataclasses
    ref = im.load_reference("rgb16", colour_root)
    labels = im.cycling_labels(3000, 3)
    fast = im.gaussian_baseline(ref, labels, seed=0)                           # z (X_c - mean) / sqrt(n_c - 1)
    full = im.gaussian_baseline(dataclasses.replace(ref, plain=True), labels, seed=1)   # mean, D x D covariance
    assert fast.shape == full.shape == (3000, 16 * 16 * 3)
    for c in range(3):
        f, g = fast[labels == c], full[labels == c]
        assert np.abs(f.mean(0) - g.mean(0)).max() < 0.06
        assert f.std(0).mean() == pytest.approx(g.std(0).mean(), rel=0.05)
    assert np.abs(fast[labels == 0].mean(0) - fast[labels == 1].mean(0)).max() > 0.3   # classes stay apart


@pytest.mark.parametrize("ds,reason", [("plain16", im.UNLABELLED), ("single16", im.ONE_CLASS)])
def test_unlabelled_data_scores_without_class_accuracy(colour_root, ds, reason):
    assert im.not_applicable(ds, colour_root) == {"class_acc": reason}
    assert im.not_applicable("rgb16", colour_root) == {}
    ref = im.load_reference(ds, colour_root)
    assert isinstance(ref.net, im.PCAFeatures) and not ref.labelled and ref.num_classes == 1
    x, y = data.load_images(ds, "test", colour_root)
    want = {f"eval/{m}" for m in im.METRICS if m != "class_acc"}
    real = im.image_metrics(colour_unit(x), y, ds, colour_root)
    assert set(real) == want and real["eval/nn_ratio"] == pytest.approx(1.0)
    assert set(im.image_metrics(colour_unit(x), np.arange(len(x)), ds, colour_root)) == want   # labels ignored
    noise = im.image_metrics(np.random.default_rng(0).random(x.shape).astype(np.float32), None, ds, colour_root)
    assert noise["eval/fd"] > 10 * real["eval/fd"]
    base = im.image_baselines(ds, colour_root, n=len(x))
    assert set(base) == {f"baseline/{b}_{m}" for b in ("real", "kde", "gaussian") for m in im.METRICS
                         if m != "class_acc"}
    assert all(np.isfinite(v) for v in base.values()) and base["baseline/real_fd"] == pytest.approx(real["eval/fd"])
    with pytest.raises(im.ImageMetricsError, match="not applicable"):
        ref.net.predict(colour_unit(x).reshape(len(x), -1))


def test_colour_grid_is_rgb(tmp_path):
    from PIL import Image
    samples = np.zeros((12, 16, 16, 3), np.float32)
    samples[:, :, :, 0] = 1.0                         # red images
    samples[5, :, :] = [0.0, 0.0, 1.0]                # one blue
    path = im.save_grid(samples, tmp_path / "grid.png", nrow=5)
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (5 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    a = np.asarray(img)
    assert a[2 + 16, 2 + 16].tolist() == [255, 0, 0] and a[2 + 34 + 16, 2 + 16].tolist() == [0, 0, 255]
    assert a[0, 0].tolist() == [128, 128, 128]        # the padding stays grey
    with pytest.raises(im.ImageMetricsError, match="channels last"):
        im.save_grid(samples.transpose(0, 3, 1, 2), tmp_path / "bad.png")
