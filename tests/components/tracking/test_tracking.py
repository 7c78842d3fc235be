"""MLflow tracking: URI resolution, params and lineage, nested runs, artifacts, an absent server.

Runs go to the session's SQLite store (tests/conftest.py); each test uses its own experiment
prefix, so its experiments (and their artifacts) live under its own tmp_path.
"""
import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from components import tracking
from components.config import DatasetConfig, ModelConfig, Params, hash_json


def make_params(prefix: str = "genflow") -> Params:
    p = Params(
        datasets={"digits": DatasetConfig(source="builtin:digits"),
                  "pydoc": DatasetConfig(source="builtin:pydoc", kind="text")},
        models={"digits-unet": ModelConfig(family="diffusion", backbone="unet", dataset="digits"),
                "pydoc-gpt": ModelConfig(family="transformer", backbone="gpt", dataset="pydoc")},
    )
    p.tracking.experiment_prefix = prefix
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def params():
    return make_params(f"t{uuid.uuid4().hex[:8]}")



@pytest.fixture
def client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


# ---------------------------------------------------------------------------
# No MLflow needed
# ---------------------------------------------------------------------------

def test_tracking_uri_env_then_params_then_local_sqlite(tmp_path, monkeypatch):
    p = make_params("x")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/.genflow/mlflow.db"
    assert (tmp_path / ".genflow").is_dir()
    p.tracking.tracking_uri = "http://mlflow.internal:5000"
    assert tracking.tracking_uri(tmp_path, p) == "http://mlflow.internal:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking.tracking_uri(tmp_path, p) == "http://127.0.0.1:5001"


def test_flatten_uses_dotted_keys_json_lists_and_mlflow_length_limit():
    flat = tracking.flatten({"train": {"lr": 0.002, "seed": 0}, "unet": {"channels": [32, 64]},
                             "sample": {"prompt": "x" * 7000}, "enabled": True})
    assert flat["train.lr"] == "0.002" and flat["train.seed"] == "0"
    assert flat["unet.channels"] == "[32, 64]" and flat["enabled"] == "true"
    assert len(flat["sample.prompt"]) == tracking.MAX_PARAM_CHARS and flat["sample.prompt"].endswith("...")


def test_model_params_hold_the_model_and_its_dataset_but_not_unused_networks():
    p = make_params("x")
    unet = tracking.model_params(p, "digits-unet")
    assert unet["model_key"] == "digits-unet" and unet["backbone"] == "unet"
    assert unet["unet.channels"] == "[32, 64]" and unet["diffusion.timesteps"] == "200"
    assert unet["dataset.source"] == "builtin:digits" and unet["dataset.split.test"] == "0.2"
    assert not any(k.startswith(("gpt.", "dit.")) for k in unet)
    gpt = tracking.model_params(p, "pydoc-gpt")
    assert gpt["gpt.n_layer"] == "4" and gpt["dataset.kind"] == "text"
    assert not any(k.startswith(("unet.", "diffusion.")) for k in gpt)
    # the backbone registry says which sections a model reads: mdlm reads gpt and masked only
    p.models["pydoc-mdlm"] = ModelConfig(family="diffusion", backbone="mdlm", dataset="pydoc")
    mdlm = tracking.model_params(p, "pydoc-mdlm")
    assert any(k.startswith("gpt.") for k in mdlm) and any(k.startswith("masked.") for k in mdlm)
    assert not any(k.startswith(("unet.", "dit.", "diffusion.")) for k in mdlm)


def test_placement_tags_come_from_the_schedule(tmp_path):
    from components.tracking.lineage import placement_tags

    schedule = tmp_path / "schedule.json"
    assert placement_tags(schedule) == {}                                  # no schedule: no tags
    schedule.write_text(json.dumps({"steps": 3, "threads": 2, "lrs": [0.1] * 3}))
    assert placement_tags(schedule) == {"genflow.device": "cpu", "genflow.precision": "fp32"}   # older runs
    schedule.write_text(json.dumps({"steps": 3, "device": "cuda:0", "precision": "bf16", "lrs": [0.1] * 3}))
    assert placement_tags(schedule) == {"genflow.device": "cuda:0", "genflow.precision": "bf16"}


