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
