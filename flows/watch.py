"""`genflow watch`: retraining when data arrives.

Every `--every` (or once, with `--once`) each dataset that an enabled model uses is hashed
(components/watch.py); when its source changed since the last look, a Prefect event
`genflow.data.changed` goes to PREFECT_API_URL's server:

    resource  {"prefect.resource.id": "genflow.dataset.<name>", "genflow.dataset": "<name>"}
    related   one {"prefect.resource.id": "genflow.model.<key>", "prefect.resource.role": "model"}
              per enabled model of that dataset
    payload   {"dataset", "old_hash", "new_hash", "change", "source", "models"}

prefect.yaml's `data-changed-retrain` deployment has a trigger on that event that runs the retrain
flow with `only` = the event's models: the models of that dataset, and none other.
The last seen state is kept in .genflow/watch.json; a dataset seen for the first time is recorded
and emits nothing; a dataset whose event could not be sent keeps its old state, so the next look
reports it again.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from components import watch
from components.config import Params
from components.errors import ConfigError, DataError, ServerError

EVENT = "genflow.data.changed"
RESOURCE_PREFIX = "genflow.dataset."
_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_every(text: str) -> float:
    """'60s', '5m', '1h' or a plain number of seconds -> seconds (at least 1)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"] if m else 0.0
    if seconds < 1:
        raise ConfigError(f"--every: {text!r} is not a duration of at least 1 second; e.g. 60s, 5m or 1h")
    return seconds


def watched_datasets(params: Params) -> dict[str, list[str]]:
    """{dataset: its enabled model keys}, for every dataset that an enabled model uses (the data a
    plain `genflow run` prepares)."""
    out: dict[str, list[str]] = {}
    for key, m in params.models.items():
        if m.enabled:
            out.setdefault(m.dataset, []).append(key)
    return dict(sorted(out.items()))


def emit_changed(name: str, before: dict, now: dict, change: str, models: list[str]) -> str:
    """Send one `genflow.data.changed` event to PREFECT_API_URL's server; returns its id."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ServerError(f"changed ({change}), but PREFECT_API_URL is not set: the event needs a "
                          "Prefect server; start one (`prefect server start --host 127.0.0.1`) and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api")
    from flows.preflight import check_prefect_api

    try:
        check_prefect_api()   # a server that does not answer: one line, and the change is kept for next time
    except ServerError as e:
        raise ServerError(f"changed ({change}), but {str(e).split('; ')[0]}; start the Prefect server "
                          "(or fix PREFECT_API_URL): the change is reported again next time") from None
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": f"{RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
                  "genflow.dataset": name},
        related=[{"prefect.resource.id": f"genflow.model.{k}", "prefect.resource.role": "model",
                  "prefect.resource.name": k} for k in models],
        payload={"dataset": name, "old_hash": before["hash"], "new_hash": now["hash"], "change": change,
                 "source": now["source"], "models": models},
    )
    if event is None:
        raise ServerError(f"changed ({change}), but the event could not be sent to "
                          f"{os.environ['PREFECT_API_URL']}; see the Prefect log above")
    EventsWorker.drain_all(timeout=60)   # sent before this process moves on (or exits)
    return str(event.id)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _to_stdout(line: str) -> None:
    print(line, flush=True)


def watch_once(params: Params, root: Path, say: Callable[[str], None] = _to_stdout,
               warn: Callable[[str], None] = _to_stderr) -> list[str]:
    """One look at every watched dataset: progress lines to `say`, one-line errors to `warn` (and
    returned; empty when all went well). The state file is rewritten after each dataset whose new
    state is kept."""
    state = watch.load_state(root)
    errors = []
    for name, models in watched_datasets(params).items():
        try:
            now = watch.source_state(name, params.dataset(name), root)
            before = state.get(name)
            change = watch.describe_change(before, now)
            if before is None:
                say(f"watch: {name} first seen ({_size(now)}), recorded")
            elif change is None:
                say(f"watch: {name} unchanged")
                continue
            else:
                emit_changed(name, before, now, change, models)
                say(f"watch: {name} changed ({change}) -> event {EVENT} (retrain {', '.join(models)})")
            state[name] = now
            watch.save_state(root, state)
        except (DataError, ServerError) as e:
            errors.append(f"watch: {name}: {e}")
            warn(errors[-1])
    return errors


def _size(now: dict) -> str:
    if now["files"] == 0:
        return now["source"]
    size = f"{now['bytes'] / 1e6:.1f} MB" if now["bytes"] >= 1e6 else f"{now['bytes'] / 1e3:.0f} kB"
    return f"{now['files']} file{'s' if now['files'] != 1 else ''}, {size}"


def watch_loop(params: Params, root: Path, every: float, once: bool) -> int:
    """`genflow watch`: look now, then every `every` seconds until Ctrl-C (or once). Returns the exit
    code: 1 when the single look of --once met an error; a loop reports errors and goes on."""
    while True:
        errors = watch_once(params, root)
        if once:
            return 1 if errors else 0
        time.sleep(every)
