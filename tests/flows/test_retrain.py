"""The retrain flow end to end, under a real (test-harness) Prefect server and a real MLflow store."""
import json
import subprocess
import sys

import pytest

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.integration

CORPUS = "\n\n".join(m.__doc__ for m in __import__("importlib").import_module("pydoc").__dict__.values()
                     if isinstance(getattr(m, "__doc__", None), str) and len(m.__doc__) > 200)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(project_clone, tmp_path, monkeypatch):
    monkeypatch.chdir(project_clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((CORPUS + "\n\n") * 3)
    return project_clone, [*TINY_OVERRIDES, f"datasets.pydoc.source=textfile:{corpus}",
                           "datasets.pydoc.text_validation.min_chars=1000"]


def _run(root, overrides, **kw):
    from components.config import load_params
    from flows.retrain import run_pipeline

    params = load_params(root / "params.yaml", overrides)
    return run_pipeline(params, root, overrides=overrides, **kw)


def _versions(key):
    from mlflow import MlflowClient

    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name='{key}'"))


def test_flow_end_to_end_then_unchanged_rerun_trains_nothing(harness, workspace, project_root):
    root, overrides = workspace
    summary = _run(root, overrides)
    assert summary["status"] == "completed", summary
    for key in ("digits-unet", "digits-gpt", "pydoc-gpt"):
        m = summary["models"][key]
        assert m["status"] == "trained", (key, m)
        assert m["version"] == "1" and "champion" in m["aliases"]
        assert m["parity_max_abs"] < 1e-4
    doc = json.loads((root / "reports/last_run.json").read_text())
    assert doc["models"].keys() == summary["models"].keys()
    _assert_mfu_logged(summary)
    checker = project_root.parent / "shared" / "checks" / "last_run.py"
    if checker.exists():
        res = subprocess.run([sys.executable, str(checker), str(root / "reports/last_run.json")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout

    from flows.cli import main
    for spec, out in (("digits-unet@champion", "grid.png"), ("pydoc-gpt:1", "text.txt")):
        assert main(["sample", spec, "-n", "1", "--out", str(root / out)]) == 0
        assert (root / out).stat().st_size > 0

    again = _run(root, overrides)
    assert again["status"] == "completed"
    assert {m["status"] for m in again["models"].values()} == {"skipped"}
    fd = summary["models"]["digits-unet"]["metrics"]["eval/fd"]
    assert again["models"]["digits-unet"]["metrics"]["eval/fd"] == fd
    assert _versions("digits-unet") == [1]

    changed = _run(root, overrides + ["models.digits-gpt.train.max_steps=7"])
    status = {k: m["status"] for k, m in changed["models"].items()}
    assert status == {"digits-unet": "skipped", "digits-gpt": "trained", "pydoc-gpt": "skipped"}
    assert _versions("digits-gpt") == [1, 2]


def _assert_mfu_logged(summary):
    """Every trained model's MLflow run holds perf/mfu = achieved training FLOP/s over perf/peak_flops,
    and the summary table shows it."""
    from mlflow import MlflowClient

    from flows.retrain import summary_table

    client = MlflowClient()
    for key, m in summary["models"].items():
        run, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`genflow.model_key` = '{key}'")
        got = run.data.metrics
        achieved = got["perf/flops_per_item"] * got["perf/train_items_per_s"]
        assert got["perf/peak_flops"] > 0 and 0 < got["perf/mfu"]
        assert got["perf/mfu"] == pytest.approx(achieved / got["perf/peak_flops"], rel=1e-9)
        assert m["metrics"]["perf/mfu"] == got["perf/mfu"]
        assert f"| {got['perf/mfu']:.1%} |" in summary_table(summary)


def test_bad_dataset_stops_only_its_branch(harness, workspace, tmp_path):
    root, overrides = workspace
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 200 + b"\xff\xfe broken bytes\n")
    summary = _run(root, overrides + [f"datasets.pydoc.source=textfile:{bad}"],
                   only=["digits-gpt", "pydoc-gpt"])
    assert summary["status"] == "failed"
    assert summary["models"]["digits-gpt"]["status"] == "trained"
    failed = summary["models"]["pydoc-gpt"]
    assert failed["status"] == "failed" and "bad.txt" in failed["reason"] and "UTF-8" in failed["reason"]
    assert _versions("pydoc-gpt") == []
    # the Prefect flow run itself ends Failed, its message naming the failure and the reason
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        last_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert last_run.state.is_failed()
    assert "pydoc-gpt: data pydoc:" in last_run.state.message and "UTF-8" in last_run.state.message

    # every dataset bad: the flow still ends with the data's reason, and nothing is tracked or trained
    alone = _run(root, overrides + [f"datasets.pydoc.source=textfile:{bad}"], only=["pydoc-gpt"])
    assert alone["status"] == "failed" and "UTF-8" in alone["models"]["pydoc-gpt"]["reason"]
    assert not (root / "models" / "pydoc-gpt").exists()


def test_parity_failure_blocks_registration(harness, workspace):
    root, overrides = workspace
    summary = _run(root, overrides + ["export.parity_atol=1e-15"], only=["digits-unet"])
    m = summary["models"]["digits-unet"]
    assert summary["status"] == "failed" and m["status"] == "failed"
    assert "parity" in m["reason"] and "not registered" in m["reason"]
    assert _versions("digits-unet") == []


def test_transient_registry_error_is_retried(harness, workspace, monkeypatch):
    from components import registry

    root, overrides = workspace
    real, calls = registry.register_model, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("MLflow server restarting")
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "register_model", flaky)
    summary = _run(root, overrides, only=["digits-gpt"])
    assert summary["models"]["digits-gpt"]["status"] == "trained"
    assert len(calls) == 2 and _versions("digits-gpt") == [1]


def test_new_images_retrain_and_the_gate_compares_on_the_new_data(harness, workspace, tmp_path):
    """More images in an imagefolder source: a new snapshot (new DVC hash), the model retrains, and
    the champion is re-evaluated on the new data so the gate compares like with like."""
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image
    from sklearn.datasets import load_digits

    root, overrides = workspace
    digits = load_digits()
    src = tmp_path / "digits-folder"

    def add_images(start, stop):
        for i in range(start, stop):
            folder = src / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            px = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(px, mode="L").save(folder / f"{i}.png")

    add_images(0, 300)
    sets = overrides + [f"datasets.digits.source=imagefolder:{src}"]
    first = _run(root, sets, only=["digits-unet"])
    assert first["models"]["digits-unet"]["status"] == "trained" and _versions("digits-unet") == [1]
    hash_1 = MlflowClient().get_model_version("digits-unet", "1").tags["genflow.eval_data_hash"]
    # re-evaluation uses the registered checkpoint, not what lies in models/ now
    from components.config import load_params
    from flows.stages import evaluate_registered

    (root / "models" / "digits-unet" / "model.pt").write_bytes(b"not a checkpoint")
    again = evaluate_registered(load_params(root / "params.yaml", sets), "digits-unet",
                                MlflowClient().get_model_version("digits-unet", "1").run_id, root)
    assert again["eval/fd"] == first["models"]["digits-unet"]["metrics"]["eval/fd"]

    add_images(300, 450)
    second = _run(root, sets, only=["digits-unet"])
    m = second["models"]["digits-unet"]
    assert m["status"] == "trained" and _versions("digits-unet") == [1, 2]
    v2 = MlflowClient().get_model_version("digits-unet", "2").tags
    assert v2["genflow.eval_data_hash"] != hash_1   # a new snapshot of the data
    assert "champion re-evaluated on the new data" in v2["genflow.gate.reason"], v2["genflow.gate.reason"]
    aliases = MlflowClient().get_registered_model("digits-unet").aliases
    assert str(aliases["champion"]) == ("2" if v2["genflow.gate.decision"] == "promoted" else "1")
    assert not list((root / ".genflow").glob("reeval-*"))   # the scratch folder is gone


def test_an_error_of_the_run_itself_is_raised_not_summarised(harness, workspace, monkeypatch):
    """Not a model's failure (those are in the summary) but the flow's own: run_pipeline raises it
    from the flow's final state, for the CLI to print (a GenflowError) or show its traceback (a bug)."""
    import flows.retrain

    def broken(params, keys, root):
        return 1 / 0

    root, overrides = workspace
    monkeypatch.setattr(flows.retrain, "prepare_datasets", broken)
    with pytest.raises(ZeroDivisionError):
        _run(root, overrides, only=["digits-gpt"])
    assert not (root / "reports" / "last_run.json").exists()


def test_prefects_worker_thread_timeout_warning_is_dropped_and_other_task_logs_kept():
    """Prefect warns on every task run with a timeout in a worker thread; genflow's steps are Python
    loops its timeout does interrupt, so the run's log leaves the warning out and keeps the rest."""
    import logging

    from flows.retrain import quiet_libraries

    quiet_libraries()
    quiet_libraries()   # idempotent: one filter however often a process runs flows
    log = logging.getLogger("prefect.task_runs")

    def record(msg: str) -> logging.LogRecord:
        return log.makeRecord(log.name, logging.WARNING, __file__, 1, msg, (), None)
    assert not log.filter(record("Timeout of 1800.0 seconds configured for this task, but the task is running in "
                                 "a worker thread. Timeouts in worker threads cannot interrupt blocking operations"))
    assert log.filter(record("digits-unet: training (diffusion/unet on digits, budget 270s / 1500 steps)"))
    assert sum(type(f).__name__ == "ThreadTimeoutNote" for f in log.filters) == 1
