"""`genflow compare`: rows and verdicts, the report files, and refusing runs it cannot compare.

Pipeline runs are logged with the tracking helpers into the session's SQLite store with hand-made
metrics (no training); each test has its own experiment prefix, so it sees only its own runs.
The machine's matmul peak is a fixed number and the thread probe is off: nothing depends on speed.
"""
import base64
import copy
import json
import os
import re
import types
import uuid

import pytest

from components import compare, tracking
from components.compare import AGREES, DISAGREES, MIXED, NOT_MEASURED, CompareError, Machine, ModelResult
from components.config import DatasetConfig, ModelConfig, Params
from components.errors import GenflowError

MACHINE = Machine(cores=2, cpu="test CPU", peak_gflops=100.0, peak_gflops_1thread=55.0, torch="x")

IMAGE_BASELINES = {"baseline/real_fd": 0.66, "baseline/kde_fd": 0.93, "baseline/gaussian_fd": 0.78,
                   "baseline/real_recall": 0.92, "baseline/real_nn_ratio": 1.0, "baseline/kde_nn_ratio": 0.99,
                   "baseline/real_class_acc": 0.97}
UNET = {**IMAGE_BASELINES, "train/loss": 0.05, "eval/fd": 0.70, "eval/class_acc": 0.95, "eval/recall": 0.85,
        "eval/nn_ratio": 1.02, "eval/fd_ddim10": 1.1, "perf/sample_ms_per_item_ddim10": 5.0,
        "perf/params": 648_000.0, "perf/train_seconds": 270.0, "perf/train_items_per_s": 240.0,
        "perf/flops_per_item": 90e6, "perf/sample_ms_per_item": 40.0,
        "perf/peak_rss_train_mb": 900.0, "perf/peak_rss_train_delta_mb": 60.0}
GPT_IMAGES = {**IMAGE_BASELINES, "train/loss": 1.2, "eval/fd": 1.5, "eval/class_acc": 0.8, "eval/recall": 0.6,
              "eval/nn_ratio": 1.1, "eval/bits_per_dim": 1.9, "baseline/logreg_bits_per_dim": 2.0,
              "perf/params": 800_000.0, "perf/train_seconds": 180.0, "perf/train_items_per_s": 9000.0,
              "perf/flops_per_item": 5e6, "perf/sample_ms_per_item": 10.0, "perf/sample_ms_per_item_nocache": 90.0,
              "perf/peak_rss_train_mb": 950.0, "perf/peak_rss_train_delta_mb": 80.0}
GPT_TEXT = {"train/loss": 1.4, "eval/bits_per_char": 2.0, "baseline/ngram4_bits_per_char": 2.2,
            "baseline/ngram5_bits_per_char": 2.1, "perf/params": 1.8e6, "perf/train_seconds": 270.0,
            "perf/train_items_per_s": 8000.0, "perf/flops_per_item": 12e6, "perf/sample_ms_per_item": 3.0,
            "perf/sample_ms_per_token_cached": 3.0, "perf/sample_ms_per_token_nocache": 9.0}
ALL = {"digits-unet": UNET, "digits-gpt": GPT_IMAGES, "pydoc-gpt": GPT_TEXT}


def make_params(prefix: str) -> Params:
    p = Params(
        datasets={"digits": DatasetConfig(source="builtin:digits"),
                  "pydoc": DatasetConfig(source="builtin:pydoc", kind="text")},
        models={"digits-unet": ModelConfig(family="diffusion", backbone="unet", dataset="digits"),
                "digits-gpt": ModelConfig(family="transformer", backbone="gpt", dataset="digits"),
                "pydoc-gpt": ModelConfig(family="transformer", backbone="gpt", dataset="pydoc")},
    )
    p.tracking.experiment_prefix = prefix
    return p


def log_pipeline(params: Params, root, metrics: dict) -> tracking.PipelineRun:
    """One pipeline run: a parent per dataset, a nested child per model with these metrics."""
    with tracking.pipeline_run(params, root, flow_run_id=uuid.uuid4().hex, models=list(metrics)) as parent:
        for key, met in metrics.items():
            with tracking.model_run(key, params, root, parent_run_id=parent.info.run_id):
                tracking.log_metrics(met)
    return parent



