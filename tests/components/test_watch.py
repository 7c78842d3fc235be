"""components/watch.py and flows/watch.py without a server: source hashes, the state file, the
progress lines, and the one-line errors."""
import json
import os

import pytest

from components import watch
from components.config import DatasetConfig, load_params
from components.errors import ConfigError, DataError
from conftest import make_imagefolder
from flows.watch import parse_every, watch_once, watched_datasets


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


@pytest.mark.parametrize("text, seconds", [("60s", 60), ("5m", 300), ("1h", 3600), ("90", 90), ("1.5s", 1.5)])
def test_parse_every(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["0s", "soon", "-5s", ""])
def test_parse_every_refuses_what_is_not_a_duration(text):
    with pytest.raises(ConfigError, match="^--every: .* is not a duration of at least 1 second"):
        parse_every(text)


def user_params(project_root, src):
    return load_params(project_root / "params.yaml",
                       [f"datasets.digits.source=imagefolder:{src}", "models.pydoc-gpt.enabled=false"])


def test_watched_datasets_are_those_of_enabled_models(project_root, tmp_path):
    params = user_params(project_root, tmp_path)
    watched = watched_datasets(params)
    assert "pydoc" not in watched
    assert sorted(watched["digits"]) == sorted(k for k, m in params.models.items()
                                               if m.enabled and m.dataset == "digits")


def test_a_change_without_prefect_api_url_is_one_line_and_stays_to_report(project_root, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    src = make_imagefolder(tmp_path / "mine", {"a": 2, "b": 2}, size=(8, 8))
    params = user_params(project_root, src)
    lines: list[str] = []
    assert watch_once(params, tmp_path, say=lines.append, warn=lines.append) == []
    kb = sum(p.stat().st_size for p in src.rglob("*.png")) / 1e3
    assert lines == [f"watch: digits first seen (4 files, {kb:.0f} kB), recorded"]
    recorded = json.loads((tmp_path / ".genflow" / "watch.json").read_text())["digits"]

    lines.clear()
    assert watch_once(params, tmp_path, say=lines.append, warn=lines.append) == []
    assert lines == ["watch: digits unchanged"]

    make_imagefolder(src, {"a": 3}, size=(8, 8), seed=2)
    lines.clear()
    errors = watch_once(params, tmp_path, say=lines.append, warn=lines.append)
    assert lines == errors and len(errors) == 1
    assert errors[0].startswith("watch: digits: digits changed (1 file added), but PREFECT_API_URL is not set")
    assert "\n" not in errors[0]
    # not recorded: the next look (with a server) reports the change again
    assert json.loads((tmp_path / ".genflow" / "watch.json").read_text())["digits"] == recorded
