"""Render: the report as Markdown and as one self-contained HTML page, from one template, plus
the numbers as JSON; write them all at once.

    report = make_report(pipeline, machine)                 # rows and plots
    write_report(report, root / "reports" / "compare")      # report.md, report.html, compare.json, PNGs

templates/report.j2 writes every section once; its macros say how a heading, table, cell or
image looks in each format ("md" or "html"). This module only prepares what the sections show.
"""
from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import jinja2

from components.compare.derive import fmt
from components.compare.model import CLAIMS, NOT_APPLICABLE, NOT_MEASURED_ROWS, Machine, Pipeline, Report, Row
from components.compare.plots import make_plots
from components.compare.rows import make_rows, overall
from components.files import replaced_dir

TEMPLATES = Path(__file__).parent / "templates"   # shipped as package data (pyproject.toml)
FIGURES = (("compute.png", "Compute"), ("stability.png", "Stability over seeds"))  # after the datasets


def make_report(pipeline: Pipeline, machine: Machine, plots: bool = True) -> Report:
    """The rows of every dataset and, unless plots=False, the figures; stamped with the time now."""
    return Report(pipeline, machine, make_rows(pipeline, machine),
                  make_plots(pipeline, machine) if plots else {},
                  created=time.strftime("%Y-%m-%d %H:%M:%S"))


# ---------------------------------------------------------------------------
# What the template shows
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One table cell: plain text, or a verdict (coloured, in bold) followed by its evidence, if any.

    note: why the cell's "n/a" has no number (a tooltip in HTML, in brackets in Markdown)."""
    text: str
    verdict: str = ""
    note: str = ""


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Plot:
    name: str                         # file name beside report.md, key of Report.plots
    alt: str


def _machine_line(m: Machine) -> str:
    one = (f", {m.peak_gflops_1thread:.0f} GFLOP/s on 1 thread"
           if m.peak_gflops_1thread > 0 and math.isfinite(m.peak_gflops_1thread) else "")
    return (f"{m.cpu or 'CPU'}, {m.cores} cores; fp32 matmul peak {m.peak_gflops:.0f} GFLOP/s on {m.cores} "
            f"threads{one} (shares of the peak below use {m.best_peak:.0f}"
            + ("; all cores slower than one: other work was using them" if m.peak_gflops < m.peak_gflops_1thread
               else "") + f"); torch {m.torch or '?'}")


def _source_lines(report: Report) -> list[str]:
    p = report.pipeline
    out = [f"Pipeline run of {p.started} (flow run {p.flow_run_id}); parent runs: "
           + ", ".join(f"{ds} `{rid}`" for ds, rid in sorted(p.run_ids.items())),
           f"Machine: {_machine_line(report.machine)}. Timings on a shared machine are noisy; read them as a lead.",
           "Budgets: " + ", ".join(f"{m.key} {fmt(m.param('train.max_seconds'))} s / "
                                   f"{fmt(m.param('train.max_steps'))} steps" for m in p.models)]
    out += [f"Note: {m.key}: {m.note}" for m in p.models if m.note]
    out += [f"Note: {n}" for n in p.notes]
    return out


def _verdict_cell(rows: list[Row], dataset: str, feature: str) -> Cell:
    row = next((r for r in rows if r.dataset == dataset and r.feature == feature), None)
    return Cell(row.evidence, row.verdict) if row else Cell("-")


def summary(report: Report) -> Table:
    """The one-table answer: each feature, the essay's claim, the evidence per dataset, the verdict."""
    ds = report.pipeline.datasets()
    return Table(["Feature", "Seed essay: diffusion", "Seed essay: transformer", *ds, "Verdict"],
                 [[Cell(feature), Cell(cd), Cell(ct), *(_verdict_cell(report.rows, d, feature) for d in ds),
                   Cell("", overall(report.rows, feature))] for feature, (cd, ct) in CLAIMS.items()])


