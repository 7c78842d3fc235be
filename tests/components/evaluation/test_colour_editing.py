"""Editing metrics on colour images (N, H, W, 3): inpainting with per-pixel masks over every channel,
super-resolution PSNR over every channel; class accuracy not applicable on an unlabelled dataset."""
import numpy as np
import pytest

from colour_data import LEVELS, SIZE, make_colour_dataset
from components import data
from components.evaluation import editing
from components.evaluation import superres as sr
from components.evaluation.images import UNLABELLED


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = make_colour_dataset(tmp_path_factory.mktemp("colour-edit"), "colours")
    return make_colour_dataset(root, "blobs", labelled=False)


def test_masked_mse_and_fills_use_every_channel_of_a_regenerated_pixel():
    truth = np.zeros((1, 2, 2, 3))
    keep = np.array([[[True, False], [True, True]]])
    filled = truth.copy()
    filled[0, 0, 1] = [1.0, 0.0, 0.0]                     # the one regenerated pixel: red where black was
    assert editing.masked_mse(filled, truth, keep) == pytest.approx(1 / 3)   # 1 of its 3 channels off by 1
    filled[0, 1, 1] = [1.0, 1.0, 1.0]                     # a kept pixel: not part of the mse
    assert editing.masked_mse(filled, truth, keep) == pytest.approx(1 / 3)
    train = np.stack([np.full((2, 2, 3), 0.5), np.full((2, 2, 3), 0.25)])
    mean = editing.mean_fill(truth, keep, train)
    assert mean.shape == truth.shape
    np.testing.assert_allclose(mean[0, 0, 1], [0.375] * 3) and np.testing.assert_array_equal(mean[0, 0, 0], 0)
    near = editing.nearest_neighbour_fill(np.full((1, 2, 2, 3), 0.3), keep, train)
    np.testing.assert_allclose(near[0, 0, 1], [0.25] * 3)      # nearest on the kept pixels: the 0.25 image
    np.testing.assert_allclose(near[0, 0, 0], [0.3] * 3)       # kept pixels stay


def test_inpainting_evaluation_of_a_colour_dataset(root):
    seen = {}

    def perfect(levels, keep):     # gives back the truth: mse 0, the real images' class accuracy
        seen["shapes"] = (levels.shape, keep.shape)
        return levels / np.float32(LEVELS - 1)

    m = editing.inpaint_evaluation(perfect, "colours", root, n=6, masks=("bottom", "random"))
    assert seen["shapes"] == ((6, SIZE, SIZE, 3), (6, SIZE, SIZE))
    assert m["eval/inpaint_bottom_mse"] < 1e-12 and m["baseline/nn_inpaint_bottom_mse"] > 0
    assert m["eval/inpaint_bottom_class_acc"] == m["baseline/real_inpaint_bottom_class_acc"]
    assert np.isfinite(m["eval/inpaint_random_consistency"])


def test_class_accuracy_is_not_applicable_on_an_unlabelled_dataset(root, monkeypatch):
    assert editing.class_metrics_reason("colours", root) is None
    assert editing.class_metrics_reason("blobs", root) == UNLABELLED
    m = editing.inpaint_evaluation(lambda lv, keep: lv / np.float32(LEVELS - 1), "blobs", root, n=5)
    assert not [k for k in m if "class_acc" in k]
    assert m["eval/inpaint_mse"] < 1e-12 and "baseline/mean_inpaint_consistency" in m

    asked = []

    def image_metrics(images, labels, dataset, root):   # the shared image metrics: class_acc only with labels
        asked.append(labels)
        return {"eval/fd": 1.0, **({} if labels is None else {"eval/class_acc": 0.5})}

    monkeypatch.setattr(sr, "image_metrics", image_metrics)
    x, y = data.load_images("blobs", "test", root)
    originals = x[:4] / np.float32(LEVELS - 1)
    from components.sampling.superres import downsample_images

    low = downsample_images(x[:4], 2, LEVELS) / np.float32(LEVELS - 1)
    metrics = sr.superres_metrics(originals, low, originals, y[:4], "blobs", root, 2, LEVELS)
    assert asked == [None, None, None]
    assert metrics["eval/sr_psnr"] == float("inf") and "eval/sr_class_acc" not in metrics
    table = sr.superres_table(metrics)
    assert table.count(UNLABELLED) == 3 and "nan" not in table
    labelled = sr.superres_metrics(originals, low, originals, y[:4], "colours", root, 2, LEVELS)
    assert labelled["eval/sr_class_acc"] == 0.5 and UNLABELLED not in sr.superres_table(labelled)


def test_psnr_counts_every_channel():
    a = np.zeros((2, 4, 4, 3))
    b = a.copy()
    b[..., 0] = 0.1                                   # one channel in three off by 0.1: mse 0.01 / 3
    assert sr.psnr(b, a) == pytest.approx(10 * np.log10(3 / 0.01))
