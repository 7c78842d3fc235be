"""DVC and code versioning: record data in dvc.lock, push it to the remote, hash the code.

Reading the data hashes back (dvc.lock) is lineage: `components.tracking.lineage.dataset_hashes`,
re-exported here. DVC takes a repository lock, so every call here goes through one
process-wide lock: never two DVC commands at once, even from parallel flow tasks.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from components.errors import ServerError, disk_full
from components.faults import kill_window
from components.files import atomic_file
from components.tracking.lineage import dataset_hashes, lock_hashes  # noqa: F401  (re-exported)
from components.tracking.uri import redact

_DVC_LOCK = threading.Lock()

# The source files whose change means a model must be retrained: components.families.registry
# (Backbone.code_paths), asked by flows/retrain.inputs_hash.


class VersioningError(ServerError):
    """A DVC operation failed; the message names the command and what to do."""


def code_version(root: Path, paths: Iterable[str]) -> str:
    """Short hash of the given source files (missing files count as empty)."""
    h = hashlib.sha256()
    for rel in sorted(paths):
        p = Path(root) / rel
        h.update(rel.encode())
        h.update(p.read_bytes() if p.exists() else b"")
    return h.hexdigest()[:16]


def is_dvc_repo(root: Path) -> bool:
    return (Path(root) / ".dvc").is_dir()


def _repo(root: Path):
    from dvc.repo import Repo  # lazy: dvc.repo costs ~0.6 s

    return Repo(str(root))


def commit_stages(root: Path, stages: Iterable[str]) -> None:
    """Record the current outputs of stages (e.g. 'prepare@digits') in dvc.lock and the cache."""
    stages = list(stages)
    if not stages or not is_dvc_repo(root):
        return
    with _DVC_LOCK:
        repair_lockfile(root)
        try:
            repo = _repo(root)
            try:
                with kill_window("dvc-commit"):
                    for stage in stages:
                        repo.commit(stage, force=True)
            finally:
                repo.close()
        except Exception as e:  # DVC raises many types; the user needs the stage and the reason
            raise VersioningError(f"dvc commit {' '.join(stages)} failed: {e}") from e
        if _lockfile_readable(Path(root) / "dvc.lock"):
            with atomic_file(_good_lockfile(root)) as tmp:
                shutil.copyfile(Path(root) / "dvc.lock", tmp)


# DVC rewrites dvc.lock in place (truncate, then write): a process killed in between leaves it
# empty or cut, and every later `dvc commit` fails on it. genflow keeps the last good copy.
def _good_lockfile(root: Path) -> Path:
    return Path(root) / ".genflow" / "dvc.lock.good"


def _lockfile_readable(path: Path) -> bool:
    """Whole: DVC's schema holds, and it ends as DVC ends it (a cut between two lines may parse)."""
    import voluptuous
    import yaml
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA

    try:
        text = path.read_text(encoding="utf-8")
        COMPILED_LOCKFILE_SCHEMA(yaml.safe_load(text))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, voluptuous.Invalid):
        return False
    return text.endswith("\n")


def repair_lockfile(root: Path) -> None:
    """A dvc.lock left empty or cut by a killed commit: put back the last good copy (the commit
    that follows records its stages again), or, without one, remove it."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists() or _lockfile_readable(lock):
        return
    good = _good_lockfile(root)
    if good.exists() and _lockfile_readable(good):
        with atomic_file(lock) as tmp:
            shutil.copyfile(good, tmp)
        print(f"{lock}: cut short by an interrupted dvc commit; put back the last good copy ({good})", flush=True)
    else:
        lock.unlink()
        print(f"{lock}: cut short by an interrupted dvc commit and no good copy kept; removed (the stages "
              "committed now are recorded again)", flush=True)


def remote_url(root: Path, remote: str = "") -> tuple[str, str]:
    """(name, url) of the remote `push` would use: storage.dvc_remote (a remote's name, a folder
    or a URL) or DVC's default remote; ("", "") when there is none."""
    if not is_dvc_repo(root):
        return "", ""
    with _DVC_LOCK:
        repo = _repo(root)
        try:
            remotes = repo.config.get("remote", {})
            name = remote if remote in remotes else ("" if remote else repo.config.get("core", {}).get("remote", ""))
        finally:
            repo.close()
    if name:
        return name, str(remotes.get(name, {}).get("url", ""))
    if remote:
        return "storage.dvc_remote", remote if "://" in remote else str((Path(root) / remote).resolve())
    return "", ""


