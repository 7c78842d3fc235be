"""Flow objects for Prefect deployments (prefect.yaml: `flows/deploy.py:retrain`).

The retrain flow is defined at module level in flows/retrain.py; this entrypoint names it. A
worker imports it with its own Prefect settings; the CLI sets genflow's (flows.cli.configure_environment).
"""
from __future__ import annotations

from flows.retrain import retrain

__all__ = ["retrain"]
