"""`genflow reproduce` end to end: a tiny model trained by the real flow on a wall-clock budget,
registered, then rebuilt from its lineage (git worktree, DVC remote, recorded params and schedule)."""
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES, make_clone

pytestmark = pytest.mark.integration

KEY = "pydoc-gpt"


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def git(root, *args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def registered(tmp_path_factory, project_root):
    """A project clone whose pydoc-gpt version 1 was trained by the flow for ~2 s of wall clock."""
    from prefect.testing.utilities import prefect_test_harness

    from components.config import load_params
    from flows.retrain import run_pipeline

    base = tmp_path_factory.mktemp("reproduce")
    root = make_clone(project_root, base / "clone")
    corpus = base / "corpus.txt"
    pydoc = __import__("pydoc")
    docs = [m.__doc__ for m in vars(pydoc).values() if isinstance(getattr(m, "__doc__", None), str)
            and len(m.__doc__) > 200]
    corpus.write_text("\n\n".join(docs * 3))
    overrides = [*TINY_OVERRIDES, f"datasets.pydoc.source=textfile:{corpus}",
                 "datasets.pydoc.text_validation.min_chars=1000",
                 # stopped by the clock, not by steps: the hard case for reproducing
                 f"models.{KEY}.train.max_steps=100000", f"models.{KEY}.train.max_seconds=2",
                 f"models.{KEY}.train.threads=1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base / 'mlflow.db'}")
        with prefect_test_harness(server_startup_timeout=120):
            summary = run_pipeline(load_params(root / "params.yaml", overrides), root, only=[KEY],
                                   overrides=overrides)
        assert summary["models"][KEY]["status"] == "trained", summary
        yield root, load_params(root / "params.yaml", overrides)


def snapshot(root):
    from mlflow import MlflowClient

    return {"aliases": dict(MlflowClient().get_registered_model(KEY).aliases),
            "status": git(root, "status", "--porcelain"), "worktrees": git(root, "worktree", "list"),
            "data": tree_digest(root / "data"), "models": tree_digest(root / "models"),
            "exports": tree_digest(root / "exports")}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """reproduce's temporary folders land here, so the test can see that none is left behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_registered_version_rebuilds_to_identical_weights(registered, scratch):
    from mlflow import MlflowClient

    from components.reproduce import IDENTICAL, reproduce

    root, params = registered
    before = snapshot(root)
    mv = MlflowClient().get_model_version(KEY, "1")
    steps = int(mv.tags["genflow.train_steps"])
    assert 0 < steps < 100000   # the clock stopped it

    verdict = reproduce(f"{KEY}:1", root, params)
    assert verdict.verdict == IDENTICAL, verdict
    assert verdict.weights_max_abs == 0.0
    assert verdict.reproduced_metric == verdict.registered_metric
    assert verdict.reproduced_parity == verdict.registered_parity

    tags = MlflowClient().get_model_version(KEY, "1").tags
    assert tags["genflow.reproduce.verdict"] == IDENTICAL
    run = MlflowClient().get_run(tags["genflow.reproduce.run_id"])
    assert run.data.tags["genflow.reproduce_of"] == f"{KEY}:1" and run.info.status == "FINISHED"
    assert run.data.metrics["reproduce/weights_max_abs"] == 0.0
    assert snapshot(root) == before   # the user's tree, data, models and aliases are untouched
    assert list(scratch.iterdir()) == []


def test_data_gone_from_the_remote_is_named_and_nothing_is_left(registered, scratch):
    root, _ = registered
    remote = root / ".genflow" / "dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*"))
    before = snapshot(root)
    aside = root.parent / "remote-aside"
    shutil.move(str(remote), aside)   # as if the remote had been garbage-collected
    remote.mkdir()
    try:
        res = subprocess.run([sys.executable, "-m", "flows.cli", "reproduce", f"{KEY}:1"], cwd=root,
                             capture_output=True, text=True, env={**__import__("os").environ,
                                                                  "TMPDIR": str(scratch)})
    finally:
        shutil.rmtree(remote)
        shutil.move(str(aside), remote)
    assert res.returncode == 1, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("genflow reproduce: data ") and "not restorable from DVC remote 'local'" in last, last
    assert snapshot(root) == before
    assert list(scratch.iterdir()) == []
