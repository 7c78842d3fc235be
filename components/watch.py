"""Has a dataset's source changed since it was last looked at? (`genflow watch`, flows/watch.py)

    seen = load_state(root)                                  # .genflow/watch.json
    now = source_state("mine", params.dataset("mine"), root)  # {"hash", "files", "bytes"}
    change = describe_change(seen.get("mine"), now)           # None when unchanged or first seen

The hash is cheap and deterministic, and never opens an image:
- a folder source (imagefolder:, textfile: or pairs: folders): every regular file under it whose
  path has no hidden part (".cache/", ".DS_Store"): its relative path, size and modification time
  (nanoseconds), sorted by path. A file touched or copied anew counts as changed; the retrain it
  starts finds the data's DVC hash unchanged and trains nothing.
- a single file (textfile:FILE, pairs:FILE): its contents (MD5).
- builtin: sources never change for a given version: the source and the version of what it comes
  from (scikit-learn for the digits, Python for the standard library's docstrings).
"""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Optional

from components.config import DatasetConfig
from components.data import file_md5, parse_source
from components.errors import DataError
from components.files import read_json_cache, write_json

STATE_FILE = Path(".genflow") / "watch.json"   # {dataset: {"hash", "files", "bytes", "source"}}

# What each builtin is made from: a new version of it may make new data.
_BUILTIN_ORIGIN = {"digits": "scikit-learn", "digits-captions": "scikit-learn",
                   "pydoc": "python", "pydoc-pairs": "python"}


def state_path(root: str | Path) -> Path:
    return Path(root) / STATE_FILE


def load_state(root: str | Path) -> dict:
    """The last seen state of each dataset; {} when there is none (or it cannot be read: every
    dataset is then seen for the first time, which emits nothing)."""
    return read_json_cache(state_path(root))


def save_state(root: str | Path, state: dict) -> None:
    write_json(state_path(root), state)   # a temporary file renamed over the old one


def source_state(name: str, cfg: DatasetConfig, root: str | Path = ".") -> dict:
    """{"source", "hash", "files", "bytes"} of dataset `name`'s source now. Raises DataError (one
    line naming the dataset and path) when the source is missing or cannot be read."""
    kind, value = parse_source(name, cfg, root)
    if kind == "builtin":
        origin = _BUILTIN_ORIGIN.get(str(value), "genflow")
        version = platform.python_version() if origin == "python" else _version(origin)
        digest = hashlib.sha256(f"{cfg.source} {origin} {version}".encode()).hexdigest()[:16]
        return {"source": cfg.source, "hash": digest, "files": 0, "bytes": 0}
    path = Path(value)
    try:
        if path.is_file():
            return {"source": cfg.source, "hash": file_md5(path)[:16], "files": 1, "bytes": path.stat().st_size}
        listing = sorted(_walk(path, path))
    except OSError as e:
        raise DataError(f"datasets.{name}.source: cannot read {e.filename or path} ({e.strerror or e}); "
                        "make it readable or point the source elsewhere") from None
    h = hashlib.sha256()
    for rel, size, mtime_ns in listing:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return {"source": cfg.source, "hash": h.hexdigest()[:16], "files": len(listing),
            "bytes": sum(size for _, size, _ in listing)}


def _walk(folder: Path, top: Path):
    """(relative posix path, size, mtime_ns) of every regular file under folder, hidden parts skipped.
    os.scandir raises on a folder that cannot be listed: the caller names it."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                yield from _walk(Path(entry.path), top)
            elif entry.is_file(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                yield Path(entry.path).relative_to(top).as_posix(), st.st_size, st.st_mtime_ns


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_change(before: Optional[dict], now: dict) -> Optional[str]:
    """What changed between two states, in words ("3 files added"); None when nothing did or
    `before` is missing (a dataset seen for the first time is recorded, not reported)."""
    if not before or before.get("hash") == now["hash"]:
        return None
    if before.get("source") != now["source"]:
        return f"source is now {now['source']}"
    diff = int(now["files"]) - int(before.get("files", 0))
    if diff > 0:
        return f"{diff} file{'s' if diff != 1 else ''} added"
    if diff < 0:
        return f"{-diff} file{'s' if diff != -1 else ''} removed"
    if now["files"] == 0:
        return "new version of the builtin source"
    return "files changed"
