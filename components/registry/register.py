"""Registering an ONNX model: signature, example inputs, pinned requirements, parity and metric tags.

A new version gets the alias challenger; the gate (`components.registry.promotion`) decides
whether it becomes champion.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from components.config import Params
from components.errors import RegistryError
from components.faults import kill_point
from components.layout import Layout
from components.registry.aliases import alias_lock, repair_history, set_alias, verify_aliases
from components.registry.card import model_card
from components.registry.lookup import (
    CHALLENGER,
    EVAL_HASH_TAG,
    HISTORY_TAG,
    METRIC_TAG,
    current_aliases,
    json_tag,
    metrics_of,
    now,
    registry_client,
)
from components.tracking.lineage import dist_version

MAX_DESCRIPTION = 5000                  # MLflow's column size for a version description


def onnx_signature(model: Any) -> Any:
    """Signature from the ONNX graph itself: named dynamic dims become -1."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from onnx import helper

    init = {t.name for t in model.graph.initializer}

    def spec(vi: Any) -> Any:
        t = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)), shape, vi.name)

    return ModelSignature(Schema([spec(i) for i in model.graph.input if i.name not in init]),
                          Schema([spec(o) for o in model.graph.output]))


def example_inputs(model: Any, dynamic: int = 2) -> dict:
    """Zeros for every graph input, with `dynamic` on each dynamic dimension."""
    import numpy as np
    from onnx import helper

    init = {t.name for t in model.graph.initializer}
    feed = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dynamic for d in t.shape.dim]
        feed[vi.name] = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feed


def pip_requirements() -> list[str]:
    """Pinned requirements of the ONNX pyfunc (given explicitly: inferring them takes 12-15 s)."""
    reqs = []
    for names in (("mlflow", "mlflow-skinny"), ("onnx",), ("onnxruntime", "onnxruntime-gpu"), ("numpy",)):
        for name in names:
            v = dist_version(name)
            if v != "not installed":
                reqs.append(f"{name}=={v}")
                break
    return reqs


def parity_tags(parity: Mapping[str, Any]) -> dict[str, str]:
    """Version tags of an export's parity result: genflow.parity (JSON), .parity_max_abs, .parity_ok."""
    tags = {"genflow.parity": json.dumps(dict(parity), default=str)[:5000]}
    max_abs = parity.get("max_abs", parity.get("parity_max_abs"))
    if max_abs is not None:
        tags["genflow.parity_max_abs"] = repr(float(max_abs))
    passed = parity.get("passed", parity.get("ok"))
    if passed is not None:
        tags["genflow.parity_ok"] = str(bool(passed)).lower()
    for k, v in parity.items():  # other scalar errors, e.g. max_rel, decode_max_abs
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("max_abs", "parity_max_abs"):
            tags[f"genflow.parity.{k}"] = repr(float(v))
    return tags


def register_onnx(key: str, onnx_path: Union[str, Path], run_id: str, metrics: Mapping[str, Any],
                  lineage: Mapping[str, str], parity: Mapping[str, Any], input_example: Any,
                  root: Path, *, extra_files: Sequence[Union[str, Path]] = (),
                  params: Optional[Params] = None, extra_tags: Optional[Mapping[str, str]] = None,
                  providers: Sequence[str] = ("CPUExecutionProvider",)) -> str:
    """Log `onnx_path` into run `run_id`, register it as model `key`, set alias challenger.

    metrics: the run's eval/, perf/, baseline/ values (become version tags genflow.metric.<name>).
    lineage: genflow.* tags (see tracking.lineage_tags); parity: the export's parity result
    (max_abs, passed). input_example: {input name: array}, one array for a one-input graph, or
    None for zeros. extra_files (e.g. decode.onnx, a config json) are logged as run artifacts
    under extras/ and listed in tag genflow.extra_files. Returns the new version number.
    """
    import mlflow
    import onnx
    from mlflow.exceptions import MlflowException

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: no ONNX file to register; run `genflow stage export {key}` first")
    missing = [str(p) for p in extra_files if not Path(p).is_file()]
    if missing:
        raise RegistryError(f"{missing[0]}: extra file of {key} not found; nothing registered")
    client = registry_client(root, params)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"run {run_id}: not found in {mlflow.get_tracking_uri()}; nothing registered") from None

    # A fresh ModelProto each time: log_model mutates the one it is given (external data).
    model = onnx.load(str(onnx_path))
    if input_example is None:
        input_example = example_inputs(model)
    elif not isinstance(input_example, Mapping):
        input_example = {onnx_signature(model).inputs.input_names()[0]: input_example}
    info = mlflow.onnx.log_model(
        model, name="model", run_id=run_id, signature=onnx_signature(model), input_example=dict(input_example),
        onnx_execution_providers=list(providers), pip_requirements=pip_requirements(),
        save_as_external_data=False)
    extras = []
    for p in map(Path, extra_files):
        client.log_artifact(run_id, str(p), "extras")
        extras.append(f"extras/{p.name}")

    dataset = lineage.get("genflow.dataset", "")
    tags = {k: str(v) for k, v in lineage.items()}
    tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tags.update(parity_tags(parity))
    tags.update({
        "genflow.model_key": key,
        EVAL_HASH_TAG: lineage.get(EVAL_HASH_TAG) or lineage.get(f"genflow.data_hash.{dataset}", "unknown"),
        "genflow.extra_files": json.dumps(extras),
        "genflow.registered_at": now(),
    })
    tags.update(extra_tags or {})
    mv = mlflow.register_model(info.model_uri, key, tags=tags)
    version = str(mv.version)
    kill_point("register")   # a version without its card and challenger alias: the rerun completes it
    complete_registration(client, key, version, root, params=params)
    return version