@pytest.fixture
def params():
    return make_params(f"c{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client():
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture
def fast_machine(monkeypatch):
    import flows.compare

    monkeypatch.setattr(flows.compare, "measure_machine", lambda: MACHINE)


def build(params, root, **kw):
    from flows.compare import build_report

    return build_report(params, root, probe=False, **kw)


# ---------------------------------------------------------------------------
# Rows and verdicts (pure: ModelResult by hand)
# ---------------------------------------------------------------------------

def result(key: str, metrics: dict, **params) -> ModelResult:
    family, backbone = ("transformer", "gpt") if "gpt" in key else ("diffusion", "unet")
    kind = "text" if key.startswith("pydoc") else "image"
    base = {"dataset.kind": kind, "dataset.image_size": "8", "sample.sampler": "ddim", "sample.steps": "50",
            "sample.guidance": "1.0", "diffusion.timesteps": "200", "train.seed": "0", "train.max_seconds": "270"}
    base.update({k.replace("__", "."): str(v) for k, v in params.items()})
    return ModelResult(key=key, family=family, backbone=backbone, dataset=key.split("-")[0], kind=kind,
                       run_id=f"run-{key}", metrics=dict(metrics), params=base)


def test_sampling_speed_agrees_when_diffusion_is_slower_and_disagrees_when_flipped():
    slow = {k: v for k, v in UNET.items() if not k.endswith("ddim10")}
    row = compare.row_sampling_speed("digits", [result("digits-unet", {**slow, "perf/sample_ms_per_item": 40.0}),
                                                result("digits-gpt", GPT_IMAGES)])
    assert row.verdict == AGREES and "1 of 1" in row.evidence and "DDIM-50 40" in row.evidence
    assert "10 ms/image with KV cache, 90 without" in row.cells["digits-gpt"]
    row = compare.row_sampling_speed("digits", [result("digits-unet", {**slow, "perf/sample_ms_per_item": 4.0}),
                                                result("digits-gpt", GPT_IMAGES)])
    assert row.verdict == DISAGREES and "0 of 1" in row.evidence


def test_sampling_speed_is_mixed_when_only_the_short_sampler_beats_the_gpt():
    row = compare.row_sampling_speed("digits", [result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)])
    assert row.verdict == MIXED  # DDIM-50 40 ms > 10 ms, DDIM-10 5 ms < 10 ms
    assert "DDIM-10: 5 ms/image (10 steps)" in row.cells["digits-unet"]


def test_a_dataset_with_one_family_is_not_measured():
    row = compare.row_sampling_speed("pydoc", [result("pydoc-gpt", GPT_TEXT)])
    assert row.verdict == NOT_MEASURED and "no diffusion model on pydoc" in row.evidence


def test_quality_is_judged_against_the_best_simple_baseline():
    good = compare.row_quality("digits", [result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)])
    assert good.verdict == MIXED  # the U-Net (0.70) beats the Gaussian (0.78), the GPT (1.5) does not
    assert "digits-unet FD 0.7 < Gaussian baseline 0.78" in good.evidence
    assert "1.9 bits/dim" in good.cells["digits-gpt"]
    text = compare.row_quality("pydoc", [result("pydoc-gpt", GPT_TEXT)])
    assert text.verdict == AGREES and "5-gram 2.1" in text.cells["pydoc-gpt"]
    worse = compare.row_quality("pydoc", [result("pydoc-gpt", {**GPT_TEXT, "eval/bits_per_char": 2.5})])
    assert worse.verdict == DISAGREES


MDLM_TEXT = {"train/loss": 2.3, "eval/bits_per_char": 3.3, "eval/bits_per_char_is_upper_bound": 1.0,
             "eval/bits_per_char_sliding": 3.2,
             "baseline/ngram4_bits_per_char": 2.2, "baseline/ngram5_bits_per_char": 2.1, "perf/params": 9.6e5,
             "perf/train_seconds": 270.0, "perf/train_items_per_s": 8000.0, "perf/flops_per_item": 6e6,
             "perf/sample_ms_per_item": 2.4, "perf/sample_ms_per_item_k4": 0.6, "perf/sample_ms_per_item_k53": 7.9,
             "eval/sample_ngram_bpc": 5.9, "eval/sample_ngram_bpc_k4": 6.3, "eval/sample_ngram_bpc_k53": 5.8}


def test_the_masked_lm_sits_beside_pydoc_gpt_with_its_bound_marked_and_its_k_sweep_timed():
    mdlm = result("pydoc-mdlm", MDLM_TEXT, sample__steps=16)
    mdlm.backbone = "mdlm"
    models = [result("pydoc-gpt", GPT_TEXT), mdlm]
    quality = compare.row_quality("pydoc", models)
    assert quality.cells["pydoc-mdlm"].startswith("3.3 bits/char (upper bound), 3.2 with sliding windows")
    assert "(upper bound)" not in quality.cells["pydoc-gpt"]
    assert quality.verdict == MIXED             # the GPT beats the 5-gram, the masked model's bound does not
    speed = compare.row_sampling_speed("pydoc", models)
    assert [f"({n} steps)" in speed.cells["pydoc-mdlm"] for n in (4, 16, 53)] == [True, True, True]
    assert speed.verdict == MIXED     # K=4 and K=16 beat the GPT's 3 ms/char, one character a step does not
    assert "1 of 3 diffusion samplers slower than pydoc-gpt (3 ms/char): K=4 0.6, K=16 2.4, K=53 7.9" in speed.evidence


def test_cost_counts_flops_per_image_and_the_share_of_the_peak():
    unet, gpt = result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)
    assert compare.train_flops_per_item(gpt) == 5e6 * 64          # per token x 64 pixels
    assert compare.sample_flops_per_item(unet) == pytest.approx(50 * 90e6 / 3)
    assert compare.sample_flops_per_item(result("digits-unet", UNET, sample__guidance=2.0)) == \
        pytest.approx(2 * 50 * 90e6 / 3)                        # guidance: two passes per step
    row = compare.row_cost("digits", [unet, gpt], MACHINE)
    assert "21.6 GFLOP/s = 22% of the matmul peak" in row.cells["digits-unet"]  # 90e6 * 240 / 100e9
    # training: diffusion 90 M < GPT 320 M per image (disagrees); sampling: GPT 107 M < 1.5 G (agrees)
    assert row.verdict == MIXED


