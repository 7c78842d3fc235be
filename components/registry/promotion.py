"""The promotion gate and manual promotion: who becomes champion, and why.

Gate and promotion decisions are written to the version's tags (``genflow.gate.decision``,
``.reason``, ``.values`` with both metric values), its run's tags and a JSON artifact of the run
(``gate/``). Alias moves go through `components.registry.aliases` (lock, re-read, verify).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from components.config import Params
from components.errors import RegistryError
from components.registry.aliases import alias_lock, make_champion
from components.registry.lookup import (
    CHAMPION,
    EVAL_HASH_TAG,
    GATE_DECISION_TAG,
    SAMPLE_TIME,
    current_aliases,
    fmt_value,
    get_version,
    metrics_of,
    now,
    promotion_rule,
    registry_client,
    stamp,
    tag_float,
)


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


def parity_problem(tags: Mapping[str, str], params: Params) -> Optional[str]:
    """Why a version fails the parity guardrail, or None when it passes."""
    ok = tags.get("genflow.parity_ok")
    max_abs = tag_float(tags.get("genflow.parity_max_abs"))
    if ok is None and max_abs is None:
        return "no ONNX parity result on this version"
    if ok == "false":
        return f"ONNX parity failed (max abs error {fmt_value(max_abs)})"
    # an explicit pass from the export (atol + rtol * |reference|) wins over the bare atol check
    if ok != "true" and (max_abs is None or not max_abs <= params.export.parity_atol):  # NaN fails too
        return f"ONNX parity max abs error {fmt_value(max_abs)} above export.parity_atol {params.export.parity_atol:g}"
    return None


def record_decision(client: Any, key: str, mv: Any, decision: Decision, by: str) -> None:
    """The decision, its reason and both values: version tags, run tags and run artifact gate/*.json."""
    when = now()
    values = {"metric": decision.metric, "challenger": decision.challenger_value,
              "champion": decision.champion_value, "champion_version": decision.champion_version,
              "by": by, "time": when}
    # three version tags (each write to a version costs a registry round trip); the run gets one tag per value
    version_tags = {
        GATE_DECISION_TAG: "promoted" if decision.promoted else "rejected",
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
                        f"gate/v{mv.version}-{by}-{stamp()}.json")


# ---------------------------------------------------------------------------
# The gate, manual promotion
# ---------------------------------------------------------------------------

def judge(client: Any, key: str, mv: Any, params: Params,
          champion_metrics_on_new_data: Optional[Mapping[str, Any]]) -> Decision:
    """Compare version `mv` with the champion by the model's promotion rule (no registry writes)."""
    rule = promotion_rule(params, key)
    v = str(mv.version)
    d = Decision(False, "", version=v, metric=rule.metric)
    problem = parity_problem(mv.tags, params)
    if problem:
        d.reason = f"guardrail: {problem}"
        return d
    mine = metrics_of(mv.tags)
    d.challenger_value = mine.get(rule.metric)
    if d.challenger_value is None or math.isnan(d.challenger_value):
        d.reason = f"version {v} has no {rule.metric}; cannot compare (promote it by hand if intended)"
        return d
    champ = current_aliases(client, key).get(CHAMPION)
    if champ is None:
        d.promoted = True
        d.reason = f"first valid version: {rule.metric} {fmt_value(d.challenger_value)}"
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
        theirs.setdefault(SAMPLE_TIME, metrics_of(champ_tags).get(SAMPLE_TIME))
        basis = "champion re-evaluated on the new data"
    else:
        mine_hash, their_hash = mv.tags.get(EVAL_HASH_TAG, "unknown"), champ_tags.get(EVAL_HASH_TAG, "unknown")
        if mine_hash == "unknown" or mine_hash != their_hash:
            d.reason = (f"not comparable: evaluation data differ (version {v}: {mine_hash}, champion {champ}: "
                        f"{their_hash}); re-evaluate the champion on the new data first")
            return d
        theirs = metrics_of(champ_tags)
        basis = "same evaluation data"
    d.champion_value = theirs.get(rule.metric)
    if d.champion_value is None:
        d.reason = f"champion {champ} has no {rule.metric}; cannot compare (promote by hand if intended)"
        return d

    a, b = d.challenger_value, d.champion_value
    better = (b - a) if rule.direction == "min" else (a - b)
    gain = better / abs(b) if b != 0 else (math.inf if better > 0 else (0.0 if better == 0 else -math.inf))
    needs = f"{'>' if rule.min_improvement == 0 else '>='} {rule.min_improvement:.1%}"
    compared = (f"{rule.metric} {fmt_value(a)} vs {fmt_value(b)} of champion version {champ} "
                f"({gain:+.1%}, needs {needs}; {basis})")
    if not (gain > 0 and gain >= rule.min_improvement):
        d.reason = f"not better enough: {compared}"
        return d
    mine_t, theirs_t = mine.get(SAMPLE_TIME), theirs.get(SAMPLE_TIME)
    limit = params.promotion.max_sample_slowdown
    if mine_t is not None and theirs_t is not None and mine_t > theirs_t * (1 + limit):
        d.reason = (f"guardrail: sampling {fmt_value(mine_t)} ms/item vs champion's {fmt_value(theirs_t)} is "
                    f"{mine_t / theirs_t - 1:.0%} slower (allowed {limit:.0%}); {compared}")
        return d
    d.promoted = True
    d.reason = f"better: {compared}"
    return d


def stale_champion(key: str, version: Union[str, int], root: Path,
                   params: Optional[Params] = None) -> Optional[str]:
    """The champion's run id when its metrics were measured on other evaluation data than
    `version`'s (the data changed since), so the gate needs it re-evaluated; else None."""
    client = registry_client(root, params)
    champ = current_aliases(client, key).get(CHAMPION)
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
    client = registry_client(root, params)
    with alias_lock(root, key, client):
        mv = get_version(client, key, version)
        d = judge(client, key, mv, params, champion_metrics_on_new_data)
        if d.champion_version == d.version:
            return d  # gating the champion again: nothing to decide, nothing written
        if d.promoted:
            make_champion(client, key, str(mv.version), by="gate", reason=d.reason)
        record_decision(client, key, mv, d, by="gate")
    return d


def promote(key: str, version: Union[str, int], reason: Optional[str], params: Params, root: Path) -> Decision:
    """Manual promotion of `version` (a number, an alias, or '<key>/<n>') to champion.

    Refuses (RegistryError, registry unchanged) a version that does not exist, that failed ONNX
    parity, or that belongs to another model.
    """
    client = registry_client(root, params)
    with alias_lock(root, key, client):
        mv = get_version(client, key, version)
        v = str(mv.version)
        problem = parity_problem(mv.tags, params)
        if problem:
            raise RegistryError(f"{key} version {v}: {problem}; not promoted, nothing changed")
        rule = promotion_rule(params, key)
        champ = current_aliases(client, key).get(CHAMPION)
        d = Decision(False, "", metrics_of(mv.tags).get(rule.metric), None, v, champ, rule.metric)
        if champ is not None:
            d.champion_value = metrics_of(client.get_model_version(key, champ).tags).get(rule.metric)
        if champ == v:
            d.reason = f"version {v} is already champion; nothing changed"
            return d
        d.promoted = True
        d.reason = f"manual: {(reason or '').strip() or 'no reason given'}"
        make_champion(client, key, v, by="promote", reason=d.reason)
        record_decision(client, key, mv, d, by="promote")
    return d
