"""Reading the registry: the client, versions by number or alias, aliases, metric tags.

Registered model name = model key. A version is named by a number or an alias, alone or with
its model: '3', 3, '<key>/3', 'models:/<key>/3', 'challenger', '<key>@challenger'.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from components.config import Params, PromotionRule
from components.errors import RegistryError
from components.registry.lease import is_lease
from components.tracking.uri import check_tracking

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
METRIC_TAG = "genflow.metric."          # + metric name, e.g. genflow.metric.eval/fd
HISTORY_TAG = "genflow.alias_history."  # + 3-digit event number
EVAL_HASH_TAG = "genflow.eval_data_hash"
SAMPLE_TIME = "perf/sample_ms_per_item"
GATE_DECISION_TAG = "genflow.gate.decision"   # written by every gate and manual promotion


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def registry_client(root: Path, params: Optional[Params] = None) -> Any:
    """An MlflowClient of this project's store (the server is probed first: `check_tracking`)."""
    import mlflow

    return mlflow.MlflowClient(check_tracking(root, params))


def now() -> str:
    """The local time, as written into alias events and decisions."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def stamp() -> str:
    """For artifact file names: two decisions in the same second must not overwrite each other."""
    return datetime.now().strftime("%Y%m%dT%H%M%S.%f")


def tag_float(text: Optional[str]) -> Optional[float]:
    """A tag's value as a number, or None when it is missing or not a number."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def fmt_value(x: Optional[float]) -> str:
    """A metric value for messages and tables: 4 significant digits, or n/a."""
    return "n/a" if x is None else f"{x:.4g}"


def promotion_rule(params: Params, key: str) -> PromotionRule:
    """promotion.rules[key], else promotion.default."""
    return params.promotion.rules.get(key, params.promotion.default)


def json_tag(tags: Mapping[str, str], name: str) -> dict:
    try:
        value = json.loads(tags.get(name, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    """{metric name: value} of a version's genflow.metric.* tags."""
    out = {}
    for k, v in tags.items():
        if k.startswith(METRIC_TAG) and (x := tag_float(v)) is not None:
            out[k[len(METRIC_TAG):]] = x
    return out


def current_aliases(client: Any, key: str) -> dict[str, str]:
    """{alias: version} of a registered model, read fresh from the registry."""
    return {a: str(v) for a, v in client.get_registered_model(key).aliases.items()}


def require_model(client: Any, key: str) -> None:
    """RegistryError naming the registered models when `key` is not one of them."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(key)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models(max_results=200)
                                 if not is_lease(m.name))) or "none"
        raise RegistryError(f"{key}: no registered model of that name; registered: {known}") from None


def parse_version_ref(key: str, ref: Union[str, int]) -> tuple[Optional[str], str]:
    """'3', 3, '<key>/3', 'models:/<key>/3', 'challenger', '<key>@challenger' -> (model, version or alias)."""
    text = str(ref).strip()
    text = text[len("models:/"):] if text.startswith("models:/") else text
    for sep in ("@", "/"):
        if sep in text:
            model, _, rest = text.rpartition(sep)
            return model, rest
    return None, text


def get_version(client: Any, key: str, ref: Union[str, int]) -> Any:
    """The ModelVersion `ref` of model `key`, or RegistryError naming what is wrong."""
    from mlflow.exceptions import MlflowException

    model, v = parse_version_ref(key, ref)
    if model and model != key:
        raise RegistryError(f"{ref}: that version belongs to model {model}, not {key}; nothing changed")
    require_model(client, key)
    try:
        mv = client.get_model_version_by_alias(key, v) if not v.isdigit() else client.get_model_version(key, v)
    except MlflowException:
        versions = sorted((int(m.version) for m in client.search_model_versions(f"name='{key}'")))
        raise RegistryError(f"{key}: no version or alias {v!r}; versions: "
                            f"{', '.join(map(str, versions)) or 'none'}; nothing changed") from None
    owner = mv.tags.get("genflow.model_key")
    if owner and owner != key:
        raise RegistryError(f"{key} version {mv.version}: registered for model {owner}, not {key}; nothing changed")
    return mv


# ---------------------------------------------------------------------------
# Reading versions and aliases
# ---------------------------------------------------------------------------

def aliases_of(key: str, version: Union[str, int], root: Path, params: Optional[Params] = None) -> list[str]:
    """Aliases pointing at one version, champion first."""
    order = {CHAMPION: 0, CHALLENGER: 1, PREVIOUS: 2}
    current = current_aliases(registry_client(root, params), key)
    return sorted((a for a, v in current.items() if v == str(version)), key=lambda a: (order.get(a, 9), a))


def find_version(key: str, tags: Mapping[str, str], root: Path, params: Optional[Params] = None) -> Optional[dict]:
    """The newest version of `key` whose tags include all of `tags` and that passed parity, or None.

    Returns {"version", "run_id", "metrics", "aliases", "parity_max_abs", "parity", "pending"};
    pending is True for a version never gated (its registering process died before the gate,
    or before its challenger alias): the pipeline finishes its registration and gates it.
    """
    from mlflow.exceptions import MlflowException

    client = registry_client(root, params)
    try:
        current = current_aliases(client, key)
    except MlflowException:
        return None
    versions = client.search_model_versions(f"name='{key}'")
    for mv in sorted(versions, key=lambda m: -int(m.version)):
        if all(mv.tags.get(k) == str(v) for k, v in tags.items()) and mv.tags.get("genflow.parity_ok") != "false":
            v = str(mv.version)
            return {"version": v, "run_id": mv.run_id, "metrics": metrics_of(mv.tags),
                    "aliases": [a for a in (CHAMPION, CHALLENGER, PREVIOUS) if current.get(a) == v],
                    "parity_max_abs": tag_float(mv.tags.get("genflow.parity_max_abs")),
                    "parity": json_tag(mv.tags, "genflow.parity"),
                    "pending": GATE_DECISION_TAG not in mv.tags}
    return None


def fetch_version(key: str, ref: Union[str, int], root: Path, dest: Union[str, Path],
                  params: Optional[Params] = None) -> dict[str, Path]:
    """Download a version (number or alias) into `dest`: {"model.onnx": path, <extra name>: path, ...}."""
    import mlflow

    client = registry_client(root, params)
    mv = get_version(client, key, ref)
    dest = Path(dest)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{key}/{mv.version}", dst_path=str(dest / "model")))
    files = {p.name: p for p in model_dir.glob("*.onnx")}
    for artifact in json.loads(mv.tags.get("genflow.extra_files", "[]")):
        files[Path(artifact).name] = Path(mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=artifact, dst_path=str(dest / "extras")))
    return files