def test_lineage_tags_outside_and_inside_a_git_repository(tmp_path):
    p = make_params("x")
    hashes = {"digits": {"raw": "r0", "prepared": "p0"}}
    tags = tracking.lineage_tags(tmp_path, p, "digits-unet", hashes, flow_run_id="fr-42")
    assert tags["genflow.git_commit"] == "unknown" and tags["genflow.git_dirty"] == "unknown"
    assert tags["genflow.data_hash.digits"] == "p0" and tags["genflow.data_hash.digits.raw"] == "r0"
    assert tags["genflow.eval_data_hash"] == "p0"
    assert tags["genflow.params_hash"] == p.section_hash("models", "digits-unet")
    assert tags["genflow.flow_run_id"] == "fr-42"
    assert (tags["genflow.model_key"], tags["genflow.family"]) == ("digits-unet", "diffusion")
    for lib in ("python", "torch", "numpy", "onnxruntime"):
        assert tags[f"genflow.version.{lib}"]
    assert all(k.startswith("genflow.") and isinstance(v, str) for k, v in tags.items())
    # pipeline-level tags: whole-params hash, no model; a plain string hash is used as is
    pipe = tracking.lineage_tags(tmp_path, p, None, {"pydoc": "abc"})
    assert pipe["genflow.params_hash"] == p.hash() and pipe["genflow.data_hash.pydoc"] == "abc"
    assert pipe["genflow.flow_run_id"] == "none" and "genflow.model_key" not in pipe

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.txt").write_text("a")
    for cmd in (["init", "-q"], ["add", "a.txt"], ["commit", "-q", "-m", "a"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, capture_output=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tracking.git_state(repo) == (head, "false")
    # the data's DVC record and params.yaml are in the lineage already: they do not make a run dirty
    (repo / "dvc.lock").write_text("stages: {}")
    (repo / "params.yaml").write_text("models: {}")
    assert tracking.git_state(repo) == (head, "false")
    (repo / "a.txt").write_text("changed")
    assert tracking.git_state(repo) == (head, "true")
    assert tracking.git_changes(repo) == ["a.txt"]


def test_bad_retry_setting_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "many")
    with pytest.raises(tracking.TrackingError, match="GENFLOW_TRACKING_RETRIES='many'"):
        tracking.check_tracking(tmp_path)


# ---------------------------------------------------------------------------
# Against the session's SQLite store
# ---------------------------------------------------------------------------

def test_unreachable_server_fails_fast_with_one_line_naming_the_uri(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GENFLOW_TRACKING_RETRIES", "3")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as e:
        with tracking.model_run("digits-unet", make_params("x"), tmp_path):
            pass
    msg = str(e.value)
    assert msg == f"cannot reach MLflow at {uri} after 3 tries; start the server or set MLFLOW_TRACKING_URI"
    assert f"{type(e.value).__name__}: {msg}".startswith("TrackingUnavailable: cannot reach MLflow at http://")
    assert "\n" not in msg
    # 3 refused connections with 0.5 s + 1 s backoff: seconds, not MLflow's default minutes
    assert time.monotonic() - t0 < 25
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the probe's setting is undone


def test_pipeline_and_model_runs_nest_per_dataset_with_lineage_and_params(tmp_path, params, client, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local store must not write ./mlruns into the CWD
    hashes = {"digits": {"raw": "r1", "prepared": "p1"}, "pydoc": {"prepared": "q1"}}
    with tracking.pipeline_run(params, tmp_path, flow_run_id="fr-1", models=["digits-unet", "pydoc-gpt"],
                               data_hashes=hashes) as parent:
        assert set(parent.run_ids) == {"digits", "pydoc"}
        with tracking.model_run("pydoc-gpt", params, tmp_path, parent_run_id=parent.info.run_id,
                                flow_run_id="fr-1", extra_tags={"genflow.inputs_hash": "ih"}) as run:
            gpt_id = run.info.run_id
            assert tracking.log_metrics({"eval/bits_per_char": 2.1, "perf/params": 12, "note": "skipped"}) == 2
            tracking.log_metrics({"train/loss": 3.0}, step=5)
        with tracking.model_run("digits-unet", params, tmp_path, parent_run_id=parent.info.run_id) as run:
            unet_id = run.info.run_id
        tracking.log_summary({"status": "completed", "seconds": 12.5}, tmp_path)

    gpt, unet = client.get_run(gpt_id), client.get_run(unet_id)
    exp = client.get_experiment(gpt.info.experiment_id)
    assert exp.name == f"{params.tracking.experiment_prefix}-pydoc"
    # each model nests under the pipeline run of its own dataset's experiment
    assert gpt.data.tags["mlflow.parentRunId"] == parent.run_ids["pydoc"]
    assert unet.data.tags["mlflow.parentRunId"] == parent.run_ids["digits"]
    assert client.get_run(parent.run_ids["pydoc"]).info.experiment_id == gpt.info.experiment_id
    assert gpt.info.run_name == "pydoc-gpt" and gpt.info.status == "FINISHED"
    t = gpt.data.tags
    assert t["genflow.data_hash.pydoc"] == "q1" and t["genflow.eval_data_hash"] == "q1"
    assert t["genflow.flow_run_id"] == "fr-1" and t["genflow.inputs_hash"] == "ih"
    assert t["genflow.params_hash"] == params.section_hash("models", "pydoc-gpt")
    assert unet.data.tags["genflow.data_hash.digits.raw"] == "r1"
    assert unet.data.tags["genflow.flow_run_id"] == "fr-1"  # inherited from its parent
    assert gpt.data.params["gpt.n_embd"] == "128" and gpt.data.params["dataset.source"] == "builtin:pydoc"
    assert gpt.data.metrics == {"eval/bits_per_char": 2.1, "perf/params": 12.0, "train/loss": 3.0}
    assert [m.step for m in client.get_metric_history(gpt_id, "train/loss")] == [5]

    for rid in parent.run_ids.values():
        pr = client.get_run(rid)
        assert pr.info.status == "FINISHED" and pr.data.tags["genflow.status"] == "completed"
        assert pr.data.params["models"] == "digits-unet,pydoc-gpt"
        assert pr.data.params["promotion.max_sample_slowdown"] == "0.25"
        assert pr.data.tags["genflow.params_hash"] == params.hash()
        assert pr.data.metrics["pipeline/seconds"] == 12.5
    art = tracking.artifact_root(tmp_path)
    assert (art / f"{params.tracking.experiment_prefix}-pydoc").is_dir()
    assert list(art.rglob("last_run.json")) and not (tmp_path / "mlruns").exists()


def test_failures_end_runs_failed(tmp_path, params, client):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.pipeline_run(params, tmp_path, models=["digits-unet"]) as parent:
            with tracking.model_run("digits-unet", params, tmp_path, parent_run_id=parent.info.run_id) as run:
                raise RuntimeError("boom")
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    # a completed pipeline whose summary says failed ends FAILED as well
    with tracking.pipeline_run(params, tmp_path, models=["digits-unet"]) as parent:
        tracking.log_summary({"status": "failed", "seconds": 1.0}, tmp_path)
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    # no model to run: no parent run
    with tracking.pipeline_run(params, tmp_path, models=[]) as none:
        assert none is None


def test_model_run_nests_under_an_active_parent_in_the_same_thread(tmp_path, params, client):
    import mlflow

    with tracking.pipeline_run(params, tmp_path, models=["digits-unet"]) as parent:
        with mlflow.start_run(run_id=parent.info.run_id):
            with tracking.model_run("digits-unet", params, tmp_path, parent_run_id=parent.info.run_id) as run:
                assert mlflow.active_run().info.run_id == run.info.run_id
            assert mlflow.active_run().info.run_id == parent.info.run_id
    assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_model_artifacts_parity_and_logging_without_a_run(tmp_path, params, client):
    (tmp_path / "reports" / "digits-unet").mkdir(parents=True)
    (tmp_path / "reports" / "digits-unet" / "samples.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "reports" / "digits-unet" / "metrics.json").write_text("{}")
    (tmp_path / "data" / "validation").mkdir(parents=True)
    (tmp_path / "data" / "validation" / "digits.json").write_text('{"success": true}')
    (tmp_path / "models" / "digits-unet").mkdir(parents=True)
    (tmp_path / "models" / "digits-unet" / "model.pt").write_bytes(b"weights")
    with tracking.model_run("digits-unet", params, tmp_path) as run:
        logged = tracking.log_model_artifacts("digits-unet", tmp_path)  # dataset read from the run's tags
        tracking.log_parity("digits-unet", {"max_abs": 2e-6, "passed": True}, tmp_path)
    assert sorted(logged) == ["checkpoint/model.pt", "reports/metrics.json", "reports/samples.png",
                              "validation/digits.json"]
    rid = run.info.run_id
    files = {a.path for d in ("reports", "validation", "checkpoint", "export") for a in client.list_artifacts(rid, d)}
    assert {"reports/samples.png", "validation/digits.json", "checkpoint/model.pt", "export/parity.json"} <= files
    tags = client.get_run(rid).data.tags
    assert float(tags["genflow.parity_max_abs"]) == 2e-6 and tags["genflow.parity_passed"] == "true"
    with pytest.raises(tracking.TrackingError, match="no active MLflow run"):
        tracking.log_metrics({"eval/fd": 1.0})
    assert tracking.log_metrics({"eval/fd": 1.0}, run_id=rid) == 1


def test_default_store_is_sqlite_under_root_and_env_is_left_alone(tmp_path, monkeypatch):
    """check_tracking must not export its default URI: a second root gets its own store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    a, b = tmp_path / "a", tmp_path / "b"
    uri_a = tracking.check_tracking(a)
    assert uri_a.startswith("sqlite:///") and uri_a.endswith("/a/.genflow/mlflow.db")
    assert mlflow.get_tracking_uri() == uri_a
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.check_tracking(b).endswith("/b/.genflow/mlflow.db")


def test_model_run_without_dvc_hashes_uses_the_prepared_manifest(tmp_path, params, client):
    prepared = tmp_path / "data" / "prepared" / "digits"
    prepared.mkdir(parents=True)
    files = {"train.npz": "aa", "test.npz": "bb"}
    (prepared / "manifest.json").write_text(json.dumps({"kind": "image", "files": files}))
    with tracking.model_run("digits-unet", params, tmp_path) as run:
        pass
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["genflow.data_hash.digits.manifest"] == hash_json(files)
    assert tags["genflow.eval_data_hash"] == tags["genflow.data_hash.digits"] != "unknown"
    assert tags["genflow.flow_run_id"] == "none"
    (prepared / "manifest.json").write_text(json.dumps({"kind": "image", "files": {**files, "test.npz": "cc"}}))
    with tracking.model_run("digits-unet", params, tmp_path) as run2:
        pass
    assert client.get_run(run2.info.run_id).data.tags["genflow.eval_data_hash"] != tags["genflow.eval_data_hash"]


def test_errors_share_genflow_roots_and_dvc_hashes_read_from_the_lock(tmp_path):
    from components import errors, registry, versioning
    from components.reproduce import ReproduceError

    assert registry.RegistryError is errors.RegistryError
    for cls in (tracking.TrackingError, tracking.TrackingUnavailable, tracking.TrackingAuthError,
                versioning.VersioningError):
        assert issubclass(cls, errors.ServerError)
    assert issubclass(ReproduceError, errors.ModelError) and issubclass(ReproduceError, ValueError)
    (tmp_path / "dvc.lock").write_text("stages:\n  prepare@digits:\n    outs:\n"
                                       "    - path: data/prepared/digits\n      md5: abc.dir\n")
    assert versioning.dataset_hashes("digits", tmp_path) == {"prepared": "abc.dir"}
    assert tracking.local_data_hashes("digits", tmp_path) == {"digits": {"prepared": "abc.dir"}}


def test_model_run_logs_its_data_as_mlflow_datasets_with_the_dvc_hash(tmp_path, params, client):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    remote = store\n"
                                              "['remote \"store\"']\n    url = ../remote-folder\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  ingest@pydoc:\n    outs:\n    - path: data/raw/pydoc\n      md5: 0f1e2d3c4b5a69788796a5b4c3d2e1f0.dir\n"
        "  prepare@pydoc:\n    outs:\n    - path: data/prepared/pydoc\n"
        "      md5: 9a8b7c6d5e4f30211203f4e5d6c7b8a9.dir\n")
    with tracking.model_run("pydoc-gpt", params, tmp_path) as run:
        pass
    got = client.get_run(run.info.run_id)
    inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"pydoc/train", "pydoc/test"}
    context = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert context == {"pydoc/train": "training", "pydoc/test": "evaluation"}
    for name, d in inputs.items():
        assert d.dataset.digest == "9a8b7c6d5e4f30211203f4e5d6c7b8a9.dir" == got.data.tags["genflow.data_hash.pydoc"]
        assert d.dataset.source_type == "dvc"
        source = json.loads(d.dataset.source)
        assert source == {"path": "data/prepared/pydoc", "remote": "store",
                          "url": str((tmp_path / "remote-folder").resolve()), "split": name.split("/")[1],
                          "raw_hash": "0f1e2d3c4b5a69788796a5b4c3d2e1f0.dir"}
    # new data, pushed to a remote named in storage.dvc_remote as a URL: its credentials never reach MLflow
    # (the same name and digest again would be the same MLflow dataset, source included)
    lock = tmp_path / "dvc.lock"
    lock.write_text(lock.read_text().replace("9a8b7c6d", "11111111"))
    params.storage.dvc_remote = "s3://key:secret@bucket/dvc"
    with tracking.model_run("pydoc-gpt", params, tmp_path) as run:
        pass
    sources = [json.loads(d.dataset.source) for d in client.get_run(run.info.run_id).inputs.dataset_inputs]
    assert {s["url"] for s in sources} == {"s3://***@bucket/dvc"} and "secret" not in json.dumps(sources)