def test_parallel_processing_compares_thread_scaling_and_sequential_calls():
    unet, gpt = result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)
    unet.scaling, gpt.scaling = {1: 100.0, 2: 120.0}, {1: 100.0, 2: 180.0}
    row = compare.row_parallel("digits", [unet, gpt])
    assert "x1.80" in row.cells["digits-gpt"] and "50 sequential network calls per image" in row.cells["digits-unet"]
    assert row.verdict == MIXED  # scaling favours the GPT; 50 diffusion steps < 64 GPT tokens
    ddpm = result("digits-unet", UNET, sample__sampler="ddpm")
    ddpm.scaling = unet.scaling
    assert compare.row_parallel("digits", [ddpm, gpt]).verdict == AGREES  # 200 steps > 64 tokens
    gpt.scaling = {1: 100.0, 2: 121.0}  # within 5%: no advantage
    assert compare.row_parallel("digits", [ddpm, gpt]).verdict == MIXED


def test_stability_needs_two_seeds_and_uses_recall_for_mode_collapse():
    unet, gpt = result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)
    row = compare.row_stability("digits", [unet, gpt])
    assert "1 seed: run genflow compare --seeds 3" in row.cells["digits-unet"]
    assert row.verdict == AGREES  # only the recall part: 0.85 >= 0.6
    unet.seeds = [{"seed": s, "train/loss": 0.05 + 0.001 * s, "eval/fd": 0.7 + 0.01 * s} for s in range(3)]
    gpt.seeds = [{"seed": s, "train/loss": 1.2, "eval/fd": [1.0, 3.0, 5.0][s]} for s in range(3)]
    row = compare.row_stability("digits", [unet, gpt])
    assert "over 3 seeds" in row.cells["digits-unet"] and "± " in row.cells["digits-unet"]
    assert row.verdict == MIXED  # the GPT's FD varies far beyond 20%


def test_memorisation_flags_copies():
    row = compare.row_memorisation("digits", [result("digits-unet", {**UNET, "eval/nn_ratio": 0.2}),
                                              result("digits-gpt", GPT_IMAGES)])
    assert row.verdict == DISAGREES and "NN ratio 0.2" in row.evidence
    assert compare.row_memorisation("digits", [result("digits-unet", UNET)]).verdict == AGREES


def run_of(key: str, backbone: str, metrics: dict, **tags):
    """A stand-in for an MLflow run as model_result reads it (tags, params, metrics, info)."""
    data = types.SimpleNamespace(tags={"genflow.model_key": key, "genflow.backbone": backbone,
                                       "genflow.dataset": key.split("-")[0], **tags},
                                 params={"sample.steps": "50"}, metrics=dict(metrics))
    info = types.SimpleNamespace(run_id=f"run-{key}", run_name=key, experiment_id="0")
    return types.SimpleNamespace(data=data, info=info)


def test_family_kind_and_sampling_come_from_the_backbone_registry_and_unknown_tags_fall_back():
    gpt, mdlm = compare.model_result(run_of("a-gpt", "gpt", GPT_TEXT)), compare.model_result(run_of("b-m", "mdlm", {}))
    assert (gpt.family, gpt.kind, gpt.generation) == ("transformer", "image", "autoregressive")
    assert (mdlm.family, mdlm.kind, mdlm.generation) == ("diffusion", "text", "masked")
    old = compare.model_result(run_of("digits-vae", "vae", UNET))  # a tag this genflow no longer knows
    assert (old.family, old.kind, old.generation) == ("diffusion", "image", "denoising")
    assert compare.sequential_calls(old) == 50.0
    tagged = compare.model_result(run_of("digits-x", "", GPT_IMAGES, **{"genflow.family": "transformer"}))
    assert tagged.generation == "autoregressive"  # no backbone tag: the family tag decides
    rows = compare.make_rows(compare.Pipeline({"digits": "r"}, "f", "now", [old, tagged]), MACHINE)
    assert {r.feature for r in rows} == set(compare.CLAIMS)


def test_markdown_and_html_come_from_one_template_each_escaped_its_own_way():
    models = [result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)]
    pipe = compare.Pipeline({"digits": "r"}, "f", "now", models)
    report = compare.make_report(pipe, MACHINE, plots=False)
    report.rows[0].cells["digits-unet"] = "a | b <i>x</i>"
    md, page = compare.render_markdown(report), compare.render_html(report)
    assert "| a \\| b <i>x</i> |" in md
    assert "<td>a | b &lt;i&gt;x&lt;/i&gt;</td>" in page
    assert re.findall(r"^#+ (.+)$", md, re.M) == re.findall(r"<h\d>(.+?)</h\d>", page)  # the same sections
    assert md.count("\n| ") == page.count("<tr>")                                       # and the same rows
    assert '<td class="mixed"><b>mixed</b>: 1 of 2 diffusion samplers' in page  # sampling speed, digits
    assert "| **mixed**: 1 of 2 diffusion samplers" in md


# ---------------------------------------------------------------------------
# The report from MLflow runs
# ---------------------------------------------------------------------------

