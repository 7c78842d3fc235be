"""A full disk during export and during dvc push: one line naming the place and "no space left on
device", nothing registered from the failed run, the earlier version and its aliases untouched,
no half-written file left, in the project or in the DVC remote.

The full disk is real: a small tmpfs mounted over exports/ (then over the DVC remote), holding
what was there plus a few KiB, so the kernel answers ENOSPC. Mounting needs root; skipped otherwise.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from project_checks import KEY, TEMPORARY, check_files, check_remote, genflow_run, project_env, write_params

pytestmark = pytest.mark.integration

SPARE_KIB = 64   # the tiny U-Net's model.onnx is ~190 KiB: the new export and its push do not fit


def _mount_problem(tmp_path: Path) -> str | None:
    if os.geteuid() != 0:
        return "mounting a small tmpfs (the full disk) needs root"
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        return f"cannot mount a tmpfs here ({got.stderr.strip() or got.returncode})"
    subprocess.run(["umount", str(probe)], check=True)
    return None


def _kib(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())   # whole pages


@contextlib.contextmanager
def full_disk(folder: Path, saved: Path):
    """`folder` on a tmpfs that holds its files and SPARE_KIB more; put back as it ends (even on failure)."""
    size = _kib(folder) + SPARE_KIB
    shutil.move(folder, saved)
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k,mode=0755", "tmpfs", str(folder)], check=True)
    try:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        shutil.move(saved, folder)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def registry_state() -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    return {"aliases": {a: str(v) for a, v in client.get_registered_model(KEY).aliases.items()},
            "versions": {str(mv.version): dict(mv.tags) for mv in client.search_model_versions(f"name='{KEY}'")}}


def error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("genflow run: ")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def test_a_full_disk_at_export_or_push_registers_nothing_and_leaves_no_half_file(project_clone, tmp_path,
                                                                               monkeypatch):
    problem = _mount_problem(tmp_path)
    if problem:
        pytest.skip(problem)
    root = project_clone
    with project_env(tmp_path, monkeypatch) as env:
        write_params(root, seed=0)
        code, out = genflow_run(root, env, tmp_path / "first.log")
        assert code == 0, out[-3000:]
        before = registry_state()
        assert list(before["versions"]) == ["1"] and before["aliases"] == {"champion": "1"}

        # 1. exports/ is full: the new export does not fit
        write_params(root, seed=1)
        exports = snapshot(root / "exports")
        with full_disk(root / "exports", tmp_path / "exports-saved"):
            code, out = genflow_run(root, env, tmp_path / "export-full.log")
            assert code == 1, out[-3000:]
            line = error_line(out)
            assert "no space left on device" in line and str(root / "exports") in line, line
            assert snapshot(root / "exports") == exports   # the previous export, whole, nothing beside it
        print(line)
        assert registry_state() == before
        check_files(root)

        # 2. the DVC remote is full: the model is exported but never registered
        write_params(root, seed=2)
        remote = root / ".genflow" / "dvc-remote"
        with full_disk(remote, tmp_path / "remote-saved"):
            code, out = genflow_run(root, env, tmp_path / "push-full.log")
            assert code == 1, out[-3000:]
            line = error_line(out)
            assert "no space left on device" in line and str(remote) in line, line
            assert "failed to transfer" not in out   # DVC's line per file is summed up in genflow's one line
            assert [p for p in remote.rglob("*") if TEMPORARY.search(p.name)] == []   # DVC's are removed too
            check_remote(remote)
        print(line)
        assert registry_state() == before
        assert "exported to" in out   # it did get as far as the push
        check_files(root)