def check_remote(root: Path, remote: str = "") -> None:
    """Refuse, before any work, a local DVC remote that cannot be written (a path through a regular
    file, or a read-only folder): otherwise models would be registered whose data never reach it.
    Remote object stores (s3://, ...) are checked by the push itself."""
    name, url = remote_url(root, remote)
    if not url or ("://" in url and not url.startswith("file://")):
        return
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    problem = None
    if not probe.is_dir():
        problem = f"{probe} is a file, so the folder {path} cannot be made"
    elif not os.access(probe, os.W_OK | os.X_OK):
        problem = f"{probe} is not writable"
    if problem:
        raise VersioningError(f"DVC remote {name} ({redact(url)}): {problem}; fix storage.dvc_remote in "
                              "params.yaml or `dvc remote modify` before running")


def push(root: Path, remote: str = "") -> int:
    """Push cached data to the remote: the default one, a configured remote's name (``stack``),
    or a folder or URL (``s3://bucket/path``).

    Returns the number of files pushed. A remote that refuses the data raises `VersioningError`
    with one line naming the remote and storage.dvc_remote (a password in its URL shows as ***).
    """
    if not is_dvc_repo(root):
        return 0
    with _DVC_LOCK, _transfer_errors() as failures:
        url = ""
        try:
            repo = _repo(root)
            try:
                name = None
                if remote and remote in repo.config.get("remote", {}):
                    name = remote
                elif remote:
                    name = "genflow-params"
                    with repo.config.edit("local") as conf:
                        conf["remote"][name] = {"url": remote}
                target = repo.cloud.get_remote(name)
                url = target.fs.unstrip_protocol(target.path)
                with kill_window("dvc-push"):
                    return int(repo.push(remote=name) or 0)
            finally:
                repo.close()
        except Exception as e:
            where = redact(remote) if remote else "the default DVC remote (.dvc/config)"
            _remove_partial_uploads(failures)
            if any(map(disk_full, failures)):
                raise VersioningError(f"dvc push to {where} failed: no space left on device at {redact(url)} "
                                      f"({len(failures)} files not pushed, none half-written left there); "
                                      "free space there and rerun") from e
            lines = str(e).strip().splitlines()  # DVC's messages may run to several lines
            reason = redact(lines[0] if lines else type(e).__name__)
            if failures:   # DVC's count alone does not say why
                reason += f" (first: {_first_line(failures[0])})"
            raise VersioningError(f"dvc push to {where} failed: {reason}; fix storage.dvc_remote in "
                                  "params.yaml (a remote name, folder or URL) or see `dvc remote list`") from e


# the loggers where DVC reports each file it could not transfer, with the error
_TRANSFER_LOGGERS = ("dvc_data.hashfile.transfer", "dvc_objects.fs.generic")


@contextmanager
def _transfer_errors() -> Iterator[list[BaseException]]:
    """Collect the errors DVC logs (one line and a traceback per file) while it pushes; they are
    summed up in the one line `push` raises instead of printed."""
    failures: list[BaseException] = []

    def keep(record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("failed to transfer") and record.exc_info and record.exc_info[1]:
            failures.append(record.exc_info[1])
            return False
        return True

    loggers = [logging.getLogger(n) for n in _TRANSFER_LOGGERS]
    for lg in loggers:
        lg.addFilter(keep)
    try:
        yield failures
    finally:
        for lg in loggers:
            lg.removeFilter(keep)


def _remove_partial_uploads(failures: list[BaseException]) -> None:
    """A local remote keeps the temporary file of an upload that failed (a full disk leaves one per
    file): remove those this push wrote, named by the errors themselves."""
    for e in failures:
        dest = getattr(e, "filename2", None)
        if dest and Path(dest).name.startswith(".") and Path(dest).name.endswith(".tmp"):
            Path(dest).unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return redact(f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__)
