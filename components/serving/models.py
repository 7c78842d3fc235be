"""The served-model table: one loaded version per model under the alias, pinned versions in an LRU,
and the swap that makes a new version current.

A request takes the ``Served`` it will run on when it is admitted; a swap replaces the table's
entry (one dict assignment under a lock), so requests in flight finish on the version they
started on and the old engine is freed once the last of them is done.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from components.errors import ServerError
from components.inference import (
    CausalLMEngine,
    DiffusionEngine,
    EncDecEngine,
    Engine,
    InferenceError,
    SuperResEngine,
    TextDiffusionEngine,
    load_engine,
)
from components.inference.replay import replay
from components.registry.resolve import download_version

log = logging.getLogger("genflow.serve")


class SmokeCheckFailed(ServerError):
    """A new version did not load or did not answer one small request: it is not served."""


class VersionNotFound(ServerError):
    """The registry holds no such model or version (answered 404)."""


@dataclass
class Served:
    """One loaded version of a model: its engine and where it came from."""

    name: str
    version: str
    alias: Optional[str]          # None for a pinned version
    run_id: str
    engine: Engine
    parity_max_abs: Optional[float] = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def provider(self) -> str:
        return self.engine.provider


def parity_of(tags: dict) -> Optional[float]:
    try:
        return float(tags["genflow.parity_max_abs"])
    except (KeyError, TypeError, ValueError):
        return None


def smoke_check(engine: Engine) -> None:
    """One small request on a freshly loaded engine, then the export's parity inputs replayed on its
    session (outputs within export.parity_atol of those the parity gate saw); SmokeCheckFailed says
    what went wrong."""
    try:
        if isinstance(engine, TextDiffusionEngine):
            out = engine.sample_prompts([engine.smoke_prompt()], steps=min(2, engine.timesteps), guidance=1.0, seed=0)
        elif isinstance(engine, SuperResEngine):   # a mid-grey low-res image
            out = engine.upscale(np.zeros(engine.lowres_shape, np.float32), steps=min(2, engine.timesteps), seed=0)
        elif isinstance(engine, DiffusionEngine):
            out = engine.sample([0], steps=min(2, engine.timesteps), guidance=1.0, seed=0)
        elif isinstance(engine, EncDecEngine) and engine.prompts is not None:   # prompt -> pixels
            out = engine.sample_prompts([next((c for c in str(engine.config.get("vocab")) if c.strip()), "a")], seed=0)
        elif isinstance(engine, EncDecEngine):
            targets = engine.transduce([str(engine.config.get("vocab") or "a")[:1]], decoding="greedy")
            out = np.zeros(1) if targets and isinstance(targets[0], str) else np.full(1, np.nan)
        elif engine.kind == "image":
            assert isinstance(engine, CausalLMEngine)
            out = engine.sample_digits([0], seed=0)
        else:
            kw = {"steps": 1} if engine.graph == "masked_lm" else {}
            texts = engine.sample_text(None, length=2, count=1, seed=0, **kw)
            out = np.zeros(1) if texts and isinstance(texts[0], str) else np.full(1, np.nan)
    except Exception as e:  # any failure of a new version keeps the old one: say which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SmokeCheckFailed(f"{engine.name}: smoke request failed ({type(e).__name__}: {first[:300]})") from None
    if not np.all(np.isfinite(np.asarray(out, dtype=np.float64))):
        raise SmokeCheckFailed(f"{engine.name}: smoke request gave non-finite values (NaN or inf)")
    try:
        replayed = replay(engine.folder, engine.session)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SmokeCheckFailed(f"{engine.name}: replaying its export's parity inputs failed "
                               f"({type(e).__name__}: {first[:300]})") from None
    if replayed is not None and not replayed["max_abs"] <= replayed["atol"]:
        raise SmokeCheckFailed(f"{engine.name}: on {engine.provider} its export's parity inputs give "
                               f"{replayed['output']} off by {replayed['max_abs']:.3g} from the exported "
                               f"graph's (above export.parity_atol {replayed['atol']:g})")


def load_version(mv: Any, alias: Optional[str], root: Path, threads: Optional[int] = None,
                 check: bool = True) -> Served:
    """Download a registered version (an mlflow ModelVersion), load it on onnxruntime, smoke-check it.

    Raises SmokeCheckFailed when the files do not load or the small request fails.
    """
    name, version = mv.name, str(mv.version)
    with tempfile.TemporaryDirectory(prefix=f"genflow-serve-{name}-{version}-") as tmp:
        try:
            folder = download_version(name, None, version, root, Path(tmp))
        except InferenceError as e:
            if "holds no exported model" in str(e):  # for good, unlike a download that failed midway
                raise SmokeCheckFailed(f"{name}:{version}: {e}") from None
            raise
        try:
            engine = load_engine(folder, threads=threads)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SmokeCheckFailed(f"{name}:{version}: does not load ({first[:300]})") from None
    engine.name = name
    if check:
        smoke_check(engine)
    return Served(name, version, alias, mv.run_id or "", engine, parity_of(dict(mv.tags or {})))


class ModelTable:
    """Current version per model (under the alias) and an LRU of pinned versions."""

    def __init__(self, pinned_size: int = 4):
        self.pinned_size = max(1, pinned_size)
        self._current: dict[str, Served] = {}
        self._pinned: OrderedDict[tuple[str, str], Served] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def get(self, name: str) -> Optional[Served]:
        return self._current.get(name)

    def names(self) -> list[str]:
        return sorted(self._current)

    def swap(self, served: Served) -> Optional[Served]:
        """Make `served` the current version of its model; returns the one it replaced."""
        with self._lock:
            old = self._current.get(served.name)
            self._current[served.name] = served
        return old

    def pinned(self, name: str, version: str, load: Callable[[], Served]) -> Served:
        """The pinned version name:version, loaded with `load()` on first use (one load at a time per
        version); the least recently used one is dropped past `pinned_size`."""
        current = self._current.get(name)
        if current is not None and current.version == version:
            return current
        key = (name, version)
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                return self._pinned[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._pinned:
                    return self._pinned[key]
            served = load()
            with self._lock:
                self._pinned[key] = served
                while len(self._pinned) > self.pinned_size:
                    dropped, _ = self._pinned.popitem(last=False)
                    log.info("pinned version %s:%s dropped from the cache (size %d)", *dropped, self.pinned_size)
                self._loading.pop(key, None)
        return served

    def pinned_versions(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._pinned)
