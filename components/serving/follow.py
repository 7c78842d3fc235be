"""Following aliases: poll the registry, load a moved alias's version, smoke-check it, swap it in.

    follower = Follower(settings, table, metrics)
    follower.poll_once()          # blocking; the app runs it every --poll-seconds in a thread

A version that fails its smoke check is not served (the old one stays) and is not tried again
until the alias moves to another version. An unreachable registry changes nothing that is
served; the log says so once per outage, and again when it is back.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from components.serving.metrics import ServeMetrics
from components.serving.models import ModelTable, Served, SmokeCheckFailed, load_version

log = logging.getLogger("genflow.serve")

NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


@dataclass
class ModelState:
    """What /v1/models and /readyz say about one requested model besides its served version."""

    name: str
    wanted_version: Optional[str] = None     # the version the alias points at, as last seen
    problem: Optional[str] = None            # why it is not served (yet), for /readyz
    last_swap_error: Optional[str] = None
    failed_version: Optional[str] = None     # refused by the smoke check; not retried until the alias moves
    missing: bool = False                    # not registered, or no version holds the alias
    last_logged: Optional[str] = None        # the last problem logged, so a repeat is not logged each poll


@dataclass
class FollowSettings:
    root: Path
    tracking_uri: str
    alias: str = "champion"
    models: tuple[str, ...] = ()             # empty: every registered model holding the alias
    threads: Optional[int] = None


@dataclass
class RegistryState:
    reachable: Optional[bool] = None
    last_ok: Optional[float] = None
    outage_since: Optional[float] = None
    last_error: Optional[str] = None
    polls: int = 0


def is_not_found(e: Exception) -> bool:
    code = str(getattr(e, "error_code", "") or "")
    return any(c in code for c in NOT_FOUND_CODES)


def one_line(e: BaseException) -> str:
    from components.tracking import redact

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return redact(text[:300])


class Follower:
    """Keeps the table's versions equal to the registry's aliases."""

    def __init__(self, settings: FollowSettings, table: ModelTable, metrics: ServeMetrics,
                 loader: Optional[Callable[[Any, Optional[str]], Served]] = None, report_registry: bool = True):
        """report_registry=False: a second follower (the shadow's) leaves outages to the first."""
        self.settings, self.table, self.metrics = settings, table, metrics
        self.report_registry = report_registry
        self.states: dict[str, ModelState] = {n: ModelState(n) for n in settings.models}
        self.registry = RegistryState()
        self._loader = loader or (lambda mv, alias: load_version(mv, alias, settings.root, settings.threads))
        self._lock = threading.Lock()  # one poll at a time

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.settings.tracking_uri)

    def requested(self) -> list[str]:
        return sorted(self.states)

    # --- one poll ------------------------------------------------------------

    def poll_once(self) -> None:
        """Read every requested model's alias once; load and swap what moved. Never raises."""
        with self._lock:
            try:
                client = self.client()
                if not self.settings.models:  # default: every registered model that holds the alias
                    for m in client.search_registered_models(max_results=1000):
                        if self.settings.alias in (dict(getattr(m, "aliases", {}) or {})):
                            self.states.setdefault(m.name, ModelState(m.name))
                targets = {}
                for name in self.requested():
                    targets[name] = self._lookup(client, name)
            except Exception as e:  # connection refused, timeouts, a locked or missing store: an outage
                self._outage(e)
                return
            self._reachable()
            for name, mv in targets.items():
                if mv is not None:
                    self._follow(self.states[name], mv)

    def _lookup(self, client: Any, name: str) -> Any:
        """The version the alias points at, or None (model or alias missing: said in the state)."""
        from mlflow.exceptions import MlflowException

        state = self.states[name]
        try:
            return client.get_model_version_by_alias(name, self.settings.alias)
        except MlflowException as e:
            if not is_not_found(e):
                raise
        try:
            client.get_registered_model(name)
            problem = f"{name}: registered, but no version holds the alias {self.settings.alias!r}"
        except MlflowException as e:
            if not is_not_found(e):
                raise
            problem = f"{name}: not in the MLflow registry yet"
        state.missing = True
        if self.table.get(name) is None:
            state.problem = problem
        self._log_once(state, problem, logging.WARNING)
        return None

    def _follow(self, state: ModelState, mv: Any) -> None:
        version = str(mv.version)
        state.wanted_version, state.missing = version, False
        served = self.table.get(state.name)
        if served is not None and served.version == version:
            state.problem = None
            return
        if state.failed_version == version:
            return  # refused once; the alias must move again
        started = time.perf_counter()
        try:
            new = self._loader(mv, self.settings.alias)
        except SmokeCheckFailed as e:
            self.metrics.smoke_failures.labels(state.name, self.settings.alias).inc()
            state.failed_version = version
            state.last_swap_error = f"version {version} refused: {one_line(e)}"
            if served is None:
                state.problem = f"{state.name}: {state.last_swap_error}"
            kept = f"; still serving version {served.version}" if served else "; nothing served"
            log.error("%s: %s%s", state.name, state.last_swap_error, kept)
            return
        except Exception as e:  # a download that failed (registry went away mid-way): retried next poll
            msg = f"version {version} could not be downloaded: {one_line(e)}"
            state.last_swap_error = msg
            if served is None:
                state.problem = f"{state.name}: {msg}"
            self._log_once(state, msg, logging.WARNING)
            return
        old = self.table.swap(new)
        state.problem, state.last_swap_error, state.failed_version, state.last_logged = None, None, None, None
        self.metrics.swaps.labels(state.name, self.settings.alias).inc()
        number = float(version) if version.isdigit() else -1.0
        self.metrics.served_version.labels(state.name, self.settings.alias).set(number)
        took = time.perf_counter() - started
        if old is None:
            log.info("%s: serving version %s (%s@%s, run %s) on onnxruntime %s; loaded and checked in %.1fs",
                     state.name, version, state.name, self.settings.alias, new.run_id, new.provider, took)
        else:
            log.info("%s: %s moved %s -> %s; swapped after load and smoke check (%.1fs), provider %s",
                     state.name, self.settings.alias, old.version, version, took, new.provider)
        self._warn_provider(new)

    @staticmethod
    def _warn_provider(served: Served) -> None:
        import onnxruntime as ort

        if served.provider != "CUDAExecutionProvider" and "CUDAExecutionProvider" in ort.get_available_providers():
            log.warning("%s:%s: onnxruntime lists CUDA but the session runs on %s (CUDA libraries or GPU missing)",
                        served.name, served.version, served.provider)

    # --- registry reachability ---------------------------------------------

    def _outage(self, e: Exception) -> None:
        r = self.registry
        r.polls += 1
        r.last_error = one_line(e)
        if not self.report_registry:
            r.reachable = False
            return
        self.metrics.registry_up.set(0)
        self.metrics.polls.labels("unreachable").inc()
        if r.reachable is not False:
            r.outage_since = time.time()
            from components.tracking import redact

            log.warning("registry unreachable at %s (%s: %s); serving what is loaded, polling on",
                        redact(self.settings.tracking_uri), type(e).__name__, r.last_error)
        r.reachable = False

    def _reachable(self) -> None:
        r = self.registry
        r.polls += 1
        if not self.report_registry:
            r.reachable, r.last_ok = True, time.time()
            return
        if r.reachable is False and r.outage_since is not None:
            log.info("registry reachable again after %.0fs", time.time() - r.outage_since)
        r.reachable, r.last_ok, r.outage_since, r.last_error = True, time.time(), None, None
        self.metrics.registry_up.set(1)
        self.metrics.polls.labels("ok").inc()

    @staticmethod
    def _log_once(state: ModelState, message: str, level: int) -> None:
        if state.last_logged != message:
            log.log(level, "%s", message if message.startswith(state.name) else f"{state.name}: {message}")
            state.last_logged = message

    # --- readiness -------------------------------------------------------------

    def not_ready_reason(self) -> Optional[str]:
        """None when every requested model is served, else why not (one line)."""
        if self.registry.polls == 0:
            return "starting: the registry has not been read yet"
        names = self.requested()
        if not names:
            if self.registry.reachable is False:
                return f"registry unreachable ({self.registry.last_error}); no model to serve yet"
            return f"no registered model holds the alias {self.settings.alias!r} yet"
        missing = [n for n in names if self.table.get(n) is None]
        if not self.settings.models:  # discovered, not asked for: a champion that cannot be served does not block
            missing = [n for n in missing if self.states[n].failed_version is None]
        if not missing:
            return None
        reasons = []
        for n in missing:
            s = self.states[n]
            reasons.append(s.problem or (f"{n}: loading version {s.wanted_version}" if s.wanted_version
                                         else f"{n}: waiting for the registry"))
        return "; ".join(reasons)


@dataclass
class Poller:
    """Runs poll_once every `seconds` on a thread of the event loop's executor until cancelled."""

    follower: Follower
    seconds: float
    rounds: int = field(default=0)

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.to_thread(self.follower.poll_once)
            self.rounds += 1
            await asyncio.sleep(self.seconds)
