"""MLflow model registry: register ONNX models, the promotion gate, manual promotion, rollback.

Registered model name = model key. Aliases:

    challenger          the newest registered version (set by `register_onnx`)
    champion            the version users get (`models:/<key>@champion`); moved by `gate`/`promote`
    previous-champion   the champion it replaced; `rollback` makes it champion again

Every alias move is written to the version's tags (``genflow.alias_history.NNN``, one JSON event
each, numbered, append-only) and to its run's tags (``genflow.alias_history.v<version>.NNN``), so
history survives later moves. Gate and promotion decisions are written to the version's tags
(``genflow.gate.decision``, ``.reason``, ``.values`` with both metric values), its run's tags and
a JSON artifact of the run (``gate/``).

Alias moves of one model happen under a file lock (<root>/.genflow/locks/<key>.lock), re-read the
aliases right before moving them and verify them afterwards, so two promotions at once cannot
leave the registry half-moved.

Rollback: the previous champion becomes champion again; the demoted version loses every alias,
gets the tag ``genflow.rolled_back`` (when, why, which version replaced it), and `previous-champion`
is cleared (a second rollback refuses; promote a version explicitly instead).
"""
from __future__ import annotations

import fcntl
import json
import math
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from components.config import Params, PromotionRule
from components.tracking import check_tracking

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
METRIC_TAG = "genflow.metric."          # + metric name, e.g. genflow.metric.eval/fd
HISTORY_TAG = "genflow.alias_history."  # + 3-digit event number
EVAL_HASH_TAG = "genflow.eval_data_hash"
SAMPLE_TIME = "perf/sample_ms_per_item"
MAX_DESCRIPTION = 5000                  # MLflow's column size for a version description
LOCK_TIMEOUT_S = 120.0


class RegistryError(ValueError):
    """A registry operation was refused; the message says what was wrong and what to do."""


@dataclass
class Decision:
    """Outcome of the promotion gate (or of a manual promotion)."""
    promoted: bool
    reason: str
    challenger_value: Optional[float] = None
    champion_value: Optional[float] = None
    version: str = ""
    champion_version: Optional[str] = None   # the champion it was compared with (and replaced)
    metric: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def _client(root: Path, params: Optional[Params] = None) -> Any:
    import mlflow

    return mlflow.MlflowClient(check_tracking(root, params))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _stamp() -> str:
    """For artifact file names: two decisions in the same second must not overwrite each other."""
    return datetime.now().strftime("%Y%m%dT%H%M%S.%f")


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _rule(params: Params, key: str) -> PromotionRule:
    return params.promotion.rules.get(key, params.promotion.default)


def _metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for k, v in tags.items():
        if k.startswith(METRIC_TAG) and (x := _float(v)) is not None:
            out[k[len(METRIC_TAG):]] = x
    return out


@contextmanager
def _lock(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock on one model's aliases (processes and threads of this machine)."""
    path = Path(root).resolve() / ".genflow" / "locks" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(f"{path}: another promotion of {key} has held this lock for "
                                        f"{LOCK_TIMEOUT_S:.0f}s; wait for it, or delete the file "
                                        "if no genflow command is running") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _aliases(client: Any, key: str) -> dict[str, str]:
    """{alias: version} of a registered model, read fresh from the registry."""
    return {a: str(v) for a, v in client.get_registered_model(key).aliases.items()}


def _require_model(client: Any, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(key)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models(max_results=200))) or "none"
        raise RegistryError(f"{key}: no registered model of that name; registered: {known}") from None


def _version_ref(key: str, ref: Union[str, int]) -> tuple[Optional[str], str]:
    """'3', 3, '<key>/3', 'models:/<key>/3', 'challenger', '<key>@challenger' -> (model, version or alias)."""
    text = str(ref).strip()
    text = text[len("models:/"):] if text.startswith("models:/") else text
    for sep in ("@", "/"):
        if sep in text:
            model, _, rest = text.rpartition(sep)
            return model, rest
    return None, text


