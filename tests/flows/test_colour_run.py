"""Users' own 32x32 colour images through every image model of params.yaml's colour preset
(`genflow run --quick --only photos-...`) on a synthetic RGB imagefolder (and a captioned one), tiny networks;
evaluated, exported and registered, then sampled torch-free by `genflow sample` into an RGB PNG. An
unlabelled folder (no class sub-folders) trains unconditionally; class accuracy is not applicable."""
import json

import numpy as np
import pytest
from PIL import Image

from colour_data import COLOURS, make_colour_imagefolder

pytestmark = pytest.mark.integration

UNET = ["unet.channels=[8, 16]", "unet.blocks_per_level=1", "unet.time_dim=16", "unet.groups=4"]
DENOISER = ["diffusion.timesteps=10", "sample.steps=3", "eval.sampler_sweep=[ddim3]"]
BUDGET = ["train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=3", "eval.num_samples=12",
          "eval.inpaint_samples=3"]
TINY = {
    "photos-unet": UNET + DENOISER + BUDGET,
    "photos-dit": ["dit.patch_size=4", "dit.width=32", "dit.depth=1", "dit.heads=2"] + DENOISER + BUDGET,
    "photos-gpt": ["gpt.n_layer=1", "gpt.n_head=2", "gpt.n_embd=16"] + BUDGET[:-2]
    + ["eval.num_samples=6", "eval.inpaint_samples=2", "train.batch_size=2"],
    "photos-sr": UNET + DENOISER + BUDGET,
    "photos-text-unet": UNET + DENOISER + BUDGET + [
        "textenc.n_layer=1", "textenc.n_embd=16", "textenc.n_head=2", "cross_attention.heads=2",
        "eval.guidance_sweep=[1.0]"],
    "photos-text-encdec": ["encdec.n_layer_enc=1", "encdec.n_layer_dec=1", "encdec.n_head=2", "encdec.n_embd=16"]
    + BUDGET[:-2] + ["eval.num_samples=6", "train.batch_size=2"],
}


def overrides(folder, captioned) -> list[str]:
    out = [f"datasets.photos.source=imagefolder:{folder}", f"datasets.photos-captions.source=imagefolder:{captioned}",
           "datasets.photos.image_validation.min_per_class=4",
           "datasets.photos-captions.caption_validation.min_images=8",
           "datasets.photos.split={val: 0.2, test: 0.2, seed: 0}",
           "datasets.photos-captions.split={val: 0.2, test: 0.25, seed: 0}"]
    for key, sets in TINY.items():
        out += [f"models.{key}.{s}" for s in sets]
    return out


def captioned_folder(folder):
    return make_colour_imagefolder(folder, per_class=10, size=32, seed=1, labelled=False,
                                   captions=lambda colour: [f"a {colour} square"])


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def assert_rgb_png(path, side=32):
    im = Image.open(path)
    assert im.mode == "RGB", im.mode
    px = np.asarray(im)
    assert px.shape[2] == 3 and min(px.shape[:2]) >= side
    assert np.abs(px[..., 0].astype(int) - px[..., 1]).max() > 0   # real colour, not grey in three channels


def test_every_image_model_runs_on_colour_photos_and_samples_in_colour(harness, project_clone, tmp_path,
                                                                       monkeypatch):
    from components.config import load_params
    from flows.cli import main
    from flows.retrain import run_pipeline

    monkeypatch.chdir(project_clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    photos = make_colour_imagefolder(tmp_path / "photos", per_class=12, size=48)   # resized to 32x32
    sets = overrides(photos, captioned_folder(tmp_path / "captioned"))
    params = load_params(project_clone / "params.yaml", sets)
    summary = run_pipeline(params, project_clone, only=list(TINY), overrides=sets, quick=True)
    assert summary["status"] == "completed", summary
    assert sorted(summary["models"]) == sorted(TINY)
    for key, m in summary["models"].items():
        assert m["status"] == "trained" and "champion" in m["aliases"], (key, m)
        assert json.loads((project_clone / "exports" / key / "config.json").read_text())["channels"] == 3, key
    for key in ("photos-unet", "photos-dit", "photos-gpt"):
        metrics = summary["models"][key]["metrics"]
        assert np.isfinite(metrics["eval/fd"]) and 0 <= metrics["eval/class_acc"] <= 1, (key, metrics)
    # 3072 tokens an image: no O(T^2) no-cache timing (resources.NOCACHE_MAX_TOKENS), the cached one kept
    gpt = summary["models"]["photos-gpt"]["metrics"]
    assert "perf/sample_ms_per_item" in gpt and "perf/sample_ms_per_item_nocache" not in gpt
    import mlflow  # the run says what prepare found: channels 3 (params left it to the files), labelled
    run = mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.search_experiments()],
                                            "attributes.run_name = 'photos-unet'")[0]
    assert run.data.params["dataset.channels"] == "3" and run.data.params["dataset.labelled"] == "true"

    for key in ("photos-unet", "photos-dit", "photos-gpt"):
        out = tmp_path / f"{key}.png"
        assert main(["sample", f"{key}@champion", "-n", "4", "--label", "1", "--out", str(out)]) == 0
        assert_rgb_png(out)
    for key in ("photos-text-unet", "photos-text-encdec"):
        out = tmp_path / f"{key}.png"
        assert main(["sample", f"{key}@champion", "--prompt", "a red square", "-n", "2", "--out", str(out)]) == 0
        assert_rgb_png(out)
    small = tmp_path / "small.png"
    Image.fromarray(np.asarray(Image.open(photos / "red" / "img_0.png").resize((16, 16))), "RGB").save(small)
    out = tmp_path / "up.png"
    assert main(["sample", "photos-sr@champion", "--upscale", str(small), "-n", "1", "--out", str(out)]) == 0
    assert_rgb_png(out)
    assert len(COLOURS) == 3


def test_unlabelled_colour_folder_trains_unconditionally(harness, project_clone, tmp_path, monkeypatch):
    from components.config import load_params
    from flows.retrain import run_pipeline

    monkeypatch.chdir(project_clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    photos = make_colour_imagefolder(tmp_path / "photos", per_class=10, size=32, labelled=False)
    sets = overrides(photos, tmp_path / "none")
    summary = run_pipeline(load_params(project_clone / "params.yaml", sets), project_clone,
                           only=["photos-unet"], overrides=sets, quick=True)
    assert summary["status"] == "completed", summary
    m = summary["models"]["photos-unet"]
    assert m["status"] == "trained" and np.isfinite(m["metrics"]["eval/fd"]), m
    assert "eval/class_acc" not in m["metrics"]   # not applicable: the folder has no classes
    manifest = json.loads((project_clone / "data/prepared/photos/manifest.json").read_text())
    assert manifest["labelled"] is False and manifest["channels"] == 3