def test_report_from_a_pipeline_run_is_written_logged_and_self_contained(params, tmp_path, client, fast_machine):
    parent = log_pipeline(params, tmp_path, ALL)
    out = build(params, tmp_path)
    folder = tmp_path / "reports" / "compare"
    assert out == folder / "report.html"
    assert {"report.html", "report.md", "compare.json", "sampling_digits.png", "compute.png"} <= \
        {p.name for p in folder.iterdir()}
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]  # no temp folders left

    page = out.read_text()
    assert "http" not in page.lower() and "<script" not in page and "<link" not in page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) >= 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ALL:
        assert key in page
    assert "slow, iterative process" in page and "relatively fast, parallel processing" in page

    md = (folder / "report.md").read_text()
    assert "| Sampling speed | slow, iterative process | relatively fast, parallel processing |" in md
    assert "![digits: sampling](sampling_digits.png)" in md
    data = json.loads((folder / "compare.json").read_text())
    assert data["pipeline"]["run_ids"] == parent.run_ids
    assert data["summary"]["Sampling speed"] == MIXED
    assert {r["feature"] for r in data["rows"]} == set(compare.CLAIMS)

    for rid in parent.run_ids.values():  # the report is an artifact of every parent run
        assert "compare/report.html" in {f.path for f in client.list_artifacts(rid, "compare")}