def _get_version(client: Any, key: str, ref: Union[str, int]) -> Any:
    """The ModelVersion `ref` of model `key`, or RegistryError naming what is wrong."""
    from mlflow.exceptions import MlflowException

    model, v = _version_ref(key, ref)
    if model and model != key:
        raise RegistryError(f"{ref}: that version belongs to model {model}, not {key}; nothing changed")
    _require_model(client, key)
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


def _parity_problem(tags: Mapping[str, str], params: Params) -> Optional[str]:
    """Why a version fails the parity guardrail, or None when it passes."""
    ok = tags.get("genflow.parity_ok")
    max_abs = _float(tags.get("genflow.parity_max_abs"))
    if ok is None and max_abs is None:
        return "no ONNX parity result on this version"
    if ok == "false":
        return f"ONNX parity failed (max abs error {_fmt(max_abs)})"
    # an explicit pass from the export (atol + rtol * |reference|) wins over the bare atol check
    if ok != "true" and (max_abs is None or not max_abs <= params.export.parity_atol):  # NaN fails too
        return f"ONNX parity max abs error {_fmt(max_abs)} above export.parity_atol {params.export.parity_atol:g}"
    return None


# ---------------------------------------------------------------------------
# Alias moves and their history
# ---------------------------------------------------------------------------

def _next_number(tags: Mapping[str, str]) -> int:
    nums = [int(k[len(HISTORY_TAG):]) for k in tags if k.startswith(HISTORY_TAG) and k[len(HISTORY_TAG):].isdigit()]
    return max(nums, default=0) + 1


def _append_history(client: Any, key: str, version: str, event: dict) -> None:
    """Append one alias event to the version's tags (NNN) and its run's tags (v<version>.NNN)."""
    mv = client.get_model_version(key, version)
    n = _next_number(mv.tags)
    text = json.dumps({"version": str(version), **event}, sort_keys=True)
    client.set_model_version_tag(key, version, f"{HISTORY_TAG}{n:03d}", text)
    if mv.run_id:
        try:
            client.set_tag(mv.run_id, f"{HISTORY_TAG}v{version}.{n:03d}", text)
        except Exception as e:  # a deleted run must not block an alias move; the version holds the history
            print(f"warning: {key} version {version}: alias history not written to run {mv.run_id}: {e}")


def _set_alias(client: Any, key: str, alias: str, version: str, *, by: str, reason: str,
               current: dict[str, str]) -> None:
    """Point `alias` at `version`; write the move to both the new and the old holder's history."""
    old = current.get(alias)
    if old == version:
        return
    client.set_registered_model_alias(key, alias, version)
    current[alias] = version
    when = _now()
    _append_history(client, key, version, {"alias": alias, "action": "set", "by": by, "reason": reason,
                                           "time": when, "previous_holder": old})
    if old is not None:
        _append_history(client, key, old, {"alias": alias, "action": "removed", "by": by, "reason": reason,
                                           "time": when, "new_holder": version})


def _remove_alias(client: Any, key: str, alias: str, *, by: str, reason: str, current: dict[str, str]) -> None:
    old = current.pop(alias, None)
    if old is None:
        return
    client.delete_registered_model_alias(key, alias)
    _append_history(client, key, old, {"alias": alias, "action": "removed", "by": by, "reason": reason,
                                       "time": _now(), "new_holder": None})


def _verify(client: Any, key: str, expected: dict[str, Optional[str]]) -> None:
    after = _aliases(client, key)
    wrong = {a: (v, after.get(a)) for a, v in expected.items() if after.get(a) != v}
    if wrong:
        detail = ", ".join(f"{a} is {got or 'unset'} (expected {want or 'unset'})" for a, (want, got) in wrong.items())
        raise RegistryError(f"{key}: aliases changed while moving them ({detail}); another registry client "
                            "without genflow's lock moved them; check `genflow models` and retry")


