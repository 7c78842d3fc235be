"""Alias moves and their history: set, remove, verify, champion moves, rollback.

Aliases of a registered model:

    challenger          the newest registered version (set by `register_onnx`)
    champion            the version users get (`models:/<key>@champion`); moved by `gate`/`promote`
    previous-champion   the champion it replaced; `rollback` makes it champion again

Every alias move is written to the version's tags (``genflow.alias_history.NNN``, one JSON event
each, numbered, append-only) and to its run's tags (``genflow.alias_history.v<version>.NNN``), so
history survives later moves.

Alias moves of one model happen under a file lock (<root>/.genflow/locks/<key>.lock) and, for
clients on other machines, a lease in the registry itself (`components.registry.lease`); they
re-read the aliases right before moving them and verify them afterwards, so two promotions at once
cannot leave the registry half-moved or its history with a hole.

Rollback: the previous champion becomes champion again; the demoted version loses every alias,
gets the tag ``genflow.rolled_back`` (when, why, which version replaced it), and `previous-champion`
is cleared (a second rollback refuses; promote a version explicitly instead).
"""
from __future__ import annotations

import fcntl
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from components.config import Params
from components.errors import RegistryError
from components.faults import kill_point
from components.layout import Layout
from components.registry.lease import registry_lease
from components.registry.lookup import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    PREVIOUS,
    current_aliases,
    now,
    registry_client,
    require_model,
    stamp,
)

LOCK_TIMEOUT_S = 120.0


@contextmanager
def alias_lock(root: Path, key: str, client: Any = None) -> Iterator[None]:
    """Exclusive lock on one model's aliases: processes and threads of this machine, and with
    `client` also every other client of the same registry (its lease)."""
    path = Layout(Path(root).resolve()).state / "locks" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"{path}: another promotion of {key} has held this lock for "
                                        f"{LOCK_TIMEOUT_S:.0f}s; wait for it, or delete the file "
                                        "if no genflow command is running") from None
                time.sleep(0.05)
        try:
            if client is None:
                yield
            else:
                with registry_lease(client, key):
                    yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _next_number(tags: Mapping[str, str]) -> int:
    nums = [int(k[len(HISTORY_TAG):]) for k in tags if k.startswith(HISTORY_TAG) and k[len(HISTORY_TAG):].isdigit()]
    return max(nums, default=0) + 1


def append_history(client: Any, key: str, version: str, event: dict) -> None:
    """Append one alias event to the version's tags (NNN) and its run's tags (v<version>.NNN)."""
    mv = client.get_model_version(key, version)
    n = _next_number(mv.tags)
    text = json.dumps({"version": str(version), **event}, sort_keys=True)
    client.set_model_version_tag(key, version, f"{HISTORY_TAG}{n:03d}", text)
    if mv.run_id:
        try:
            client.set_tag(mv.run_id, f"{HISTORY_TAG}v{version}.{n:03d}", text)
        except Exception as e:  # a deleted run must not block an alias move; the version holds the history
            print(f"warning: {key} version {version}: alias history not written to run {mv.run_id}: {e}")


def repair_history(client: Any, key: str, current: Mapping[str, str]) -> None:
    """Write the alias events that a process killed in the middle of a move did not (the alias
    moved, its history not yet): every holder's history ends with its alias set, and a version
    whose history says it holds an alias it lost gets the removal. Caller holds the lock."""
    for mv in client.search_model_versions(f"name='{key}'"):
        v = str(mv.version)
        numbered = sorted((k for k in mv.tags if k.startswith(HISTORY_TAG) and k[len(HISTORY_TAG):].isdigit()),
                          key=lambda k: int(k[len(HISTORY_TAG):]))
        last = {}
        for k in numbered:
            event = json.loads(mv.tags[k])
            last[event.get("alias")] = event.get("action")
        why = "recorded on the next move: the process that moved it was killed before writing this event"
        for alias, holder in current.items():
            if holder == v and last.get(alias) != "set":
                append_history(client, key, v, {"alias": alias, "action": "set", "by": "repair", "reason": why,
                                                "time": now(), "previous_holder": None})
        for alias, action in last.items():
            if action == "set" and current.get(alias) != v:
                append_history(client, key, v, {"alias": alias, "action": "removed", "by": "repair",
                                                "reason": why, "time": now(), "new_holder": current.get(alias)})


