"""Inpainting metrics and baselines: masks, scores on constructed cases, the nearest-neighbour fill, names."""
import numpy as np
import pytest

from components.evaluation import editing as ed
from components.evaluation.images import ImageMetricsError

# --- masks --------------------------------------------------------------------


def test_the_four_masks_regenerate_the_region_they_name():
    masks = ed.inpaint_masks(3, 8, 8, seed=1)
    assert list(masks) == list(ed.MASKS)
    hole = {k: ~v for k, v in masks.items()}
    assert hole["bottom"][0, 4:].all() and not hole["bottom"][0, :4].any()
    assert hole["left"][0, :, :4].all() and not hole["left"][0, :, 4:].any()
    assert hole["centre"][0, 2:6, 2:6].all() and hole["centre"][0].sum() == 16
    assert (hole["random"].reshape(3, -1).sum(1) == 32).all()                 # half of each image
    assert not np.array_equal(hole["random"][0], hole["random"][1])           # drawn per image
    assert np.array_equal(ed.inpaint_masks(3, 8, 8, seed=1)["random"], masks["random"])  # and reproducible
    with pytest.raises(ImageMetricsError, match="'top' is not an inpainting mask"):
        ed.inpaint_masks(1, 8, 8, masks=("top",))


def test_raster_prefix_length_accepts_only_a_suffix_to_regenerate():
    masks = ed.inpaint_masks(2, 8, 8)
    assert ed.raster_prefix_length(masks["bottom"]) == 32
    for name in ("left", "centre", "random"):
        assert ed.raster_prefix_length(masks[name]) == -1


# --- scores on constructed cases -------------------------------------------------

def test_a_perfect_fill_has_zero_mse_and_the_images_own_border_consistency():
    truth = np.zeros((1, 4, 4))
    truth[0, 2:] = 1.0                                  # bottom half white: a jump of 1 across the mask border
    keep = np.ones((1, 4, 4), dtype=bool)
    keep[0, 2:] = False                                 # regenerate the bottom half
    labels = np.array([3])
    perfect = ed.score_inpaint(truth, truth, keep, labels, lambda x: np.full(len(x), 3))
    assert perfect["mse"] == 0.0
    assert perfect["consistency"] == 1.0                # 4 vertical pairs across the border, each differing by 1
    assert perfect["class_acc"] == 1.0
    smooth = truth.copy()
    smooth[0, 2:] = 0.0                                  # a fill that continues the top exactly
    s = ed.score_inpaint(smooth, truth, keep, labels, lambda x: np.full(len(x), 1))
    assert s["consistency"] == 0.0 and s["mse"] == 1.0 and s["class_acc"] == 0.0
    half = truth.copy()
    half[0, 2:, :2] = 0.5                                # wrong by 0.5 on 4 of the 8 filled pixels
    assert ed.masked_mse(half, truth, keep) == pytest.approx(0.25 * 4 / 8)
    assert ed.border_consistency(half, keep) == pytest.approx((0.25 * 2 + 1 * 2) / 4)


def test_border_consistency_counts_left_right_pairs_too():
    x = np.array([[[0.0, 1.0], [0.0, 1.0]]])
    keep = np.array([[[True, False], [True, False]]])   # left column kept
    assert ed.border_consistency(x, keep) == 1.0
    x2 = np.array([[[0.0, 0.5], [0.2, 0.2]]])
    assert ed.border_consistency(x2, keep) == pytest.approx((0.25 + 0.0) / 2)


def test_scores_refuse_completions_out_of_range():
    t, k = np.zeros((1, 2, 2)), np.array([[[True, False], [True, True]]])
    with pytest.raises(ImageMetricsError, match="in \\[0, 1\\]"):
        ed.score_inpaint(t + 2, t, k, np.array([0]), lambda x: np.zeros(len(x)))


# --- baselines -------------------------------------------------------------------

def test_nearest_neighbour_fill_takes_the_training_image_closest_on_the_kept_pixels():
    rng = np.random.default_rng(0)
    train = rng.random((50, 4, 4))
    truth = train[[7, 31]].copy()
    truth[:, 2:] = rng.random((2, 2, 4))                 # the hidden bottom differs from the training image
    keep = np.ones((2, 4, 4), dtype=bool)
    keep[:, 2:] = False
    keep[1, 0, 0] = False                                # masks differ per image
    filled = ed.nearest_neighbour_fill(truth, keep, train)
    np.testing.assert_array_equal(filled[0, 2:], train[7, 2:])       # hole from train[7]
    np.testing.assert_array_equal(filled[0, :2], truth[0, :2])       # kept pixels untouched
    np.testing.assert_array_equal(filled[1][~keep[1]], train[31][~keep[1]])
    decoy = train.copy()
    decoy[3, :2] = truth[0, :2]                          # same kept pixels, another bottom: a tie is the first
    decoy[3, 2:] = 0.0
    assert np.array_equal(ed.nearest_neighbour_fill(truth[:1], keep[:1], decoy)[0, 2:], decoy[3, 2:])


def test_mean_fill_uses_the_per_pixel_training_mean():
    train = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
    truth = np.full((1, 2, 2), 0.2)
    keep = np.array([[[True, False], [True, True]]])
    np.testing.assert_array_equal(ed.mean_fill(truth, keep, train), [[[0.2, 0.5], [0.2, 0.2]]])


# --- the evaluation on the digits --------------------------------------------------

def test_inpaint_evaluation_names_every_mask_its_mean_and_the_baselines(digits_root):
    calls = []

    def truth_back(levels, keep):           # a perfect completer: returns the image it was given
        calls.append(keep.shape)
        return levels / 16.0

    m = ed.inpaint_evaluation(truth_back, "digits", digits_root, n=20)
    assert calls == [(20, 8, 8)] * 4
    for mask in ed.MASKS:
        assert m[f"eval/inpaint_{mask}_mse"] == 0.0
        assert m[f"eval/inpaint_{mask}_class_acc"] == m[f"baseline/real_inpaint_{mask}_class_acc"]
        assert m[f"eval/inpaint_{mask}_consistency"] == m[f"baseline/real_inpaint_{mask}_consistency"]
        assert m[f"baseline/nn_inpaint_{mask}_mse"] > 0 and m[f"baseline/mean_inpaint_{mask}_mse"] > 0
    for k in ed.INPAINT_METRICS:
        assert m[f"eval/inpaint_{k}"] == pytest.approx(np.mean([m[f"eval/inpaint_{x}_{k}"] for x in ed.MASKS]))
        assert f"baseline/nn_inpaint_{k}" in m and f"baseline/mean_inpaint_{k}" in m
    assert m["perf/inpaint_ms_per_item"] >= 0 and m["perf/inpaint_seconds"] > 0
    # the nearest neighbour in the training set beats the blurry mean on the digits
    assert m["baseline/nn_inpaint_class_acc"] > m["baseline/mean_inpaint_class_acc"]

    one = ed.inpaint_evaluation(truth_back, "digits", digits_root, n=20, masks=("bottom",))
    assert "eval/inpaint_bottom_class_acc" in one and "eval/inpaint_class_acc" not in one  # no mean of one mask
    assert one["baseline/nn_inpaint_bottom_mse"] == m["baseline/nn_inpaint_bottom_mse"]    # same images, same masks