def complete_registration(client: Any, key: str, version: str, root: Path, *,
                          params: Optional[Params] = None) -> None:
    """The steps after a version is created: its model card (description and run artifact), the
    run's tag, alias challenger. Safe to repeat; a rerun calls it on a version whose registering
    process died in between (the version then has no alias history yet)."""
    mv = client.get_model_version(key, version)
    if any(k.startswith(HISTORY_TAG) for k in mv.tags):
        return   # challenger was set and written: the last step, so everything before it was done
    run_id = mv.run_id
    card = model_card(key, version, run_id, metrics_of(mv.tags), mv.tags, json_tag(mv.tags, "genflow.parity"),
                      run_params=client.get_run(run_id).data.params,
                      artifacts=artifact_paths(client, run_id), params=params)
    client.log_text(run_id, card, "model_card.md")
    if len(card) > MAX_DESCRIPTION:
        note = f"\n\n(cut here; the full card is model_card.md in run {run_id})"
        card = card[:MAX_DESCRIPTION - len(note)].rsplit("\n", 1)[0] + note
    client.update_model_version(key, version, description=card)
    client.set_tag(run_id, "genflow.registered_version", version)
    with alias_lock(root, key, client):
        current = current_aliases(client, key)
        repair_history(client, key, current)
        set_alias(client, key, CHALLENGER, version, by="register", reason="newly registered", current=current)
        verify_aliases(client, key, {CHALLENGER: version})


def register_model(key: str, run_id: str, metrics: Mapping[str, Any], parity: Mapping[str, Any],
                   params: Params, root: Path, *, inputs_hash: Optional[str] = None,
                   input_example: Any = None) -> str:
    """Register exports/<key>/model.onnx of run `run_id` (lineage from the run's genflow.* tags).

    Other files in exports/<key>/ (decode.onnx, config json, ...; not parity.json) go along as
    extras. inputs_hash lets the pipeline find this version again (`find_version`).
    """
    export_dir = Layout(root).export_dir(key)
    extras = sorted(p for p in export_dir.glob("*") if p.is_file()
                    and p.name not in ("model.onnx", "model.onnx.data", "parity.json"))
    client = registry_client(root, params)
    # the run's lineage, not what earlier registrations or decisions wrote to it
    skip = (HISTORY_TAG, "genflow.gate.", "genflow.parity", "genflow.registered_version")
    lineage = {k: v for k, v in client.get_run(run_id).data.tags.items()
               if k.startswith("genflow.") and not k.startswith(skip)}
    if inputs_hash:
        lineage["genflow.inputs_hash"] = inputs_hash
    return register_onnx(key, export_dir / "model.onnx", run_id, metrics, lineage, parity, input_example,
                         root, extra_files=extras, params=params)


def artifact_paths(client: Any, run_id: str) -> list[str]:
    """Artifact paths of a run, one folder deep (for the model card's links)."""
    out = []
    for top in client.list_artifacts(run_id):
        if top.is_dir:
            out += [a.path for a in client.list_artifacts(run_id, top.path)]
        else:
            out.append(top.path)
    return out
