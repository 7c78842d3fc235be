"""Promotion and rollback as Prefect flows, so they can run from the Prefect UI.

Deployments: prefect.yaml (`flows/promote.py:promote_flow`, `flows/promote.py:rollback_flow`).
The flows are thin: the registry rules live in components/registry/.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from components.config import load_params


@flow(name="genflow-promote", log_prints=True, validate_parameters=False)
def promote_flow(model: str, version: str, reason: str = "manual promotion",
                 params_path: str = "params.yaml", root: str = ".") -> dict:
    """Make VERSION the champion of MODEL (the same checks as `genflow promote`)."""
    from components import registry

    root_p = Path(root).resolve()
    params = load_params(root_p / params_path)
    decision = registry.promote(model, version, reason, params, root_p)
    get_run_logger().info(f"{model} version {version} is champion ({decision.reason})")
    return decision.to_json()


@flow(name="genflow-rollback", log_prints=True, validate_parameters=False)
def rollback_flow(model: str, root: str = ".") -> str:
    """Make the previous champion of MODEL the champion again (as `genflow rollback`)."""
    from components import registry

    version = registry.rollback(model, Path(root).resolve())
    get_run_logger().info(f"{model}: version {version} is champion again")
    return str(version)