def _make_champion(client: Any, key: str, version: str, *, by: str, reason: str) -> Optional[str]:
    """Move champion to `version` (the old one becomes previous-champion). Caller holds the lock."""
    current = _aliases(client, key)  # re-read right before moving
    old = current.get(CHAMPION)
    if old == version:
        return old
    if old is not None:
        _set_alias(client, key, PREVIOUS, old, by=by, reason=f"replaced by version {version}", current=current)
    _set_alias(client, key, CHAMPION, version, by=by, reason=reason, current=current)
    if current.get(CHALLENGER) == version:
        _remove_alias(client, key, CHALLENGER, by=by, reason="became champion", current=current)
    _verify(client, key, {CHAMPION: version, **({PREVIOUS: old} if old is not None else {})})
    return old


def _record_decision(client: Any, key: str, mv: Any, decision: Decision, by: str) -> None:
    """The decision, its reason and both values: version tags, run tags and run artifact gate/*.json."""
    when = _now()
    values = {"metric": decision.metric, "challenger": decision.challenger_value,
              "champion": decision.champion_value, "champion_version": decision.champion_version,
              "by": by, "time": when}
    # three version tags (each write to a version costs a registry round trip); the run gets one tag per value
    version_tags = {
        "genflow.gate.decision": "promoted" if decision.promoted else "rejected",
        "genflow.gate.reason": decision.reason[:5000],
        "genflow.gate.values": json.dumps(values),
    }
    for k, v in version_tags.items():
        client.set_model_version_tag(key, mv.version, k, v)
    if mv.run_id:
        from mlflow.entities import RunTag

        run_tags = {**version_tags, **{f"genflow.gate.{k}": "none" if v is None else str(v) for k, v in values.items()}}
        run_tags.pop("genflow.gate.values")
        client.log_batch(mv.run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
        client.log_dict(mv.run_id, {**decision.to_json(), "model": key, "by": by, "time": when},
                        f"gate/v{mv.version}-{by}-{_stamp()}.json")


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

def _signature(model: Any) -> Any:
    """Signature from the ONNX graph itself: named dynamic dims become -1."""
    import numpy as np
    from onnx import helper
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

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


def _pip_requirements() -> list[str]:
    """Pinned requirements of the ONNX pyfunc (given explicitly: inferring them takes 12-15 s)."""
    from components.tracking import _dist_version

    reqs = []
    for names in (("mlflow", "mlflow-skinny"), ("onnx",), ("onnxruntime", "onnxruntime-gpu"), ("numpy",)):
        for name in names:
            v = _dist_version(name)
            if v != "not installed":
                reqs.append(f"{name}=={v}")
                break
    return reqs


def _parity_tags(parity: Mapping[str, Any]) -> dict[str, str]:
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
    client = _client(root, params)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"run {run_id}: not found in {mlflow.get_tracking_uri()}; nothing registered") from None

    # A fresh ModelProto each time: log_model mutates the one it is given (external data).
    model = onnx.load(str(onnx_path))
    if input_example is None:
        input_example = example_inputs(model)
    elif not isinstance(input_example, Mapping):
        input_example = {_signature(model).inputs.input_names()[0]: input_example}
    info = mlflow.onnx.log_model(
        model, name="model", run_id=run_id, signature=_signature(model), input_example=dict(input_example),
        onnx_execution_providers=list(providers), pip_requirements=_pip_requirements(),
        save_as_external_data=False)
    extras = []
    for p in map(Path, extra_files):
        client.log_artifact(run_id, str(p), "extras")
        extras.append(f"extras/{p.name}")

    dataset = lineage.get("genflow.dataset", "")
    tags = {k: str(v) for k, v in lineage.items()}
    tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tags.update(_parity_tags(parity))
    tags.update({
        "genflow.model_key": key,
        EVAL_HASH_TAG: lineage.get(EVAL_HASH_TAG) or lineage.get(f"genflow.data_hash.{dataset}", "unknown"),
        "genflow.extra_files": json.dumps(extras),
        "genflow.registered_at": _now(),
    })
    tags.update(extra_tags or {})
    mv = mlflow.register_model(info.model_uri, key, tags=tags)
    version = str(mv.version)

    card = model_card(key, version, run_id, metrics, tags, parity,
                      run_params=client.get_run(run_id).data.params,
                      artifacts=_artifact_paths(client, run_id), params=params)
    client.log_text(run_id, card, "model_card.md")
    if len(card) > MAX_DESCRIPTION:
        note = f"\n\n(cut here; the full card is model_card.md in run {run_id})"
        card = card[:MAX_DESCRIPTION - len(note)].rsplit("\n", 1)[0] + note
    client.update_model_version(key, version, description=card)
    client.set_tag(run_id, "genflow.registered_version", version)
    with _lock(root, key):
        current = _aliases(client, key)
        _set_alias(client, key, CHALLENGER, version, by="register", reason="newly registered", current=current)
        _verify(client, key, {CHALLENGER: version})
    return version