def test_the_latest_pipeline_run_is_used_and_a_model_run_id_leads_to_its_parent(params, tmp_path, client,
                                                                                  fast_machine):
    log_pipeline(params, tmp_path, {"digits-unet": UNET, "digits-gpt": GPT_IMAGES})
    latest = log_pipeline(params, tmp_path, {"digits-unet": {**UNET, "eval/fd": 0.61}, "digits-gpt": GPT_IMAGES})
    pipe = compare.collect(client, params.tracking.experiment_prefix)
    assert pipe.run_ids == latest.run_ids
    assert {m.key: m.metrics["eval/fd"] for m in pipe.models}["digits-unet"] == 0.61
    child = client.search_runs([client.get_run(latest.info.run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{latest.info.run_id}'")[0]
    assert compare.collect(client, params.tracking.experiment_prefix, child.info.run_id).run_ids == latest.run_ids


def test_runs_that_differ_only_in_seed_give_the_spread(params, tmp_path, client):
    log_pipeline(params, tmp_path, {"digits-unet": UNET})
    other = copy.deepcopy(params)
    other.models["digits-unet"].train.seed = 1
    log_pipeline(other, tmp_path, {"digits-unet": {**UNET, "train/loss": 0.06, "eval/fd": 0.8}})
    changed = copy.deepcopy(params)
    changed.models["digits-unet"].train.lr = 0.1  # another setting: not a seed of the same model
    changed.models["digits-unet"].train.seed = 2
    log_pipeline(changed, tmp_path, {"digits-unet": {**UNET, "eval/fd": 9.0}})
    pipe = compare.collect(client, params.tracking.experiment_prefix, run_id=None)
    m = pipe.models[0]
    assert m.param("train.seed") == 2.0
    assert [s["seed"] for s in compare.seed_history(client, m)] == [2.0]  # lr differs: alone
    first = compare.collect(client, params.tracking.experiment_prefix,
                            run_id=client.search_runs(
                                [m.experiment_id], "tags.`genflow.kind` = 'pipeline'",
                                order_by=["attributes.start_time ASC"])[0].info.run_id).models[0]
    seeds = compare.seed_history(client, first)
    assert [s["seed"] for s in seeds] == [0.0, 1.0]
    assert [s["eval/fd"] for s in seeds] == [0.70, 0.8]


def test_a_skipped_model_is_read_from_the_version_it_kept(tmp_path, client):
    uid = uuid.uuid4().hex[:6]
    unet, gpt = f"unet-{uid}", f"gpt-{uid}"  # own registered-model names: the store is shared
    p = Params(datasets={"digits": DatasetConfig(source="builtin:digits")},
               models={unet: ModelConfig(family="diffusion", backbone="unet", dataset="digits"),
                       gpt: ModelConfig(family="transformer", backbone="gpt", dataset="digits")})
    p.tracking.experiment_prefix = f"c{uid}"
    first = log_pipeline(p, tmp_path, {unet: UNET, gpt: GPT_IMAGES})
    unet_run = [r for r in client.search_runs([client.get_run(first.info.run_id).info.experiment_id],
                                              f"tags.`genflow.model_key` = '{unet}'")][0]
    client.create_registered_model(unet)
    client.create_model_version(unet, f"runs:/{unet_run.info.run_id}/model", run_id=unet_run.info.run_id)
    with tracking.pipeline_run(p, tmp_path, flow_run_id="f2", models=[unet, gpt]) as parent:
        with tracking.model_run(gpt, p, tmp_path, parent_run_id=parent.info.run_id):
            tracking.log_metrics(GPT_IMAGES)
        tracking.log_summary({"status": "completed", "seconds": 1.0,
                              "models": {unet: {"status": "skipped", "version": "1"},
                                         gpt: {"status": "trained", "version": "1"}}}, tmp_path)
    pipe = compare.collect(client, p.tracking.experiment_prefix)
    by_key = {m.key: m for m in pipe.models}
    assert set(by_key) == {unet, gpt}
    assert by_key[unet].run_id == unet_run.info.run_id and "version 1" in by_key[unet].note


def test_retrain_seeds_trains_each_seed_the_same_steps_from_scratch(params, tmp_path, monkeypatch):
    import flows.compare

    (tmp_path / "data" / "prepared" / "digits").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "digits" / "manifest.json").write_text("{}")
    calls = []

    def train(key, p, root):
        assert (root / "data" / "prepared" / "digits" / "manifest.json").exists()
        assert not (root / "models" / key).exists()  # a new seed never resumes the previous one
        (root / "models" / key).mkdir(parents=True)
        t = p.model(key).train
        calls.append((key, t.seed, t.max_steps, t.max_seconds))
        return {"train/loss": 0.05 + 0.01 * t.seed, "perf/train_steps": float(t.max_steps)}

    def evaluate(key, p, root):
        return {"eval/fd": 0.7 + 0.1 * p.model(key).train.seed}

    family = types.SimpleNamespace(train=train, evaluate=evaluate)
    monkeypatch.setattr(flows.compare, "backbone",
                        lambda name, where=None: types.SimpleNamespace(family=lambda: family))
    m = result("digits-unet", {**UNET, "perf/train_steps": 900.0})  # 900 steps in 270 s: 3.33 steps/s
    flows.compare.retrain_seeds(params, tmp_path, [m], 3)
    q = params.pipeline.quick
    steps = round(q.max_seconds * 900 / 270)  # what the quick budget buys, the same for every seed
    cap = q.max_seconds * flows.compare.SEED_TIME_CAP
    assert calls == [("digits-unet", s, steps, cap) for s in range(3)]
    assert m.seeds_source == "retrained" and m.seeds[0]["steps"] == steps
    assert [s["eval/fd"] for s in m.seeds] == pytest.approx([0.7, 0.8, 0.9])
    assert params.models["digits-unet"].train.seed == 0  # the caller's params are left alone


def test_seeds_option_reaches_build_report(monkeypatch):
    from flows import cli

    seen = {}
    monkeypatch.setattr(cli, "_load", lambda args: None)
    import flows.compare

    monkeypatch.setattr(flows.compare, "build_report",
                        lambda params, root, run_id=None, seeds=None: seen.update(run_id=run_id, seeds=seeds) or "x")
    assert cli.main(["compare", "--run", "abc", "--seeds", "3"]) == 0
    assert seen == {"run_id": "abc", "seeds": 3}


# ---------------------------------------------------------------------------
# Refusals: one line, no report
# ---------------------------------------------------------------------------

def test_an_unknown_run_id_is_refused(params, tmp_path, fast_machine):
    log_pipeline(params, tmp_path, {"digits-unet": UNET})
    with pytest.raises(CompareError, match=r"--run 0{32}: no such MLflow run"):
        build(params, tmp_path, run_id="0" * 32)
    assert not (tmp_path / "reports" / "compare").exists()


def test_no_pipeline_run_at_all_is_refused(params, tmp_path, fast_machine):
    with pytest.raises(CompareError, match="no experiment named .*run `genflow run`"):
        build(params, tmp_path)


def test_a_pipeline_run_without_model_runs_is_refused(params, tmp_path, fast_machine):
    with tracking.pipeline_run(params, tmp_path, flow_run_id="f", models=["digits-unet"]) as parent:
        pass
    with pytest.raises(CompareError, match="has no finished model runs"):
        build(params, tmp_path, run_id=parent.info.run_id)
    assert not (tmp_path / "reports" / "compare").exists()


def test_a_run_from_an_older_report_format_is_refused_without_a_partial_report(params, tmp_path, fast_machine):
    old = {k: v for k, v in UNET.items() if k != "perf/flops_per_item"}
    parent = log_pipeline(params, tmp_path, {"digits-unet": old, "digits-gpt": GPT_IMAGES})
    with pytest.raises(CompareError) as err:
        build(params, tmp_path, run_id=parent.info.run_id)
    msg = str(err.value)
    assert "(digits-unet): lacks perf/flops_per_item" in msg and "\n" not in msg
    assert not (tmp_path / "reports" / "compare").exists()


def test_bad_seed_count_is_refused(params, tmp_path):
    with pytest.raises(CompareError, match="--seeds 0") as err:
        build(params, tmp_path, seeds=0)
    assert isinstance(err.value, GenflowError) and isinstance(err.value, ValueError)  # the CLI prints one line


def test_a_failed_render_keeps_the_previous_report(params, tmp_path, fast_machine, monkeypatch):
    log_pipeline(params, tmp_path, {"digits-unet": UNET, "digits-gpt": GPT_IMAGES})
    build(params, tmp_path)
    before = (tmp_path / "reports" / "compare" / "report.md").read_text()

    def broken(report):
        raise RuntimeError("disk full")
    monkeypatch.setattr(compare.render, "render_html", broken)  # write_report's own name
    with pytest.raises(RuntimeError):
        build(params, tmp_path)
    assert (tmp_path / "reports" / "compare" / "report.md").read_text() == before
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["compare"]


# ---------------------------------------------------------------------------
# The editing row: inpainting (and super-resolution when a digits-sr run is there)
# ---------------------------------------------------------------------------

def inpainting(masks, ours: float, nn: float, ms: float) -> dict:
    out = {"perf/inpaint_ms_per_item": ms}
    for k in masks:
        out.update({f"eval/inpaint_{k}_class_acc": ours, f"baseline/nn_inpaint_{k}_class_acc": nn,
                    f"baseline/mean_inpaint_{k}_class_acc": 0.3, f"eval/inpaint_{k}_mse": 0.05,
                    f"baseline/nn_inpaint_{k}_mse": 0.07})
    if len(masks) == 4:
        out.update({"eval/inpaint_consistency": 0.04, "baseline/real_inpaint_consistency": 0.05})
    return out


ALL_MASKS = ("bottom", "left", "centre", "random")


def test_editing_row_says_what_each_paradigm_can_inpaint_how_well_and_at_what_cost():
    unet = result("digits-unet", {**UNET, **inpainting(ALL_MASKS, 0.9, 0.8, 12.0)})
    gpt = result("digits-gpt", {**GPT_IMAGES, **inpainting(("bottom",), 0.7, 0.8, 3.0)})
    row = compare.row_editing("digits", [unet, gpt])
    assert row.feature == "Editing (inpainting, super-resolution)" and row.feature in compare.CLAIMS
    assert row.verdict == AGREES            # every mask, above nearest-neighbour fill on each, above the GPT
    assert row.cells["digits-unet"].startswith("inpaints any mask; measured on 4 mask(s)")
    assert "centre square 0.9 (nearest-neighbour 0.8, mean fill 0.3)" in row.cells["digits-unet"]
    assert "12 ms per completion" in row.cells["digits-unet"]
    assert row.cells["digits-gpt"].startswith("inpaints the raster suffix only")
    assert "measured on 1 mask(s)" in row.cells["digits-gpt"] and "3 ms per completion" in row.cells["digits-gpt"]
    assert "digits-unet inpaints 4 of 4 masks" in row.evidence
    assert "bottom half, the one mask digits-gpt can do: digits-unet 0.9 vs digits-gpt 0.7; 12 vs 3 ms" in row.evidence
    assert "super-resolution: not run" in row.evidence

    worse = result("digits-unet", {**UNET, **inpainting(ALL_MASKS, 0.6, 0.8, 12.0)})
    lost = compare.row_editing("digits", [worse, gpt])   # every mask, but below NN on each and below the GPT
    assert lost.verdict == MIXED and "random 50% 0.6 <= 0.8" in lost.evidence
    one_mask = result("digits-unet", {**UNET, **inpainting(("bottom",), 0.6, 0.8, 12.0)})
    assert compare.row_editing("digits", [one_mask, gpt]).verdict == DISAGREES
    left_lost = result("digits-unet", {**UNET, **inpainting(ALL_MASKS, 0.9, 0.8, 12.0),
                                       "eval/inpaint_left_class_acc": 0.5})
    mixed = compare.row_editing("digits", [left_lost, gpt])
    assert mixed.verdict == MIXED and "left half 0.5 <= 0.8" in mixed.evidence


def test_editing_row_shows_super_resolution_when_a_digits_sr_run_is_present():
    unet = result("digits-unet", {**UNET, **inpainting(ALL_MASKS, 0.9, 0.8, 12.0)})
    sr = result("digits-sr", {**UNET, "eval/sr_psnr": 21.5, "eval/sr_class_acc": 0.93, "eval/sr_fd": 0.4,
                              "baseline/bicubic_sr_psnr": 19.0, "baseline/bicubic_sr_class_acc": 0.85,
                              "baseline/bicubic_sr_fd": 1.2, "baseline/nearest_sr_psnr": 17.0,
                              "baseline/nearest_sr_class_acc": 0.8, "baseline/nearest_sr_fd": 2.0})
    row = compare.row_editing("digits", [unet, sr])
    assert row.cells["digits-sr"] == ("super-resolution (2x): PSNR 21.5 (bicubic 19, nearest 17); class accuracy "
                                      "0.93 (bicubic 0.85, nearest 0.8); FD 0.4 (bicubic 1.2, nearest 2)")
    assert row.verdict == AGREES and "not run" not in row.evidence
    assert "digits-sr super-resolution: class accuracy 0.93 vs bicubic 0.85, FD 0.4 vs bicubic 1.2" in row.evidence
    blurry = result("digits-sr", {**sr.metrics, "eval/sr_fd": 1.5})   # FD worse than bicubic: one part fails
    assert compare.row_editing("digits", [unet, blurry]).verdict == MIXED


def test_editing_row_is_not_measured_without_inpainting_metrics():
    row = compare.row_editing("digits", [result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)])
    assert row.verdict == NOT_MEASURED and row.cells == {}
    assert "eval.inpaint_samples" in row.evidence and "super-resolution: not run" in row.evidence
    assert compare.row_editing("pydoc", [result("pydoc-gpt", GPT_TEXT)]).verdict == NOT_MEASURED


# ---------------------------------------------------------------------------
# The prompt-adherence row: both paradigms on the same captions
# ---------------------------------------------------------------------------

def prompted(key: str, family: str, backbone: str, **metrics) -> ModelResult:
    """A captions model's run with components/families/captions.py's metric names."""
    met = {**IMAGE_BASELINES, "train/loss": 0.06, "perf/params": 700_000.0, "perf/train_seconds": 280.0,
           "perf/train_items_per_s": 200.0, "perf/flops_per_item": 90e6, "eval/fd": 0.8, "eval/class_acc": 0.95,
           "eval/prompt_acc": 0.95, "eval/attribute_error": 0.2, "baseline/real_attribute_error": 0.0,
           "baseline/label_only_attribute_error": 0.8, "perf/sample_ms_per_item": 40.0, **metrics}
    params = {"dataset.kind": "captions", "dataset.image_size": "8", "sample.sampler": "ddim", "sample.steps": "50",
              "sample.guidance": "1.5", "diffusion.timesteps": "200"}
    return ModelResult(key=key, family=family, backbone=backbone, dataset="digits-captions", kind="captions",
                       run_id=f"run-{key}", metrics=met, params=params)


def test_prompt_row_compares_both_paradigms_on_the_same_captions():
    unet = prompted("captions-unet", "diffusion", "unet-text")
    encdec = prompted("captions-encdec", "transformer", "encdec", **{
        "eval/prompt_acc": 0.9, "eval/attribute_error": 0.5, "baseline/label_only_attribute_error": 0.7,
        "eval/fd": 1.1, "perf/sample_ms_per_item": 12.0})
    row = compare.row_prompts("digits-captions", [unet, encdec])
    assert row.feature == "Text-to-image (prompt adherence)" and row.feature in compare.CLAIMS
    assert "cross-attention" in compare.CLAIMS[row.feature][0] and "cross-attention" in compare.CLAIMS[row.feature][1]
    assert row.verdict == AGREES
    assert row.cells["captions-unet"].startswith(
        "prompt accuracy 0.95; attribute error 0.2 (digit word alone 0.8, 0.25x; real images with their captions 0); "
        "FD 0.8 (real data 0.66); 40 ms/image to sample (50 steps, guidance 1.5)")
    assert "~3 GFLOP/image" in row.cells["captions-unet"]     # 50 steps x 2 (guidance) x 90 MFLOP / 3
    assert row.cells["captions-encdec"].startswith("prompt accuracy 0.9; attribute error 0.5 (digit word alone 0.7")
    assert "captions-unet attribute error 0.2 < digit word alone 0.8" in row.evidence
    assert "prompt accuracy: captions-unet 0.95 vs captions-encdec 0.9 (diffusion ahead)" in row.evidence
    assert "FD: captions-unet 0.8 vs captions-encdec 1.1" in row.evidence
    assert "sampling 40 vs 12 ms/image" in row.evidence

    # the transformer follows its prompt better: the figures disagree with "diffusion the usual choice" in part
    sharper = prompted("captions-encdec", "transformer", "encdec", **{"eval/prompt_acc": 0.99,
                                                                      "eval/attribute_error": 0.1, "eval/fd": 1.1})
    mixed = compare.row_prompts("digits-captions", [unet, sharper])
    assert mixed.verdict == MIXED and "(transformer ahead)" in mixed.evidence
    # neither prompt gets through (no better than the digit word alone) and the transformer wins everything
    deaf = prompted("captions-unet", "diffusion", "unet-text", **{"eval/prompt_acc": 0.5, "eval/attribute_error": 0.9,
                                                                  "eval/fd": 2.0})
    deaf_tr = prompted("captions-encdec", "transformer", "encdec", **{"eval/attribute_error": 0.85})
    assert compare.row_prompts("digits-captions", [deaf, deaf_tr]).verdict == DISAGREES


def test_prompt_row_says_not_run_for_a_missing_paradigm():
    unet = prompted("captions-unet", "diffusion", "unet-text")
    row = compare.row_prompts("digits-captions", [unet])
    assert row.verdict == NOT_MEASURED and list(row.cells) == ["captions-unet"]
    assert "transformer: not run" in row.evidence and "genflow run --only captions-encdec" in row.evidence
    assert "captions-unet attribute error 0.2 < digit word alone 0.8" in row.evidence
    alone = compare.row_prompts("digits-captions", [prompted("captions-encdec", "transformer", "encdec")])
    assert alone.verdict == NOT_MEASURED and "diffusion: not run" in alone.evidence

    pipeline = compare.Pipeline(run_ids={}, flow_run_id="f", started="", models=[
        unet, result("digits-unet", UNET), result("digits-gpt", GPT_IMAGES)])
    rows = compare.make_rows(pipeline, MACHINE)
    plain = next(r for r in rows if r.dataset == "digits" and r.feature == "Text-to-image (prompt adherence)")
    assert plain.verdict == NOT_MEASURED and plain.cells == {}
    assert plain.evidence.startswith("not run: no model with prompt metrics on digits")
    quality = next(r for r in rows if r.dataset == "digits-captions" and r.feature == "Generation quality")
    assert quality.cells["captions-unet"].startswith("FD 0.8 (real data 0.66")   # an image model, not text
    report = compare.make_report(pipeline, MACHINE, plots=False)
    md = compare.render_markdown(report)
    assert "Text-to-image (prompt adherence)" in md and "transformer: not run" in md
    compare.check_model(unet)   # a captioned run's main metric is FD


# ---------------------------------------------------------------------------
# Metrics the data cannot have: class accuracy on unlabelled images shows "n/a" and why
# ---------------------------------------------------------------------------

UNLABELLED_UNET = {k: v for k, v in UNET.items() if not k.endswith("class_acc")}   # images.py leaves them out
UNLABELLED_GPT = {k: v for k, v in GPT_IMAGES.items() if not k.endswith("class_acc")}


def test_class_accuracy_of_unlabelled_images_is_not_applicable_not_blank():
    from components.evaluation.images import UNLABELLED

    plain, labelled = result("digits-unet", UNLABELLED_UNET), result("digits-gpt", GPT_IMAGES)
    assert plain.not_applicable_reason("eval/class_acc") == UNLABELLED          # inferred: floor without classes
    assert plain.not_applicable_reason("eval/inpaint_bottom_class_acc") == UNLABELLED
    assert plain.not_applicable_reason("eval/fd") is None
    assert labelled.not_applicable_reason("eval/class_acc") is None             # it has a number
    assert labelled.not_applicable_reason("eval/sr_class_acc") is None          # merely not measured
    row = compare.row_quality("digits", [plain, labelled])
    assert row.cells["digits-unet"].endswith("; class accuracy n/a")
    assert row.notes == {"digits-unet": UNLABELLED}
    assert "class accuracy 0.8 (real 0.97)" in row.cells["digits-gpt"]
    assert row.verdict == MIXED                                                 # FD still judged for both

    told = result("digits-gpt", {**GPT_IMAGES, "eval/class_acc": float("nan")})
    told.not_applicable = {"class_acc": "not applicable (one class: nothing to tell apart)"}
    assert compare.row_quality("digits", [told]).notes == {"digits-gpt": told.not_applicable["class_acc"]}


def test_not_applicable_renders_na_with_its_reason_in_both_formats():
    models = [result("digits-unet", UNLABELLED_UNET), result("digits-gpt", UNLABELLED_GPT)]
    report = compare.make_report(compare.Pipeline({"digits": "r"}, "f", "now", models), MACHINE, plots=False)
    md, page = compare.render_markdown(report), compare.render_html(report)
    assert md.count("class accuracy n/a (unlabelled: no classes)") == 2
    abbr = '<abbr class="na" title="not applicable (unlabelled: no classes)">n/a</abbr>'
    assert page.count(f"class accuracy {abbr}") == 2
    assert "FD 0.7 (real data 0.66, KDE 0.93, Gaussian 0.78); class accuracy " + abbr in page
    assert "abbr.na" in page and md.count("\n| ") == page.count("<tr>")
    report.rows[0].cells["digits-unet"] = "<i>x</i> n/a"                       # the text around is still escaped
    assert f"<td>&lt;i&gt;x&lt;/i&gt; {abbr}</td>" in compare.render_html(report)


def test_inpainting_without_classes_shows_na_and_still_judges_the_masks():
    masks = {k: v for k, v in inpainting(ALL_MASKS, 0.9, 0.8, 12.0).items() if not k.endswith("class_acc")}
    unet = result("digits-unet", {**UNLABELLED_UNET, **masks})
    gpt = result("digits-gpt", {**UNLABELLED_GPT, **{k: v for k, v in inpainting(("bottom",), 0.7, 0.8, 3.0).items()
                                                      if not k.endswith("class_acc")}})
    row = compare.row_editing("digits", [unet, gpt])
    assert "measured on 4 mask(s): class accuracy bottom half n/a, left half n/a" in row.cells["digits-unet"]
    assert "MSE on the hole bottom half 0.05 (NN 0.07)" in row.cells["digits-unet"]
    assert row.notes["digits-unet"] == row.notes["digits-gpt"] == "not applicable (unlabelled: no classes)"
    assert row.verdict == AGREES and "digits-unet inpaints 4 of 4 masks" in row.evidence


def test_not_applicable_is_read_from_the_run_tag_and_the_dataset_params(params, tmp_path, client, fast_machine):
    import mlflow

    from components.compare.collect import not_applicable

    with tracking.pipeline_run(params, tmp_path, flow_run_id=uuid.uuid4().hex, models=["digits-unet"]) as parent:
        with tracking.model_run("digits-unet", params, tmp_path, parent_run_id=parent.info.run_id):
            tracking.log_metrics({**UNET, "eval/class_acc": float("nan")})
            mlflow.set_tag(compare.NOT_APPLICABLE_TAG, json.dumps({"eval/class_acc": "not applicable (no labels)"}))
    pipeline = compare.collect(client, params.tracking.experiment_prefix)
    (m,) = pipeline.models
    assert m.not_applicable == {"eval/class_acc": "not applicable (no labels)"}
    assert m.not_applicable_reason("eval/class_acc") == "not applicable (no labels)"
    run = types.SimpleNamespace(data=types.SimpleNamespace(tags={}, params={"dataset.labelled": "False"}))
    assert not_applicable(run) == {"class_acc": "not applicable (unlabelled: no classes)"}
    build(params, tmp_path)
    md = (tmp_path / "reports" / "compare" / "report.md").read_text()
    assert "class accuracy n/a (no labels)" in md
