"""Atomic writes: the target is either the old file or the whole new one, never half, never a leftover."""
import pytest

from components.files import atomic_file, replaced_dir, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C in the middle of writing
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".pt" and tmp != target
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_finished_write_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"b": 1, "a": 2})
    assert target.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_folder_is_swapped_whole_or_not_at_all(tmp_path):
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed half way")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with replaced_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def _killed_writer(tmp_path, code: str, kill_at: str = "") -> int:
    """Run `code` in a child process (its own group) that may be SIGKILLed mid-write; its exit code."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "GENFLOW_KILL_AT": kill_at}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, start_new_session=True,
                          timeout=60).returncode


def test_a_folder_swap_killed_between_its_renames_is_put_back_by_the_sweep(tmp_path):
    import signal

    from components.files import sweep_leftovers

    target = tmp_path / "data" / "raw" / "digits"
    target.mkdir(parents=True)
    (target / "images.npz").write_text("old")
    code = ("from pathlib import Path\nfrom components.files import replaced_dir\n"
            "with replaced_dir(Path('data/raw/digits')) as tmp:\n    (tmp / 'images.npz').write_text('new')\n")
    assert _killed_writer(tmp_path, code, kill_at="replace-dir") == -signal.SIGKILL
    assert not target.exists()   # killed between the renames: only the .old- and .tmp- folders are there
    assert sorted(p.name.split("-")[0] for p in target.parent.iterdir()) == [".digits.old", ".digits.tmp"]
    done = sweep_leftovers(tmp_path)
    assert (target / "images.npz").read_text() == "old" and len(done) == 2
    assert [p.name for p in target.parent.iterdir()] == ["digits"]


def test_the_sweep_removes_a_dead_writers_temporary_file_and_keeps_a_live_ones(tmp_path):
    import signal

    from components.files import sweep_leftovers

    code = ("import os, signal\nfrom pathlib import Path\nfrom components.files import atomic_file\n"
            "with atomic_file(Path('models/m/model.pt')) as tmp:\n    tmp.write_text('half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert _killed_writer(tmp_path, code) == -signal.SIGKILL
    [dead] = (tmp_path / "models" / "m").iterdir()
    assert dead.name.startswith(".model.") and dead.name.endswith(".tmp.pt")
    with atomic_file(tmp_path / "models" / "m" / "metrics.json") as mine:   # this process: alive
        mine.write_text("{}")
        assert sweep_leftovers(tmp_path) == [f"removed {dead}"]
        assert mine.exists()
    assert [p.name for p in (tmp_path / "models" / "m").iterdir()] == ["metrics.json"]


def test_a_kill_point_is_inert_unless_named(tmp_path):
    code = ("from components.faults import kill_point, kill_window\n"
            "kill_point('ingest')\nwith kill_window('dvc-push'):\n    pass\nkill_point('export')\nprint('alive')\n")
    assert _killed_writer(tmp_path, code, kill_at="export#2") == 0   # reached once: not the second time
    assert _killed_writer(tmp_path, code, kill_at="dvc-push@30") == -9   # the window closes first: killed there
