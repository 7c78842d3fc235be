"""Flow objects at module level, for Prefect deployments (prefect.yaml: `flows/deploy.py:retrain`).

A deployment entrypoint names a module attribute that is a flow. flows.retrain builds its flow
inside `build_flow()` so that `genflow --help` never imports Prefect; this module keeps that
promise: importing it costs nothing, and reading `retrain` builds the flow once.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "retrain":
        from flows.retrain import build_flow

        flow = build_flow()
        globals()[name] = flow  # built once; later reads skip this function
        return flow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