def register_model(key: str, run_id: str, metrics: Mapping[str, Any], parity: Mapping[str, Any],
                   params: Params, root: Path, *, inputs_hash: Optional[str] = None,
                   input_example: Any = None) -> str:
    """Register exports/<key>/model.onnx of run `run_id` (lineage from the run's genflow.* tags).

    Other files in exports/<key>/ (decode.onnx, config json, ...; not parity.json) go along as
    extras. inputs_hash lets the pipeline find this version again (`find_version`).
    """
    export_dir = Path(root) / "exports" / key
    extras = sorted(p for p in export_dir.glob("*") if p.is_file()
                    and p.name not in ("model.onnx", "model.onnx.data", "parity.json"))
    client = _client(root, params)
    # the run's lineage, not what earlier registrations or decisions wrote to it
    skip = (HISTORY_TAG, "genflow.gate.", "genflow.parity", "genflow.registered_version")
    lineage = {k: v for k, v in client.get_run(run_id).data.tags.items()
               if k.startswith("genflow.") and not k.startswith(skip)}
    if inputs_hash:
        lineage["genflow.inputs_hash"] = inputs_hash
    return register_onnx(key, export_dir / "model.onnx", run_id, metrics, lineage, parity, input_example,
                         root, extra_files=extras, params=params)


def _artifact_paths(client: Any, run_id: str) -> list[str]:
    out = []
    for top in client.list_artifacts(run_id):
        if top.is_dir:
            out += [a.path for a in client.list_artifacts(run_id, top.path)]
        else:
            out.append(top.path)
    return out


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------

