"""SIGKILL `genflow run` anywhere, run it again: the rerun completes and the project is whole.

One project, killed again and again as a machine might be: at each point of
components/faults.py (GENFLOW_KILL_AT) a run is killed, with its whole process group, then run
again unchanged. After each rerun: it completed; no temporary or half-written file under data/,
models/, exports/, reports/ (every JSON, ONNX, PNG, checkpoint and array file reads back whole);
dvc.lock parses and `dvc status` is clean, locally and against the remote; every registered
version has its model and extra files in MLflow and went through the gate; one champion; the
alias history of every version is numbered without a hole and replays to today's aliases.
"""
from __future__ import annotations

import json
import signal
import time

import pytest

from project_checks import (
    KEY,
    check_dvc,
    check_files,
    check_registry,
    check_remote,
    genflow_run,
    project_env,
    write_params,
)

pytestmark = pytest.mark.integration

# (GENFLOW_KILL_AT, train.seed of the killed run and its rerun): a new seed makes the run train,
# so it reaches the model's points; None keeps the model's inputs, so only the data steps run.
KILLS = [
    ("replace-dir", None),         # ingest: data/raw/digits renamed away, the new snapshot not yet in place
    ("dvc-commit@0.2", None),      # inside DVC's commit of the data stages
    ("train-checkpoint#2", 1),     # mid-training, right after the second checkpoint (step 4 of 6)
    ("export", 2),                 # model.onnx written in the temporary export folder, nothing else
    ("dvc-push@0.5", 3),           # inside DVC's push of the model's files, before it is registered
    ("register", 4),               # a version created, without its model card and challenger alias
    ("gate", 5),                   # registered and challenger, not yet gated
    ("alias-move", 6),             # challenger moved to the new version, neither version's history written
]



def test_sigkill_at_every_point_then_a_rerun_leaves_a_whole_project(project_clone, tmp_path, monkeypatch):
    root = project_clone
    logs = tmp_path / "logs"
    logs.mkdir()
    survived: list[str] = []
    versions: list[dict] = []
    t0 = time.monotonic()
    with project_env(tmp_path, monkeypatch) as env:
        try:
            write_params(root, seed=0)
            code, out = genflow_run(root, env, logs / "0-first.log")
            assert code == 0, out[-3000:]
            for i, (point, seed) in enumerate(KILLS, 1):
                if seed is not None:
                    write_params(root, seed)
                name = point.split("@")[0].split("#")[0]
                code, out = genflow_run(root, env, logs / f"{i}-{name}-killed.log", kill=point)
                assert code == -signal.SIGKILL and f"(GENFLOW_KILL_AT={point})" in out, \
                    f"{point}: not killed there (exit {code}):\n{out[-3000:]}"
                code, out = genflow_run(root, env, logs / f"{i}-{name}-rerun.log")
                assert code == 0, f"rerun after a kill at {point} failed:\n{out[-3000:]}"
                summary = json.loads((root / "reports" / "last_run.json").read_text())
                assert summary["status"] == "completed" and summary["models"][KEY]["status"] in ("trained", "skipped")
                files = check_files(root)
                check_dvc(root)
                check_remote(root / ".genflow" / "dvc-remote")
                versions = check_registry(tmp_path / f"dl-{i}")
                survived.append(point)
                print(f"kill at {point}: rerun completed, {files} files whole, dvc clean, versions {versions}",
                      flush=True)
        finally:
            print(f"kill points tried {len(KILLS)}, survived {len(survived)} ({time.monotonic() - t0:.0f}s)",
                  flush=True)
    assert survived == [p for p, _ in KILLS]
    assert len(versions) == 1 + len({s for _, s in KILLS if s is not None})   # one per new set of inputs
