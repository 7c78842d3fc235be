"""What `genflow run` checks before any work, without importing Prefect: bad input is refused in
one line in a fraction of a second, and nothing is trained, registered or written.

    keys = preflight(params, root, only=["digits-unet"])   # the models the run will train
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from components.config import Params
from components.errors import ServerError


def select_models(params: Params, only: Optional[list[str]]) -> list[str]:
    """The model keys of the run: --only's (each must exist), else every enabled model."""
    if only:
        for key in only:
            params.model(key)  # raises with the known keys
        return list(only)
    return [k for k, m in params.models.items() if m.enabled]


def check_sources(params: Params, datasets: list[str], root: Path = Path(".")) -> None:
    """Every dataset's source is a known kind and, for a path, exists (components.data.parse_source)."""
    from components import data

    for name in datasets:
        data.parse_source(name, params.dataset(name), root)


def check_devices(params: Params, keys: list[str]) -> None:
    """Every model's train.device and train.precision can be had on this machine (components.device).
    The defaults (auto, auto) always can: torch is imported only when a model sets one."""
    from components.device import resolve

    for key in keys:
        t = params.model(key).train
        if (t.device, t.precision) != ("auto", "auto"):
            resolve(t.device, t.precision, where=f"models.{key}.train")


def check_prefect_api() -> None:
    """PREFECT_API_URL pointing nowhere: one clear line before any work starts."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as r:
            r.read()
    except Exception as e:
        raise ServerError(f"PREFECT_API_URL={url} does not answer ({e.__class__.__name__}: {e}); "
                          "start the Prefect server or unset PREFECT_API_URL for local mode") from None


def preflight(params: Params, root: Path, only: Optional[list[str]] = None) -> list[str]:
    """Refuse what would fail later: unknown models, missing data, an unwritable DVC remote, servers
    that do not answer. Returns the model keys of the run."""
    from components import tracking
    from components.versioning import check_remote

    root = Path(root).resolve()
    keys = select_models(params, only)
    check_sources(params, sorted({params.model(k).dataset for k in keys}), root)
    check_devices(params, keys)   # a GPU or precision this machine lacks: before any model trains
    check_remote(root, params.storage.dvc_remote)   # data must reach it after training: check first
    check_prefect_api()
    tracking.check_tracking(root, params)  # params' tracking_uri too: an absent server stops the run first
    return keys
