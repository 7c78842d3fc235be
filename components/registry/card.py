"""What people read about registered models: the model card of a version, the `genflow models` table."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from components.config import Params
from components.registry.lease import is_lease
from components.registry.lookup import (
    CHAMPION,
    EVAL_HASH_TAG,
    fmt_value,
    metrics_of,
    promotion_rule,
    registry_client,
    tag_float,
)


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
        others = [f"{k.split('/', 1)[1][:-len(base) - 1]} {fmt_value(v)}" for k, v in sorted(num.items())
                  if k.startswith("baseline/") and k.endswith(f"_{base}") and k != f"baseline/real_{base}"]
        lines.append(f"| {name} | {fmt_value(num[name])} | {fmt_value(floor)} | {', '.join(others) or '-'} |")
    perf = [f"{k} {fmt_value(v)}" for k, v in sorted(num.items()) if k.startswith(("perf/", "train/"))]
    if perf:
        lines += ["", "Cost: " + ", ".join(perf)]
    if params is not None:
        rule = promotion_rule(params, key)
        lines += ["", f"Promotion rule: {rule.metric} ({'lower' if rule.direction == 'min' else 'higher'} is "
                      f"better), at least {rule.min_improvement:.1%} better than the champion; sampling at most "
                      f"{params.promotion.max_sample_slowdown:.0%} slower; ONNX parity within "
                      f"{params.export.parity_atol:g}."]
    lines += ["", "## ONNX parity", "",
              f"Max abs error against eager PyTorch: {fmt_value(tag_float(tags.get('genflow.parity_max_abs')))} "
              f"(passed: {tags.get('genflow.parity_ok', 'unknown')})."]

    samples = [a for a in artifacts if Path(a).name.startswith("samples")]
    lines += ["", "## Samples", ""]
    lines += [f"- [{a}](runs:/{run_id}/{a})" + (f"\n\n![samples]({a})" if a.endswith(".png") else "")
              for a in samples] or ["No sample files were logged with this run."]

    lines += ["", "## Intended use and limits", ""] + limits(run_params.get("dataset.kind", ""))
    if run_params:
        lines += ["", "## Parameters", "", "| param | value |", "|---|---|"]
        lines += [f"| {k} | {str(v)[:80]} |" for k, v in sorted(run_params.items())]
    return "\n".join(lines) + "\n"


def limits(kind: str) -> list[str]:
    """The card's "Intended use and limits" lines for a dataset kind (image, text)."""
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
# The table of registered models (genflow models)
# ---------------------------------------------------------------------------

def models_table(root: Path, params: Optional[Params] = None) -> list[dict]:
    """One row per registered model: versions, aliases, the champion's primary metric, last change."""
    client = registry_client(root, params)
    by_model: dict[str, list] = {}
    for mv in client.search_model_versions(max_results=10_000):  # one query for every model's versions
        by_model.setdefault(mv.name, []).append(mv)
    rows = []
    for rm in sorted((m for m in client.search_registered_models(max_results=1000) if not is_lease(m.name)),
                     key=lambda m: m.name):
        versions = by_model.get(rm.name, [])
        aliases = {a: str(v) for a, v in rm.aliases.items()}
        champ = aliases.get(CHAMPION)
        metric, value = (promotion_rule(params, rm.name).metric if params else ""), None
        stamp = max((m.last_updated_timestamp or 0 for m in versions), default=rm.last_updated_timestamp or 0)
        tags = next((dict(m.tags) for m in versions if str(m.version) == champ), {})
        if champ is not None:
            metric = metric or json.loads(tags.get("genflow.gate.values", "{}")).get("metric") or "eval/fd"
            value = metrics_of(tags).get(metric)
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
             f"{r['metric']} {fmt_value(r['value'])}" if r.get("champion") else "-", r["updated"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])