def model_card(key: str, version: str, run_id: str, metrics: Mapping[str, Any], tags: Mapping[str, str],
               parity: Mapping[str, Any], run_params: Mapping[str, str], artifacts: Sequence[str],
               params: Optional[Params] = None) -> str:
    """Markdown card: data and hashes, metrics next to baselines and the real-data floor, samples,
    params, intended use and limits."""
    family, backbone = tags.get("genflow.family", "?"), tags.get("genflow.backbone", "?")
    dataset = tags.get("genflow.dataset", "?")
    source = run_params.get("dataset.source", "?")
    lines = [f"# {key} — version {version}", "",
             f"A {family} model ({backbone} backbone) trained on dataset `{dataset}` (`{source}`), "
             f"exported to ONNX and registered by genflow from run `{run_id}`.", "",
             "## Data", "",
             f"- evaluation data hash: `{tags.get(EVAL_HASH_TAG, 'unknown')}`"]
    lines += [f"- `{k[len('genflow.data_hash.'):]}`: `{v}`" for k, v in sorted(tags.items())
              if k.startswith("genflow.data_hash.")]
    lines += ["", "## Lineage", "",
              f"- git commit `{tags.get('genflow.git_commit', 'unknown')}` (uncommitted changes: "
              f"{tags.get('genflow.git_dirty', 'unknown')})",
              f"- params hash `{tags.get('genflow.params_hash', 'unknown')}`, "
              f"flow run `{tags.get('genflow.flow_run_id', 'none')}`",
              "- " + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(tags.items())
                               if k.startswith("genflow.version."))]

    num = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += ["", "## Metrics (held-out test split)", "",
              "| metric | this model | real data (floor) | baselines |", "|---|---|---|---|"]
    for name in sorted(k for k in num if k.startswith("eval/")):
        base = name.split("/", 1)[1]
        floor = num.get(f"baseline/real_{base}")
        others = [f"{k.split('/', 1)[1][:-len(base) - 1]} {_fmt(v)}" for k, v in sorted(num.items())
                  if k.startswith("baseline/") and k.endswith(f"_{base}") and k != f"baseline/real_{base}"]
        lines.append(f"| {name} | {_fmt(num[name])} | {_fmt(floor)} | {', '.join(others) or '-'} |")
    perf = [f"{k} {_fmt(v)}" for k, v in sorted(num.items()) if k.startswith(("perf/", "train/"))]
    if perf:
        lines += ["", "Cost: " + ", ".join(perf)]
    if params is not None:
        rule = _rule(params, key)
        lines += ["", f"Promotion rule: {rule.metric} ({'lower' if rule.direction == 'min' else 'higher'} is "
                      f"better), at least {rule.min_improvement:.1%} better than the champion; sampling at most "
                      f"{params.promotion.max_sample_slowdown:.0%} slower; ONNX parity within "
                      f"{params.export.parity_atol:g}."]
    lines += ["", "## ONNX parity", "",
              f"Max abs error against eager PyTorch: {_fmt(_float(tags.get('genflow.parity_max_abs')))} "
              f"(passed: {tags.get('genflow.parity_ok', 'unknown')})."]

    samples = [a for a in artifacts if Path(a).name.startswith("samples")]
    lines += ["", "## Samples", ""]
    lines += [f"- [{a}](runs:/{run_id}/{a})" + (f"\n\n![samples]({a})" if a.endswith(".png") else "")
              for a in samples] or ["No sample files were logged with this run."]

    lines += ["", "## Intended use and limits", ""] + _limits(run_params.get("dataset.kind", ""))
    if run_params:
        lines += ["", "## Parameters", "", "| param | value |", "|---|---|"]
        lines += [f"| {k} | {str(v)[:80]} |" for k, v in sorted(run_params.items())]
    return "\n".join(lines) + "\n"


def _limits(kind: str) -> list[str]:
    lines = [
        "- A small model trained for minutes on a CPU: a baseline for comparing diffusion and "
        "transformer models on the same data, not a production generator.",
        "- Metrics hold for this dataset's held-out split only; read them next to the baselines "
        "and the real-data floor above, not alone.",
        "- Samples can reproduce training items; check eval/nn_ratio (images) before any use "
        "that needs novel outputs.",
    ]
    if kind == "text":
        lines.append("- Generates characters of the training corpus's vocabulary only; the text is not "
                     "checked for correctness or safety.")
    elif kind == "image":
        lines.append("- Generates images of the training data's size, grey levels and classes only.")
    return lines


# ---------------------------------------------------------------------------
# Promotion gate, manual promotion, rollback
# ---------------------------------------------------------------------------