def set_alias(client: Any, key: str, alias: str, version: str, *, by: str, reason: str,
              current: dict[str, str]) -> None:
    """Point `alias` at `version`; write the move to both the new and the old holder's history."""
    old = current.get(alias)
    if old == version:
        return
    client.set_registered_model_alias(key, alias, version)
    current[alias] = version
    kill_point("alias-move")   # moved, its history not yet written: the next move repairs it
    when = now()
    append_history(client, key, version, {"alias": alias, "action": "set", "by": by, "reason": reason,
                                          "time": when, "previous_holder": old})
    if old is not None:
        append_history(client, key, old, {"alias": alias, "action": "removed", "by": by, "reason": reason,
                                          "time": when, "new_holder": version})


def remove_alias(client: Any, key: str, alias: str, *, by: str, reason: str, current: dict[str, str]) -> None:
    """Delete `alias`; write the removal to its old holder's history."""
    old = current.pop(alias, None)
    if old is None:
        return
    client.delete_registered_model_alias(key, alias)
    append_history(client, key, old, {"alias": alias, "action": "removed", "by": by, "reason": reason,
                                      "time": now(), "new_holder": None})


def verify_aliases(client: Any, key: str, expected: dict[str, Optional[str]]) -> None:
    """RegistryError when the aliases read back differ from `expected` (another client moved them)."""
    after = current_aliases(client, key)
    wrong = {a: (v, after.get(a)) for a, v in expected.items() if after.get(a) != v}
    if wrong:
        detail = ", ".join(f"{a} is {got or 'unset'} (expected {want or 'unset'})" for a, (want, got) in wrong.items())
        raise RegistryError(f"{key}: aliases changed while moving them ({detail}); another registry client "
                            "without genflow's lock moved them; check `genflow models` and retry")


def make_champion(client: Any, key: str, version: str, *, by: str, reason: str) -> Optional[str]:
    """Move champion to `version` (the old one becomes previous-champion). Caller holds the lock."""
    current = current_aliases(client, key)  # re-read right before moving
    repair_history(client, key, current)
    old = current.get(CHAMPION)
    if old == version:
        return old
    if old is not None:
        set_alias(client, key, PREVIOUS, old, by=by, reason=f"replaced by version {version}", current=current)
    set_alias(client, key, CHAMPION, version, by=by, reason=reason, current=current)
    if current.get(CHALLENGER) == version:
        remove_alias(client, key, CHALLENGER, by=by, reason="became champion", current=current)
    verify_aliases(client, key, {CHAMPION: version, **({PREVIOUS: old} if old is not None else {})})
    return old


# ---------------------------------------------------------------------------
# Reading the history, rolling back
# ---------------------------------------------------------------------------

def alias_history(key: str, version: Union[str, int], root: Path, params: Optional[Params] = None) -> list[dict]:
    """The alias events of one version, oldest first."""
    tags = registry_client(root, params).get_model_version(key, str(version)).tags
    keys = sorted((k for k in tags if k.startswith(HISTORY_TAG)), key=lambda k: int(k[len(HISTORY_TAG):]))
    return [json.loads(tags[k]) for k in keys]


def rollback(key: str, root: Path, reason: Optional[str] = None, params: Optional[Params] = None) -> str:
    """Make previous-champion champion again; returns that version.

    The demoted version loses its aliases and gets tag genflow.rolled_back; previous-champion is
    cleared. Refuses (RegistryError, registry unchanged) when there is no previous champion.
    """
    client = registry_client(root, params)
    require_model(client, key)
    with alias_lock(root, key, client):
        current = current_aliases(client, key)
        repair_history(client, key, current)
        prev, champ = current.get(PREVIOUS), current.get(CHAMPION)
        if prev is None:
            raise RegistryError(f"{key}: no previous-champion to roll back to (champion: "
                                f"{champ or 'none'}); promote a version instead: genflow promote {key} VERSION")
        why = (reason or "").strip() or "rollback"
        set_alias(client, key, CHAMPION, prev, by="rollback", reason=why, current=current)
        remove_alias(client, key, PREVIOUS, by="rollback", reason=f"version {prev} is champion again",
                     current=current)
        record = {"model": key, "time": now(), "reason": why, "champion": prev, "demoted": champ}
        if champ is not None:
            client.set_model_version_tag(key, champ, "genflow.rolled_back", json.dumps(record))
        for v in filter(None, (prev, champ)):
            run_id = client.get_model_version(key, v).run_id
            if run_id:
                client.log_dict(run_id, record, f"gate/rollback-{stamp()}.json")
        verify_aliases(client, key, {CHAMPION: prev, PREVIOUS: None})
    return prev
