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
