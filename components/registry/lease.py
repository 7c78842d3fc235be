"""A lock on one model's aliases that lives in the registry itself, for clients on other machines.

    with registry_lease(client, "digits-unet"):    # waits while another client holds it
        ...                                         # re-read, move and verify the aliases

The file lock of `components.registry.aliases` serialises the genflow commands of one machine;
two machines sharing one MLflow server do not share it. The registry has no compare-and-set on
aliases, but creating a registered model is atomic: a second `create_registered_model` of the same
name fails with RESOURCE_ALREADY_EXISTS, on SQLite, PostgreSQL and through the server alike. The
lease is such a model, ``genflow-lease.<key>`` (no versions, no aliases), created on entry, deleted
on exit. Its tags say who holds it and until when: a lease whose holder died is taken over once it
has expired (LEASE_SECONDS after it was taken; an alias move takes seconds), or at once when the
holder was a process of this machine that is gone (killed with SIGKILL, say).
"""
from __future__ import annotations

import os
import random
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from components.errors import RegistryError

LEASE_PREFIX = "genflow-lease."
LEASE_SECONDS = 120.0      # a lease older than this is a dead holder's: taken over
WAIT_SECONDS = 180.0       # how long a client waits for a live holder before it gives up


def lease_name(key: str) -> str:
    return f"{LEASE_PREFIX}{key}"


def is_lease(name: str) -> bool:
    """A lease, not a model: listings leave it out."""
    return name.startswith(LEASE_PREFIX)


def _take(client: Any, name: str, token: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"genflow.lease.owner": token,
                                                   "genflow.lease.expires": f"{time.time() + LEASE_SECONDS:.3f}"},
                                       description="genflow: held while the aliases of a model move; not a model")
        return True
    except MlflowException as e:
        # RESOURCE_DOES_NOT_EXIST: the SQL store answers a name clash by reading the existing model
        # for its error message; when its holder dropped it in between, that read fails instead.
        # Either way the lease was held a moment ago: not taken, try again.
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
        return False


def _holder(client: Any, name: str) -> tuple[str, float]:
    """(owner, expiry) of the lease `name`; ('', inf) when it just went."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return "", float("inf")
    try:
        expires = float(tags.get("genflow.lease.expires", "0"))
    except ValueError:
        expires = 0.0
    return tags.get("genflow.lease.owner", "?"), expires


def _dead_here(owner: str) -> bool:
    """The owner token names a process of this machine that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _drop(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(name)
    except MlflowException:
        pass   # already gone: another client cleared it first


@contextmanager
def registry_lease(client: Any, key: str) -> Iterator[None]:
    """Hold the registry lease of `key` for the block (see the module's docstring)."""
    name = lease_name(key)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + WAIT_SECONDS
    while not _take(client, name, token):
        owner, expires = _holder(client, name)
        if time.time() > expires or _dead_here(owner):   # its holder died while holding it
            if _holder(client, name)[0] == owner:   # not yet taken over by another waiter
                _drop(client, name)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"{key}: the registry lease {name!r} is held by {owner} (until "
                                f"{time.strftime('%H:%M:%S', time.localtime(expires))}); another client is moving "
                                "its aliases: retry later, or delete that registered model if no client is running")
        time.sleep(0.05 + random.random() * 0.2)   # jitter: waiting clients do not retry in step
    try:
        yield
    finally:
        if _holder(client, name)[0] == token:   # never drop a lease taken over from us after expiry
            _drop(client, name)
