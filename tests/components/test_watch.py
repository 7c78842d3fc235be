"""components/watch.py: the hash of each kind of source, what counts as a change, one-line errors."""
import os

import pytest

from components import watch
from components.config import DatasetConfig
from components.errors import DataError
from conftest import make_imagefolder


def folder_cfg(path) -> DatasetConfig:
    return DatasetConfig(source=f"imagefolder:{path}", kind="image", image_size=8, levels=17)


def test_folder_hash_is_stable_and_sees_added_touched_and_removed_files(tmp_path):
    src = make_imagefolder(tmp_path / "mine", {"a": 3, "b": 2}, size=(8, 8))
    cfg = folder_cfg(src)
    first = watch.source_state("mine", cfg, tmp_path)
    assert first == watch.source_state("mine", cfg, tmp_path)   # deterministic
    assert first["files"] == 5 and first["bytes"] == sum(p.stat().st_size for p in src.rglob("*.png"))

    (src / ".DS_Store").write_bytes(b"x")            # hidden files and folders are not data
    (src / "a" / ".cache").mkdir()
    (src / "a" / ".cache" / "thumb.png").write_bytes(b"x")
    assert watch.source_state("mine", cfg, tmp_path)["hash"] == first["hash"]

    make_imagefolder(src, {"a": 6}, size=(8, 8), seed=1)   # img_0..2 rewritten, img_3..5 new
    added = watch.source_state("mine", cfg, tmp_path)
    assert added["hash"] != first["hash"]
    assert watch.describe_change(first, added) == "3 files added"

    st = (src / "b" / "img_0.png").stat()
    os.utime(src / "b" / "img_0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = watch.source_state("mine", cfg, tmp_path)
    assert touched["hash"] != added["hash"] and watch.describe_change(added, touched) == "files changed"

    (src / "b" / "img_1.png").unlink()
    assert watch.describe_change(touched, watch.source_state("mine", cfg, tmp_path)) == "1 file removed"
    assert watch.describe_change(None, touched) is None          # first seen: recorded, not reported
    assert watch.describe_change(touched, touched) is None


def test_single_text_file_is_hashed_by_contents(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("one\n\ntwo\n")
    cfg = DatasetConfig(source=f"textfile:{book}", kind="text")
    before = watch.source_state("book", cfg, tmp_path)
    os.utime(book, ns=(0, 0))                      # same bytes, other time: unchanged
    assert watch.source_state("book", cfg, tmp_path)["hash"] == before["hash"]
    book.write_text("one\n\ntwo\n\nthree\n")
    assert watch.source_state("book", cfg, tmp_path)["hash"] != before["hash"]


def test_builtin_source_hash_depends_on_source_and_version_only(tmp_path):
    digits = watch.source_state("digits", DatasetConfig(source="builtin:digits", kind="image"), tmp_path)
    again = watch.source_state("digits", DatasetConfig(source="builtin:digits", kind="image", image_size=16), tmp_path)
    pydoc = watch.source_state("pydoc", DatasetConfig(source="builtin:pydoc", kind="text"), tmp_path)
    assert digits == again and digits["hash"] != pydoc["hash"] and digits["files"] == 0


def test_missing_folder_is_one_line_naming_the_dataset(tmp_path):
    with pytest.raises(DataError, match=r"^datasets\.mine\.source: imagefolder:.*/gone does not exist"):
        watch.source_state("mine", folder_cfg(tmp_path / "gone"), tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_is_one_line_naming_it(tmp_path):
    src = make_imagefolder(tmp_path / "mine", {"a": 1}, size=(8, 8))
    (src / "a").chmod(0)
    try:
        with pytest.raises(DataError, match=r"datasets\.mine\.source: cannot read .*/mine/a \(Permission denied\)"):
            watch.source_state("mine", folder_cfg(src), tmp_path)
    finally:
        (src / "a").chmod(0o755)