def dataset_table(report: Report, dataset: str) -> Table:
    """Every feature of one dataset: the claim, what each model measured, the verdict and its evidence."""
    ms = report.pipeline.models_of(dataset)
    return Table(["Feature", "Claim (diffusion / transformer)", *(f"{m.key} ({m.family})" for m in ms), "Verdict"],
                 [[Cell(r.feature), Cell(" / ".join(CLAIMS[r.feature])),
                   *(Cell(r.cells.get(m.key, "-"), note=r.notes.get(m.key, "")) for m in ms),
                   Cell(r.evidence, r.verdict)] for r in report.rows if r.dataset == dataset])


def _context(report: Report, fmt_name: str) -> dict:
    def plot(name: str, alt: str) -> Optional[Plot]:
        return Plot(name, alt) if name in report.plots else None

    sections = [{"title": ds, "table": dataset_table(report, ds), "plot": plot(f"sampling_{ds}.png", f"{ds}: sampling")}
                for ds in report.pipeline.datasets()]
    return {"fmt": fmt_name, "source_lines": _source_lines(report), "summary": summary(report),
            "not_measured": ", ".join(NOT_MEASURED_ROWS), "sections": sections,
            "figures": [p for p in (plot(name, title) for name, title in FIGURES) if p],
            "plots": report.plots, "created": report.created}


# ---------------------------------------------------------------------------
# Markdown, HTML, JSON
# ---------------------------------------------------------------------------

def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no column breaks, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short_reason(note: str) -> str:
    """'not applicable (unlabelled: no classes)' -> 'unlabelled: no classes' (beside "n/a" it says the rest)."""
    m = re.fullmatch(r"not applicable \((.*)\)", note)
    return m.group(1) if m else note


def na_markdown(text: str, note: str) -> str:
    """Each "n/a" of a cell followed by its reason in brackets: "class accuracy n/a (unlabelled: no classes)"."""
    if not note:
        return text
    reasons = "; ".join(_short_reason(n) for n in note.split("; "))
    return str(text).replace(NOT_APPLICABLE, f"{NOT_APPLICABLE} ({reasons})")


def na_html(text: str, note: str):
    """The cell's text, escaped, each "n/a" an <abbr> whose tooltip gives the reason."""
    from markupsafe import Markup, escape

    if not note:
        return text
    abbr = Markup('<abbr class="na" title="{}">{}</abbr>').format(note, NOT_APPLICABLE)
    return abbr.join(escape(part) for part in str(text).split(NOT_APPLICABLE))


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@lru_cache(maxsize=None)
def _environment(fmt_name: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=fmt_name == "html",
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(md=md_cell, data_uri=png_data_uri, na_md=na_markdown, na_html=na_html)
    return env


def _render(report: Report, fmt_name: str) -> str:
    return _environment(fmt_name).get_template("report.j2").render(_context(report, fmt_name))


def render_markdown(report: Report) -> str:
    return _render(report, "md")


def render_html(report: Report) -> str:
    """One file: inline CSS, PNGs embedded as base64 data URIs, no external references."""
    return _render(report, "html")


def report_json(report: Report) -> dict:
    """The numbers behind the report (compare.json), for scripts."""
    return {"created": report.created, "machine": asdict(report.machine),
            "pipeline": {"run_ids": report.pipeline.run_ids, "flow_run_id": report.pipeline.flow_run_id,
                         "started": report.pipeline.started, "notes": report.pipeline.notes},
            "models": [{"key": m.key, "family": m.family, "backbone": m.backbone, "dataset": m.dataset,
                        "run_id": m.run_id, "note": m.note, "seeds": m.seeds, "seeds_source": m.seeds_source,
                        "scaling": {str(k): v for k, v in m.scaling.items()},
                        "metrics": {k: v for k, v in sorted(m.metrics.items()) if math.isfinite(v)}}
                       for m in report.pipeline.models],
            "rows": [asdict(r) for r in report.rows],
            "summary": {f: overall(report.rows, f) for f in CLAIMS}}


def write_report(report: Report, out_dir: Path) -> Path:
    """Write report.html, report.md, compare.json and the PNGs into out_dir, all at once.

    Everything goes to a temporary folder beside out_dir, which then replaces out_dir: a reader
    sees the old report or the new one, never half of one. Returns out_dir.
    """
    out_dir = Path(out_dir)
    with replaced_dir(out_dir) as tmp:
        for name, png in report.plots.items():
            (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
        (tmp / "compare.json").write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
    return out_dir
