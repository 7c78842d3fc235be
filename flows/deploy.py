"""Flow objects for Prefect deployments (prefect.yaml: `flows/deploy.py:retrain`).

The retrain flow is defined at module level in flows/retrain.py; this entrypoint names it.
Importing this module costs nothing (no Prefect): reading `retrain` imports the flow module once,
so a worker imports it with its own Prefect settings (the CLI sets genflow's first:
flows.cli.configure_environment).
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "retrain":
        from flows.retrain import retrain

        globals()[name] = retrain  # later reads skip this function
        return retrain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
