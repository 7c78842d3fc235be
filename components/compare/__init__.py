"""The seed essay's Table 1, measured: diffusion against transformer models of one pipeline run.

    pipeline = collect(client, "genflow", run_id=None)   # the latest pipeline run's models, from MLflow
    report = make_report(pipeline, machine)               # rows: the essay's claim, the numbers, a verdict
    write_report(report, root / "reports" / "compare")    # report.html (self-contained), report.md, PNGs

Each row quotes the essay's claim for the two families and says whether the measurements on
this machine agree, disagree, or are mixed (some numbers each way); "not measured" when a
dataset lacks one family or a number. The thresholds behind the verdicts are in rows.py.

The package, by job (each module imports the others' public names only):

    model.py     ModelResult, Pipeline, Machine, Row, Report; the claims, verdict words, CompareError;
                 NOT_APPLICABLE: a metric the data cannot have ("n/a" with its reason)
    collect.py   reading MLflow: find_pipeline, model_result, collect, seed_history
    derive.py    samplers and their steps, FLOPs, spread; fmt/si/mb for numbers people read
    rows.py      row_* (one per feature), make_rows, overall, combine/vote and the thresholds
    plots.py     matplotlib figures as PNG bytes (matplotlib loads when a plot is drawn)
    render.py    make_report; Markdown and HTML from templates/report.j2; compare.json; write_report

MLflow is only used through the client passed in.
"""
from components.compare.collect import check_model, collect, find_pipeline, model_result, seed_history
from components.compare.derive import (
    achieved_gflops,
    diffusion_samplers,
    fmt,
    gpt_sampling,
    headline_steps,
    mb,
    sample_flops_per_item,
    sampler_label,
    sampler_steps,
    sequential_calls,
    si,
    spread,
    train_flops_per_item,
)
from components.compare.model import (
    AGREES,
    BASELINE_NAMES,
    CLAIMS,
    DISAGREES,
    IMAGE_KINDS,
    MAIN_METRIC,
    MIXED,
    NOT_APPLICABLE,
    NOT_APPLICABLE_TAG,
    NOT_MEASURED,
    NOT_MEASURED_ROWS,
    REQUIRED_METRICS,
    CompareError,
    Machine,
    ModelResult,
    Pipeline,
    Report,
    Row,
    known_backbone,
)
from components.compare.plots import FAMILY_COLOURS, make_plots, plot_compute, plot_sampling, plot_stability
from components.compare.render import make_report, render_html, render_markdown, report_json, summary, write_report
from components.compare.rows import (
    COPIES_NN_RATIO,
    GENERALISES_NN_RATIO,
    SCALING_TIE,
    STABLE_LOSS_CV,
    STABLE_METRIC_CV,
    combine,
    make_rows,
    overall,
    row_architecture,
    row_cost,
    row_editing,
    row_memorisation,
    row_memory,
    row_parallel,
    row_prompts,
    row_quality,
    row_sampling_speed,
    row_stability,
    vote,
)

__all__ = [
    "AGREES", "BASELINE_NAMES", "CLAIMS", "COPIES_NN_RATIO", "DISAGREES", "FAMILY_COLOURS", "GENERALISES_NN_RATIO",
    "IMAGE_KINDS",
    "MAIN_METRIC", "MIXED", "NOT_APPLICABLE", "NOT_APPLICABLE_TAG", "NOT_MEASURED", "NOT_MEASURED_ROWS",
    "REQUIRED_METRICS", "SCALING_TIE",
    "STABLE_LOSS_CV", "STABLE_METRIC_CV", "CompareError", "Machine", "ModelResult", "Pipeline", "Report", "Row",
    "achieved_gflops", "check_model", "collect", "combine", "diffusion_samplers", "find_pipeline", "fmt",
    "gpt_sampling", "headline_steps", "known_backbone", "make_plots", "make_report", "make_rows", "mb",
    "model_result", "overall", "plot_compute", "plot_sampling", "plot_stability", "render_html",
    "render_markdown", "report_json", "row_architecture", "row_cost", "row_editing", "row_memorisation", "row_memory",
    "row_parallel", "row_prompts", "row_quality",
    "row_sampling_speed", "row_stability", "sample_flops_per_item", "sampler_label", "sampler_steps",
    "seed_history", "sequential_calls", "si", "spread", "summary", "train_flops_per_item", "vote", "write_report",
]
