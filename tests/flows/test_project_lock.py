"""One genflow process at a time changes a project (.genflow/run.lock): a second one is refused at
once in one line and changes nothing, `run --wait` waits its turn, a SIGKILLed holder blocks nobody,
and a child of the holder on the same project does not deadlock. Real processes throughout; every
wait is on a line the other process prints, never on a sleep of some length."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from components.project_lock import BUSY_EXIT, HELD_ENV, holder_file, lock_file

TIMEOUT = 120   # generous: a slow, shared machine only makes the test slower, never wrong

HOLDER = """
import subprocess, sys
from pathlib import Path
from components.project_lock import project_lock
root = Path(sys.argv[1])
with project_lock(root, sys.argv[2]):
    if len(sys.argv) > 3:   # a child on the same project, as a flow's `genflow stage` would be
        child = subprocess.run([sys.executable, "-c", sys.argv[3], str(root)], capture_output=True, text=True)
        print("CHILD", child.returncode, child.stdout.strip(), flush=True)
    print("HELD", flush=True)
    sys.stdin.read()   # until the test closes stdin (or kills this process)
print("RELEASED", flush=True)
"""

TRY = """
import sys
from pathlib import Path
from components.errors import ProjectBusyError
from components.project_lock import project_lock
try:
    with project_lock(Path(sys.argv[1]), "second"):
        print("ACQUIRED")
except ProjectBusyError as e:
    print("BUSY", e)
"""


def env(project_root: Path) -> dict:
    e = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    e["PYTHONPATH"] = str(project_root)
    return e


def start_holder(root: Path, project_root: Path, command: str = "genflow run --quick", *child: str):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), command, *child], cwd=root,
                         env=env(project_root), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    while not lines or lines[-1] != "HELD":
        line = p.stdout.readline()
        assert line, f"the holder ended early: {lines}"
        lines.append(line.strip())
    return p, lines


def try_lock(root: Path, project_root: Path, **extra_env: str) -> str:
    r = subprocess.run([sys.executable, "-c", TRY, str(root)], cwd=root, env={**env(project_root), **extra_env},
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def genflow(root: Path, project_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env(project_root),
                          capture_output=True, text=True, timeout=TIMEOUT)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def project(tmp_path, project_root) -> Path:
    shutil.copy(project_root / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_a_second_process_is_refused_until_the_holder_releases(project, project_root):
    holder, _ = start_holder(project, project_root)
    try:
        busy = try_lock(project, project_root)
        assert busy.startswith("BUSY the project is busy: ") and "\n" not in busy
        assert str(lock_file(project)) in busy and f"pid {holder.pid}" in busy and "genflow run --quick" in busy
    finally:
        holder.stdin.close()
    assert holder.stdout.readline().strip() == "RELEASED"
    assert holder.wait(TIMEOUT) == 0
    assert not holder_file(project).exists()   # who held it goes with the lock
    assert try_lock(project, project_root) == "ACQUIRED"


def test_a_sigkilled_holder_blocks_nobody(project, project_root):
    holder, _ = start_holder(project, project_root)
    holder.kill()   # SIGKILL: no finally runs, the holder file stays behind
    holder.wait(TIMEOUT)
    holder.stdout.close()
    holder.stdin.close()
    assert holder.returncode == -signal.SIGKILL and holder_file(project).exists()
    assert try_lock(project, project_root) == "ACQUIRED"


def test_a_child_of_the_holder_on_the_same_project_does_not_deadlock(project, project_root):
    holder, lines = start_holder(project, project_root, "genflow run", TRY)
    holder.stdin.close()
    assert holder.wait(TIMEOUT) == 0
    holder.stdout.close()
    assert "CHILD 0 ACQUIRED" in lines   # inherited the holder's lock: no second acquisition, no wait


def test_torchrun_workers_after_the_first_of_a_node_run_under_its_lock(project, project_root):
    holder, _ = start_holder(project, project_root, "genflow stage train digits-unet")   # as LOCAL_RANK 0 would
    try:
        assert try_lock(project, project_root, LOCAL_RANK="1") == "ACQUIRED"
        assert try_lock(project, project_root, LOCAL_RANK="0").startswith("BUSY")
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
        holder.stdout.close()


def test_cli_refuses_in_one_line_with_exit_3_and_changes_nothing(project, project_root):
    holder, _ = start_holder(project, project_root)
    try:
        before = snapshot(project)
        for args, hint in ((["run", "--quick"], "add --wait"), (["stage", "ingest", "digits"], "try again"),
                           (["promote", "digits-unet", "1"], "try again"), (["rollback", "digits-unet"], "try again")):
            r = genflow(project, project_root, *args)
            assert r.returncode == BUSY_EXIT == 3, r.stderr
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"genflow {args[0]}: the project is busy: "), r.stderr
            assert str(lock_file(project)) in lines[0] and f"pid {holder.pid}" in lines[0] and hint in lines[0]
            assert "genflow run --quick" in lines[0]   # the holder's command
        assert snapshot(project) == before
    finally:
        holder.stdin.close()
        holder.wait(TIMEOUT)
        holder.stdout.close()


def test_cli_run_wait_blocks_until_the_holder_is_gone(project, project_root):
    holder, _ = start_holder(project, project_root)
    waiter = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--wait", "--only", "no-such-model"],
                              cwd=project, env=env(project_root), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        first = waiter.stderr.readline()   # printed once it found the lock held; it then blocks
        assert first.startswith(f"genflow run: waiting for {lock_file(project)}, held by pid {holder.pid}"), first
        assert waiter.poll() is None
    finally:
        holder.kill()   # the holder dies the hard way: the waiter takes the lock all the same
        holder.wait(TIMEOUT)
        holder.stdout.close()
        holder.stdin.close()
    rest = waiter.stderr.read()
    assert waiter.wait(TIMEOUT) == 1   # got the lock, ran, and refused the bad model key (not 3: not busy)
    waiter.stdout.close()
    waiter.stderr.close()
    assert "no-such-model" in rest and "busy" not in rest