def _judge(client: Any, key: str, mv: Any, params: Params,
           champion_metrics_on_new_data: Optional[Mapping[str, Any]]) -> Decision:
    """Compare version `mv` with the champion by the model's promotion rule (no registry writes)."""
    rule = _rule(params, key)
    v = str(mv.version)
    d = Decision(False, "", version=v, metric=rule.metric)
    problem = _parity_problem(mv.tags, params)
    if problem:
        d.reason = f"guardrail: {problem}"
        return d
    mine = _metrics_of(mv.tags)
    d.challenger_value = mine.get(rule.metric)
    if d.challenger_value is None or math.isnan(d.challenger_value):
        d.reason = f"version {v} has no {rule.metric}; cannot compare (promote it by hand if intended)"
        return d
    champ = _aliases(client, key).get(CHAMPION)
    if champ is None:
        d.promoted = True
        d.reason = f"first valid version: {rule.metric} {_fmt(d.challenger_value)}"
        return d
    d.champion_version = champ
    if champ == v:
        d.champion_value = d.challenger_value
        d.reason = f"version {v} is already champion"
        return d
    champ_tags = client.get_model_version(key, champ).tags
    if champion_metrics_on_new_data is not None:
        theirs = {k: float(x) for k, x in champion_metrics_on_new_data.items()
                  if isinstance(x, (int, float)) and not isinstance(x, bool)}
        theirs.setdefault(SAMPLE_TIME, _metrics_of(champ_tags).get(SAMPLE_TIME))
        basis = "champion re-evaluated on the new data"
    else:
        mine_hash, their_hash = mv.tags.get(EVAL_HASH_TAG, "unknown"), champ_tags.get(EVAL_HASH_TAG, "unknown")
        if mine_hash == "unknown" or mine_hash != their_hash:
            d.reason = (f"not comparable: evaluation data differ (version {v}: {mine_hash}, champion {champ}: "
                        f"{their_hash}); re-evaluate the champion on the new data first")
            return d
        theirs = _metrics_of(champ_tags)
        basis = "same evaluation data"
    d.champion_value = theirs.get(rule.metric)
    if d.champion_value is None:
        d.reason = f"champion {champ} has no {rule.metric}; cannot compare (promote by hand if intended)"
        return d

    a, b = d.challenger_value, d.champion_value
    better = (b - a) if rule.direction == "min" else (a - b)
    gain = better / abs(b) if b != 0 else (math.inf if better > 0 else (0.0 if better == 0 else -math.inf))
    needs = f"{'>' if rule.min_improvement == 0 else '>='} {rule.min_improvement:.1%}"
    compared = f"{rule.metric} {_fmt(a)} vs {_fmt(b)} of champion version {champ} ({gain:+.1%}, needs {needs}; {basis})"
    if not (gain > 0 and gain >= rule.min_improvement):
        d.reason = f"not better enough: {compared}"
        return d
    mine_t, theirs_t = mine.get(SAMPLE_TIME), theirs.get(SAMPLE_TIME)
    limit = params.promotion.max_sample_slowdown
    if mine_t is not None and theirs_t is not None and mine_t > theirs_t * (1 + limit):
        d.reason = (f"guardrail: sampling {_fmt(mine_t)} ms/item vs champion's {_fmt(theirs_t)} is "
                    f"{mine_t / theirs_t - 1:.0%} slower (allowed {limit:.0%}); {compared}")
        return d
    d.promoted = True
    d.reason = f"better: {compared}"
    return d


def stale_champion(key: str, version: Union[str, int], root: Path,
                   params: Optional[Params] = None) -> Optional[str]:
    """The champion's run id when its metrics were measured on other evaluation data than
    `version`'s (the data changed since), so the gate needs it re-evaluated; else None."""
    client = _client(root, params)
    champ = _aliases(client, key).get(CHAMPION)
    if champ is None or champ == str(version):
        return None
    mine = client.get_model_version(key, str(version)).tags.get(EVAL_HASH_TAG, "unknown")
    theirs = client.get_model_version(key, champ)
    if mine != "unknown" and mine == theirs.tags.get(EVAL_HASH_TAG, "unknown"):
        return None
    return theirs.run_id


