"""Atomic writes: a reader never sees half a file, and a failure (Ctrl-C included) leaves none.

    with atomic_file(out_dir / "model.pt") as tmp:    # a temporary path beside the target
        torch.save(state, tmp)                         # renamed onto model.pt when the block ends

    with replaced_dir(root / "data" / "prepared" / name) as tmp:   # build a folder, swap it in
        ...

Temporary names carry the writer's pid (`.model.812-1a2b3c4d.tmp.pt`, `.digits.tmp-812-xyz`,
`.digits.old-812-xyz`): a process killed with SIGKILL cannot clean up, so `sweep_leftovers`
removes what dead writers left (and puts back a folder killed between the two renames of a swap).

Light on purpose (standard library only): the torch-free inference engine uses it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from components.faults import kill_point


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        if target.exists():
            os.rename(target, old)  # a non-empty folder cannot be os.replace'd in one step
        kill_point("replace-dir")   # the crash tests' worst moment: target gone, old not yet back
        try:
            os.rename(tmp, target)
        except BaseException:
            if old.exists():
                os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# what atomic_file and replaced_dir name their temporary files and folders
_TMP_FILE = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?P<suffix>.*)$")
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def sweep_leftovers(root: Path, folders: tuple[str, ...] = ("data", "models", "exports", "reports")) -> list[str]:
    """Remove the temporary files and folders that writers killed before they could clean up left
    under `root`'s folders; a folder whose swap was cut between its two renames is put back.
    Entries of live processes are left alone. Returns what was done, one line per entry."""
    root = Path(root)
    found = []
    for top in folders:
        if (root / top).is_dir():
            found += [p for p in (root / top).rglob(".*") if _TMP_FILE.match(p.name) or _TMP_DIR.match(p.name)]
    done: list[str] = []
    for p in sorted(found, key=lambda q: len(q.parts)):   # a folder before what it holds
        if not os.path.lexists(p):
            continue   # inside a folder removed already
        m = _TMP_DIR.match(p.name) if p.is_dir() else _TMP_FILE.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        if p.is_dir() and m["kind"] == "old" and not os.path.lexists(p.parent / m["name"]):
            os.rename(p, p.parent / m["name"])   # the new folder never made it: the old one is current
            done.append(f"put back {p.parent / m['name']}")
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p}")
        else:
            p.unlink(missing_ok=True)
            done.append(f"removed {p}")
    return done
