"""`genflow run --only digits-sr` end to end at tiny settings (real Prefect harness, MLflow store, DVC, GX),
then `genflow sample digits-sr@champion --upscale` from the registered version."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

KEY = "digits-sr"
TINY_SR = [f"models.{KEY}.{k}" for k in (
    "unet.channels=[8, 16]", "unet.time_dim=16", "unet.groups=4", "diffusion.timesteps=20", "sample.steps=5",
    "train.max_steps=6", "train.batch_size=16", "train.checkpoint_every=3", "eval.num_samples=30")]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_run_only_digits_sr_trains_exports_registers_and_upscales(harness, project_clone, tmp_path, monkeypatch,
                                                                   project_root):
    from components.config import load_params
    from flows.cli import main
    from flows.retrain import run_pipeline

    monkeypatch.chdir(project_clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    summary = run_pipeline(load_params(project_clone / "params.yaml", TINY_SR), project_clone, only=[KEY],
                           overrides=TINY_SR)
    assert summary["status"] == "completed", summary
    assert list(summary["models"]) == [KEY]                       # off by default, on with --only
    m = summary["models"][KEY]
    assert m["status"] == "trained" and m["version"] == "1" and "champion" in m["aliases"], m
    assert m["parity_max_abs"] < 1e-4
    for name in ("eval/sr", "baseline/bicubic", "baseline/nearest"):
        assert all(np.isfinite(m["metrics"][f"{name}_{k}"]) for k in ("psnr", "class_acc", "fd")), m["metrics"]
    exported = json.loads((project_clone / "exports" / KEY / "config.json").read_text())
    assert exported["graph"] == "sr_denoiser" and exported["inputs"][-1]["name"] == "lowres"
    checker = project_root.parent / "shared" / "checks" / "last_run.py"
    if checker.exists():
        res = subprocess.run([sys.executable, str(checker), str(project_clone / "reports/last_run.json")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout

    small = tmp_path / "small.png"
    Image.fromarray(np.tile(np.array([0, 255, 255, 0], np.uint8), (4, 1)), "L").save(small)
    out = tmp_path / "up.png"
    assert main(["sample", f"{KEY}@champion", "--upscale", str(small), "-n", "2", "--out", str(out)]) == 0
    assert Image.open(out.with_name("up-2.png")).size == (8, 8)