def gate(key: str, version: Union[str, int], params: Params, root: Path,
         champion_metrics_on_new_data: Optional[Mapping[str, Any]] = None) -> Decision:
    """The promotion gate: promote `version` to champion if it beats the champion by the rule.

    Rule (promotion.rules[key] or promotion.default): primary metric, direction, minimum relative
    improvement; guardrails: ONNX parity passed, perf/sample_ms_per_item at most
    max_sample_slowdown slower. The first valid version becomes champion. Versions are compared
    only on the same evaluation data (tag genflow.eval_data_hash) unless
    `champion_metrics_on_new_data` gives the champion's metrics re-measured on the new data.
    The decision is written to the version's tags and its run either way; a rejected version
    keeps its aliases (challenger).
    """
    client = _client(root, params)
    with _lock(root, key):
        mv = _get_version(client, key, version)
        d = _judge(client, key, mv, params, champion_metrics_on_new_data)
        if d.champion_version == d.version:
            return d  # gating the champion again: nothing to decide, nothing written
        if d.promoted:
            _make_champion(client, key, str(mv.version), by="gate", reason=d.reason)
        _record_decision(client, key, mv, d, by="gate")
    return d


def promote(key: str, version: Union[str, int], reason: Optional[str], params: Params, root: Path) -> Decision:
    """Manual promotion of `version` (a number, an alias, or '<key>/<n>') to champion.

    Refuses (RegistryError, registry unchanged) a version that does not exist, that failed ONNX
    parity, or that belongs to another model.
    """
    client = _client(root, params)
    with _lock(root, key):
        mv = _get_version(client, key, version)
        v = str(mv.version)
        problem = _parity_problem(mv.tags, params)
        if problem:
            raise RegistryError(f"{key} version {v}: {problem}; not promoted, nothing changed")
        rule = _rule(params, key)
        champ = _aliases(client, key).get(CHAMPION)
        d = Decision(False, "", _metrics_of(mv.tags).get(rule.metric), None, v, champ, rule.metric)
        if champ is not None:
            d.champion_value = _metrics_of(client.get_model_version(key, champ).tags).get(rule.metric)
        if champ == v:
            d.reason = f"version {v} is already champion; nothing changed"
            return d
        d.promoted = True
        d.reason = f"manual: {(reason or '').strip() or 'no reason given'}"
        _make_champion(client, key, v, by="promote", reason=d.reason)
        _record_decision(client, key, mv, d, by="promote")
    return d


def rollback(key: str, root: Path, reason: Optional[str] = None, params: Optional[Params] = None) -> str:
    """Make previous-champion champion again; returns that version.

    The demoted version loses its aliases and gets tag genflow.rolled_back; previous-champion is
    cleared. Refuses (RegistryError, registry unchanged) when there is no previous champion.
    """
    client = _client(root, params)
    _require_model(client, key)
    with _lock(root, key):
        current = _aliases(client, key)
        prev, champ = current.get(PREVIOUS), current.get(CHAMPION)
        if prev is None:
            raise RegistryError(f"{key}: no previous-champion to roll back to (champion: "
                                f"{champ or 'none'}); promote a version instead: genflow promote {key} VERSION")
        why = (reason or "").strip() or "rollback"
        _set_alias(client, key, CHAMPION, prev, by="rollback", reason=why, current=current)
        _remove_alias(client, key, PREVIOUS, by="rollback", reason=f"version {prev} is champion again",
                      current=current)
        record = {"model": key, "time": _now(), "reason": why, "champion": prev, "demoted": champ}
        if champ is not None:
            client.set_model_version_tag(key, champ, "genflow.rolled_back", json.dumps(record))
        for v in filter(None, (prev, champ)):
            run_id = client.get_model_version(key, v).run_id
            if run_id:
                client.log_dict(run_id, record, f"gate/rollback-{_stamp()}.json")
        _verify(client, key, {CHAMPION: prev, PREVIOUS: None})
    return prev


# ---------------------------------------------------------------------------
# Reading the registry (CLI and pipeline)
# ---------------------------------------------------------------------------

def aliases_of(key: str, version: Union[str, int], root: Path, params: Optional[Params] = None) -> list[str]:
    """Aliases pointing at one version, champion first."""
    order = {CHAMPION: 0, CHALLENGER: 1, PREVIOUS: 2}
    current = _aliases(_client(root, params), key)
    return sorted((a for a, v in current.items() if v == str(version)), key=lambda a: (order.get(a, 9), a))


