"""Running `genflow run` as a user would, in its own process group, and checking that a project is
whole afterwards: the fault tests (crashes, a full disk) share these."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import TINY_OVERRIDES

KEY = "digits-unet"
DATA_STAGES = ("ingest@digits", "validate@digits", "prepare@digits")
MODEL_STAGES = tuple(f"{s}@{KEY}" for s in ("train", "evaluate", "export"))

TEMPORARY = re.compile(r"\.tmp|\.old-")   # components.files' temporary names


def write_params(root: Path, seed: int) -> None:
    """The tiny digits-unet settings in params.yaml itself (not --set), so `dvc status` can compare.
    No inpainting evaluation: these runs are killed and checked for whole files and a consistent
    registry (inpainting has its own tests), and it was most of each evaluation's time."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for item in TINY_OVERRIDES + [f"models.{KEY}.train.checkpoint_every=2", f"models.{KEY}.train.seed={seed}",
                                  f"models.{KEY}.eval.inpaint_samples=0"]:
        path, value = item.split("=", 1)
        if not path.startswith(f"models.{KEY}."):
            continue
        *parents, leaf = path.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def group_alive(pgid: int) -> list[int]:
    from integration.conftest import group_members

    return group_members(pgid)


def genflow_run(root: Path, env: dict, log: Path, kill: str | None = None) -> tuple[int, str]:
    """`genflow run --only digits-unet` in its own process group; (exit code, output)."""
    env = {**env, **({"GENFLOW_KILL_AT": kill} if kill else {})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--only", KEY], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:   # children die with the group
        time.sleep(0.1)
    assert not group_alive(proc.pid), f"processes of the killed run are left: {group_alive(proc.pid)}"
    return code, log.read_text(errors="replace")


# ---------------------------------------------------------------------------
# What must hold after every rerun
# ---------------------------------------------------------------------------

def check_files(root: Path) -> int:
    """No temporary name anywhere; every file reads back whole. Returns the number of files read."""
    import numpy as np
    import onnx
    import torch
    from PIL import Image

    files = [p for d in ("data", "models", "exports", "reports") for p in (root / d).rglob("*")]
    assert [p for p in files if TEMPORARY.search(p.name)] == []
    read = 0
    for p in files:
        if not p.is_file():
            continue
        assert p.stat().st_size > 0, f"{p}: empty"
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(line) for line in p.read_text().splitlines() if line]
        elif p.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(p)))
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()   # decodes every byte: a cut file fails here
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".npz":
            with np.load(p) as z:
                [z[k] for k in z.files]
        read += 1
    return read


def check_dvc(root: Path) -> None:
    """dvc.lock parses and names every stage genflow ran; the workspace and the remote match it."""
    from dvc.repo import Repo

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(DATA_STAGES + MODEL_STAGES) <= set(lock["stages"]), sorted(lock["stages"])
    targets = list(DATA_STAGES + MODEL_STAGES)
    with contextlib.chdir(root), contextlib.closing(Repo(str(root))) as repo:   # DVC resolves paths from the cwd
        assert repo.status(targets=targets) == {}
        assert repo.status(targets=targets, cloud=True) == {}   # everything recorded reached the remote


def check_remote(remote: Path) -> int:
    """Every object in a local DVC remote is whole: content-addressed, each file's md5 is its name
    (folder + file), so a cut file shows. DVC's own temporary upload files (`.<random>.tmp`) are
    skipped. Returns the number of objects."""
    import hashlib

    files = [p for p in remote.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for p in files:
        assert hashlib.md5(p.read_bytes()).hexdigest() == p.parent.name + p.name.removesuffix(".dir"), p
    return len(files)


def check_registry(tmp: Path) -> list[dict]:
    """Every version whole and gated, one champion, a history that replays to today's aliases."""
    import mlflow
    import onnx

    client = mlflow.MlflowClient()
    current = {a: str(v) for a, v in client.get_registered_model(KEY).aliases.items()}
    assert "champion" in current, current   # exactly one: an alias names one version
    versions = sorted(client.search_model_versions(f"name='{KEY}'"), key=lambda m: int(m.version))
    hashes = [mv.tags.get("genflow.inputs_hash") for mv in versions]
    assert len(set(hashes)) == len(hashes), "a version registered twice for the same inputs"
    holds: dict[str, str] = {}
    for mv in versions:
        v = str(mv.version)
        assert "genflow.gate.decision" in mv.tags, f"version {v} was never gated"
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{KEY}/{v}", dst_path=str(tmp / v)))
        onnx.checker.check_model(onnx.load(str(model_dir / "model.onnx")))
        for extra in json.loads(mv.tags["genflow.extra_files"]):
            assert Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=extra,
                                                            dst_path=str(tmp / v / "extras"))).stat().st_size > 0
        numbers = sorted(int(k.rsplit(".", 1)[1]) for k in mv.tags if k.startswith("genflow.alias_history."))
        assert numbers == list(range(1, len(numbers) + 1)) and numbers, f"version {v}: history {numbers}"
        events = [json.loads(mv.tags[f"genflow.alias_history.{n:03d}"]) for n in numbers]
        assert events[0]["alias"] == "challenger" and events[0]["action"] == "set", events[0]
        state: dict[str, bool] = {}
        for e in events:
            assert state.get(e["alias"], False) == (e["action"] == "removed"), f"version {v}: {events}"
            state[e["alias"]] = e["action"] == "set"
        holds.update({alias: v for alias, has in state.items() if has})
    assert holds == current, (holds, current)
    return [{"version": str(mv.version), "aliases": sorted(a for a, v in current.items() if v == str(mv.version))}
            for mv in versions]


@contextlib.contextmanager
def project_env(tmp_path: Path, monkeypatch):
    """The environment of the runs: one MLflow SQLite store (this process reads it too) and one
    Prefect server for all of them (a local one would start, and die, with each run)."""
    import mlflow

    from integration.conftest import start_prefect_server

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    prefect = start_prefect_server(tmp_path / "prefect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_API_URL": prefect.url, "MLFLOW_TRACKING_URI": uri}
    env.pop("GENFLOW_KILL_AT", None)
    try:
        yield env
    finally:
        prefect.stop()
