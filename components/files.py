"""Atomic writes: a reader never sees half a file, and a failure (Ctrl-C included) leaves none.

    with atomic_file(out_dir / "model.pt") as tmp:    # a temporary path beside the target
        torch.save(state, tmp)                         # renamed onto model.pt when the block ends

    with replaced_dir(root / "data" / "prepared" / name) as tmp:   # build a folder, swap it in
        ...

Light on purpose (standard library only): the torch-free inference engine uses it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that look at it still work);
    on success it replaces `path` in one rename, on any error or interrupt it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and a random part: two processes or two threads never share a temporary file
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any, **dumps: Any) -> None:
    """JSON, indented and key-sorted unless told otherwise, written atomically."""
    opts = {"indent": 2, "sort_keys": True, "ensure_ascii": False, **dumps}
    write_text(path, json.dumps(obj, **opts) + "\n")


def read_json_cache(path: Path) -> dict:
    """A JSON object a cache under .genflow/ holds; {} when missing, unreadable or not an object
    (a cache is rebuilt, never trusted)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def replaced_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it replaces `target` (the old
    folder is kept until the new one is in place), on any error or interrupt it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if target.exists():
            os.rename(target, old)  # a non-empty folder cannot be os.replace'd in one step
        try:
            os.rename(tmp, target)
        except BaseException:
            if old.exists():
                os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
