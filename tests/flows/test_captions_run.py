"""`genflow run --only captions-unet` end to end (tiny settings): validated, trained, evaluated, exported with
both graphs, registered as champion, sampled from a prompt by `genflow sample`; an unchanged rerun trains nothing."""
import pytest

pytestmark = pytest.mark.integration

TINY = ["models.captions-unet.unet.channels=[8, 16]", "models.captions-unet.unet.time_dim=16",
        "models.captions-unet.unet.groups=4", "models.captions-unet.textenc.n_layer=1",
        "models.captions-unet.textenc.n_embd=16", "models.captions-unet.textenc.n_head=2",
        "models.captions-unet.cross_attention.heads=2", "models.captions-unet.diffusion.timesteps=10",
        "models.captions-unet.sample.steps=3", "models.captions-unet.train.max_steps=4",
        "models.captions-unet.train.batch_size=8", "models.captions-unet.eval.num_samples=20",
        "models.captions-unet.eval.guidance_sweep=[1.0]"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_run_only_captions_unet_registers_a_model_that_samples_from_a_prompt(harness, project_clone, tmp_path,
                                                                              monkeypatch):
    from components.config import load_params
    from flows.cli import main
    from flows.retrain import run_pipeline

    monkeypatch.chdir(project_clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(project_clone / "params.yaml", TINY)
    summary = run_pipeline(params, project_clone, overrides=TINY, only=["captions-unet"])
    assert summary["status"] == "completed", summary
    m = summary["models"]["captions-unet"]
    assert m["status"] == "trained" and m["version"] == "1" and "champion" in m["aliases"], m
    assert m["parity_max_abs"] < 1e-4
    for name in ("eval/fd", "eval/prompt_acc", "eval/attribute_error", "baseline/label_only_attribute_error",
                 "baseline/real_attribute_error", "perf/sample_ms_per_item"):
        assert name in m["metrics"], name

    out = tmp_path / "seven.png"
    assert main(["sample", "captions-unet@champion", "--prompt", "a thick slanted seven", "-n", "2",
                 "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", "captions-unet@champion", "--prompt", "a seven?", "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()

    again = run_pipeline(load_params(project_clone / "params.yaml", TINY), project_clone, overrides=TINY,
                         only=["captions-unet"])
    assert again["models"]["captions-unet"]["status"] == "skipped"