def alias_history(key: str, version: Union[str, int], root: Path, params: Optional[Params] = None) -> list[dict]:
    """The alias events of one version, oldest first."""
    tags = _client(root, params).get_model_version(key, str(version)).tags
    keys = sorted((k for k in tags if k.startswith(HISTORY_TAG)), key=lambda k: int(k[len(HISTORY_TAG):]))
    return [json.loads(tags[k]) for k in keys]


def find_version(key: str, tags: Mapping[str, str], root: Path, params: Optional[Params] = None) -> Optional[dict]:
    """The newest version of `key` whose tags include all of `tags` and that passed parity, or None.

    Returns {"version", "run_id", "metrics", "aliases", "parity_max_abs"}.
    """
    from mlflow.exceptions import MlflowException

    client = _client(root, params)
    try:
        current = _aliases(client, key)
    except MlflowException:
        return None
    versions = client.search_model_versions(f"name='{key}'")
    for mv in sorted(versions, key=lambda m: -int(m.version)):
        if all(mv.tags.get(k) == str(v) for k, v in tags.items()) and mv.tags.get("genflow.parity_ok") != "false":
            v = str(mv.version)
            return {"version": v, "run_id": mv.run_id, "metrics": _metrics_of(mv.tags),
                    "aliases": [a for a in (CHAMPION, CHALLENGER, PREVIOUS) if current.get(a) == v],
                    "parity_max_abs": _float(mv.tags.get("genflow.parity_max_abs"))}
    return None


def fetch_version(key: str, ref: Union[str, int], root: Path, dest: Union[str, Path],
                  params: Optional[Params] = None) -> dict[str, Path]:
    """Download a version (number or alias) into `dest`: {"model.onnx": path, <extra name>: path, ...}."""
    import mlflow

    client = _client(root, params)
    mv = _get_version(client, key, ref)
    dest = Path(dest)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{key}/{mv.version}", dst_path=str(dest / "model")))
    files = {p.name: p for p in model_dir.glob("*.onnx")}
    for artifact in json.loads(mv.tags.get("genflow.extra_files", "[]")):
        files[Path(artifact).name] = Path(mlflow.artifacts.download_artifacts(
            run_id=mv.run_id, artifact_path=artifact, dst_path=str(dest / "extras")))
    return files


def models_table(root: Path, params: Optional[Params] = None) -> list[dict]:
    """One row per registered model: versions, aliases, the champion's primary metric, last change."""
    client = _client(root, params)
    by_model: dict[str, list] = {}
    for mv in client.search_model_versions(max_results=10_000):  # one query for every model's versions
        by_model.setdefault(mv.name, []).append(mv)
    rows = []
    for rm in sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name):
        versions = by_model.get(rm.name, [])
        aliases = {a: str(v) for a, v in rm.aliases.items()}
        champ = aliases.get(CHAMPION)
        metric, value = (_rule(params, rm.name).metric if params else ""), None
        stamp = max((m.last_updated_timestamp or 0 for m in versions), default=rm.last_updated_timestamp or 0)
        tags = next((dict(m.tags) for m in versions if str(m.version) == champ), {})
        if champ is not None:
            metric = metric or json.loads(tags.get("genflow.gate.values", "{}")).get("metric") or "eval/fd"
            value = _metrics_of(tags).get(metric)
        rows.append({
            "model": rm.name, "versions": len(versions),
            "aliases": ", ".join(f"{a}={aliases[a]}" for a in sorted(aliases, key=lambda a: (a != CHAMPION, a))),
            "champion": champ, "metric": metric, "value": value,
            "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp / 1000)) if stamp else "",
        })
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain aligned text table of `models_table` rows."""
    if not rows:
        return "no registered models yet; `genflow run` registers them"
    head = ["model", "versions", "aliases", "champion metric", "updated"]
    body = [[str(r["model"]), str(r["versions"]), r["aliases"] or "-",
             f"{r['metric']} {_fmt(r['value'])}" if r.get("champion") else "-", r["updated"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])
