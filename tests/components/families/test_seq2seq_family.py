"""Sequence-to-sequence family end to end on tiny pairs: train -> model.pt -> evaluate -> ONNX export."""
import json
import math

import pytest
import torch

from components import data
from components.config import load_params
from components.families import base, seq2seq
from components.models.gpt import ContextLengthError
from components.tokenizer import UnknownCharactersError

WORDS = ("return the value of list key mapping string object build raise error missing").split()


def tiny_overrides(key: str) -> list[str]:
    m = f"models.{key}"
    return [f"{m}.train.max_steps=3", f"{m}.train.max_seconds=0", f"{m}.train.batch_size=4",
            f"{m}.train.warmup_steps=1", f"{m}.train.log_every=1", f"{m}.train.checkpoint_every=0",
            f"{m}.train.threads=1", f"{m}.eval.num_samples=6", f"{m}.eval.ngram_orders=[2]"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, project_root):
    root = tmp_path_factory.mktemp("seq2seq")
    lines = []
    for i in range(60):   # source: a call; target: a sentence made from its words
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7) % len(WORDS)]
        lines.append(json.dumps({"source": f"m{i % 6}.{a}_{b}(x{i})", "target": f"{a.capitalize()} the {b}.",
                                 "group": f"m{i % 6}"}))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    m = "models.pydoc-seq2seq"
    params = load_params(project_root / "params.yaml", [
        f"datasets.pydoc-pairs.source=pairs:{path}", "datasets.pydoc-pairs.pair_validation.min_pairs=10",
        "datasets.pydoc-pairs.split.test=0.3",
        f"{m}.encdec.n_layer_enc=1", f"{m}.encdec.n_layer_dec=1", f"{m}.encdec.n_head=2", f"{m}.encdec.n_embd=16",
        f"{m}.encdec.source_len=24", f"{m}.encdec.target_len=24", *tiny_overrides("pydoc-seq2seq"),
        "models.pydoc-pairs-gpt.gpt.n_layer=1", "models.pydoc-pairs-gpt.gpt.n_head=2",
        "models.pydoc-pairs-gpt.gpt.n_embd=16", "models.pydoc-pairs-gpt.gpt.block_size=48",
        *tiny_overrides("pydoc-pairs-gpt")])
    cfg = params.dataset("pydoc-pairs")
    data.ingest("pydoc-pairs", cfg, root)
    from components import validation

    validation.validate("pydoc-pairs", cfg, root, docs=False)
    data.prepare("pydoc-pairs", cfg, root)
    return root, params


@pytest.fixture(scope="module")
def trained(setup):
    root, params = setup
    return root, params, base.train("pydoc-seq2seq", params, root)


def test_trains_reproducibly_and_saves_its_spec(trained, tmp_path):
    root, params, metrics = trained
    assert {"train/loss", "perf/params", "perf/flops_per_item", "perf/train_items_per_s"} <= set(metrics)
    ckpt = torch.load(root / "models/pydoc-seq2seq/model.pt", weights_only=True)
    cfg = ckpt["config"]
    assert cfg["backbone"] == "encdec" and cfg["kind"] == "pairs" and cfg["family"] == "transformer"
    assert cfg["vocab_size"] == len(cfg["vocab"]) + 4 and cfg["encdec"]["source_len"] == 24
    # the same seed on the same data gives the same weights, bit for bit
    import shutil

    shutil.copytree(root / "data", tmp_path / "data")
    base.train("pydoc-seq2seq", params, tmp_path)
    again = torch.load(tmp_path / "models/pydoc-seq2seq/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], v) for k, v in ckpt["state_dict"].items())


def test_evaluates_with_the_shared_metric_names(trained):
    root, params, _ = trained
    out = seq2seq.evaluate("pydoc-seq2seq", params, root)
    for name in ("eval/bits_per_char", "eval/chrf", "eval/bleu", "eval/exact_match", "baseline/retrieval_chrf",
                 "baseline/ngram4_bits_per_char", "baseline/ngram2_bits_per_char", "perf/decode_ms_per_char_cached",
                 "perf/decode_ms_per_char_no_cross_cache", "perf/decode_ms_per_char_nocache",
                 "perf/sample_ms_per_item"):
        assert math.isfinite(out[name]), name
    assert 0 <= out["eval/exact_match"] <= 1 and 0 <= out["eval/chrf"] <= 100
    assert math.isfinite(out["eval/bits_per_char_other_source"])
    assert out["eval/bits_per_char_other_source"] != out["eval/bits_per_char"]   # the sources were really swapped
    assert json.loads((root / "reports/pydoc-seq2seq/metrics.json").read_text()) == out
    assert "reference:" in (root / "reports/pydoc-seq2seq/samples.txt").read_text()


def test_decoding_modes_and_bad_sources(trained):
    root, params, _ = trained
    model, config = seq2seq.load_model("pydoc-seq2seq", root)
    src = ["m1.value_key(x3)", "m2.list_error(x4)"]
    greedy = seq2seq.transduce(model, config, src, decoding="greedy")
    assert seq2seq.transduce(model, config, src, decoding="beam", beam_width=1) == greedy
    assert len(seq2seq.transduce(model, config, src, decoding="beam", beam_width=3)) == 2
    assert len(seq2seq.transduce(model, config, src, decoding="sample", seed=1)) == 2
    with pytest.raises(ContextLengthError, match="25 characters, longer than the encoder's context 24"):
        seq2seq.transduce(model, config, ["m" * 25])
    with pytest.raises(seq2seq.Seq2SeqError, match="source: empty"):
        seq2seq.transduce(model, config, [""])
    with pytest.raises(seq2seq.Seq2SeqError, match="beam_width: must be >= 1"):
        seq2seq.transduce(model, config, src, decoding="beam", beam_width=0)
    with pytest.raises(UnknownCharactersError, match="'€'"):
        seq2seq.transduce(model, config, ["m1.€()"])


def test_refuses_settings_before_reading_data(setup):
    root, params = setup
    m = params.model("pydoc-seq2seq")
    bad = load_params(params_path(), ["models.pydoc-seq2seq.sample.beam_width=0"]).model("pydoc-seq2seq")
    with pytest.raises(seq2seq.Seq2SeqError, match="sample.beam_width: must be >= 1"):
        seq2seq.check("pydoc-seq2seq", bad)
    manifest = data.load_manifest("pydoc-pairs", root)
    m.encdec.source_len, saved = 5, m.encdec.source_len
    try:
        with pytest.raises(seq2seq.Seq2SeqError, match="encdec.source_len: 5, but pydoc-pairs has sources of up to"):
            seq2seq.model_config("pydoc-seq2seq", m, manifest, root)
    finally:
        m.encdec.source_len = saved


def params_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[3] / "params.yaml"


def test_the_gpt_on_the_same_pairs_reports_the_same_metrics(setup):
    """pydoc-pairs-gpt: source <sep> target <eos>, the loss on the target only."""
    from components.families import transformer
    from components.tokenizer import PairTokenizer

    root, params = setup
    tok = PairTokenizer("abc(). ")
    x, y = transformer.pair_sequences(tok, [("ab()", "c."), ("a()", "bb c.")])
    assert x.shape == y.shape == (2, 9)
    assert (y[0, :4] == -100).all() and y[0, 4:7].tolist() == [*tok.encode("c."), tok.eos_id]
    assert x[0, 4].item() == tok.sep_id and (y[0, 7:] == -100).all()   # padding is not scored

    metrics = base.train("pydoc-pairs-gpt", params, root)
    assert metrics["perf/params"] > 0
    model, config = transformer.load_model("pydoc-pairs-gpt", root)
    assert config["kind"] == "pairs" and config["vocab_size"] == len(config["vocab"]) + 4
    out = transformer.evaluate("pydoc-pairs-gpt", params, root)
    for name in ("eval/bits_per_char", "eval/chrf", "eval/bleu", "eval/exact_match", "baseline/retrieval_chrf",
                 "baseline/ngram4_bits_per_char", "perf/decode_ms_per_char_cached", "perf/decode_ms_per_char_nocache"):
        assert math.isfinite(out[name]), name
    src = ["m1.value_key(x3)", "m2.list_error(x44)"]
    assert transformer.transduce_pairs(model, config, src) == transformer.transduce_pairs(model, config, src,
                                                                                           use_cache=False)


def test_exports_two_graphs_that_pass_parity(trained):
    import onnx

    from components import export

    root, params, _ = trained
    model, config = seq2seq.load_model("pydoc-seq2seq", root)
    result = export.export_model("pydoc-seq2seq", model, config, params.export, root)
    assert result["passed"], result.get("reason")
    folder = root / "exports/pydoc-seq2seq"
    names = {c["name"].split(",")[0] for c in result["checks"]}
    assert {"encoder", "decoder step"} <= names and result["max_abs"] < 1e-4
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["graph"] == "encoder_decoder" and cfg["files"] == {"model": "model.onnx", "encoder": "encoder.onnx"}
    assert [i["name"] for i in cfg["inputs"]] == ["input_ids", "past_kv", "cross_kv", "src_mask"]
    assert [i["name"] for i in cfg["encoder_inputs"]] == ["src_ids", "src_mask"]
    for f in ("model.onnx", "encoder.onnx"):
        onnx.checker.check_model(onnx.load(str(folder / f)), full_check=True)
    # torch-free decoding on the two graphs writes what PyTorch writes
    from components.inference import InferenceError, load_encdec_engine

    engine = load_encdec_engine(folder, prefer_gpu=False)
    src = ["m1.value_key(x3)", "m2.list_error(x4)", "m3.raise(x)"]
    greedy = seq2seq.transduce(model, config, src, decoding="greedy")
    assert engine.transduce(src, decoding="greedy") == greedy
    assert engine.transduce(src, decoding="beam", beam_width=1) == greedy
    # beams of a barely trained model hold near-ties that float rounding may order either way:
    # compare what the two beams found by its log-probability under the PyTorch model
    by_torch = seq2seq.transduce(model, config, src, decoding="beam", beam_width=3)
    for s, a, b in zip(src, engine.transduce(src, decoding="beam", beam_width=3), by_torch):
        if max(len(a), len(b)) >= 23:   # cut at the length limit, without an end marker: not comparable
            continue
        assert target_logprob(model, config, s, a) == pytest.approx(target_logprob(model, config, s, b), abs=1e-3)
    assert engine.transduce(src[:1], decoding="sample", seed=2) == engine.transduce(src[:1], decoding="sample", seed=2)
    for bad, why in (("", "empty"), ("m" * 25, "longer than the encoder's context 24"), ("m€", "'€'")):
        with pytest.raises(InferenceError, match=why):
            engine.transduce([bad])
    with pytest.raises(InferenceError, match="--beam-width: must be >= 1"):
        engine.transduce(src, decoding="beam", beam_width=0)

    # genflow sample pydoc-seq2seq --exports DIR --source TEXT: torch-free, one line per target
    from flows.cli import main

    out = root / "cli-out.txt"
    assert main(["sample", "pydoc-seq2seq", "--exports", str(root / "exports"), "--source", src[0],
                 "--out", str(out)]) == 0
    assert out.read_text() == f"source: {src[0]}\ntarget: {greedy[0]}\n"
    assert main(["sample", "pydoc-seq2seq", "--exports", str(root / "exports"), "--source", "x" * 30]) != 0

    # genflow serve: {"source": ...} is planned, checked and decoded as genflow sample decodes it
    from components.serving.generate import Limits, RequestProblem, plan, run_jobs
    from components.serving.models import smoke_check

    smoke_check(engine)   # what the server runs before it serves a new version
    job = plan(engine, {"source": src[0]}, Limits())
    assert run_jobs(engine, [job]) == [[greedy[0]]]
    drawn = run_jobs(engine, [plan(engine, {"source": src[0], "n": 2, "seed": 5}, Limits())])[0]
    assert drawn == [engine.transduce(src[:1], decoding="sample", seed=5 + i)[0] for i in range(2)]
    for body, field in (({"source": "m" * 25}, "source"), ({"source": "m€"}, "source"), ({"source": ""}, "source"),
                        ({"source": "m", "beam_width": 0}, "beam_width"), ({"prompt": "m"}, "source")):
        with pytest.raises(RequestProblem) as e:
            plan(engine, body, Limits())
        assert e.value.detail[0]["field"] == field, body


def target_logprob(model, config, source: str, target: str) -> float:
    tok = seq2seq.pair_tokenizer(config["vocab"])
    src, mask, tgt_in, tgt_out = seq2seq.pair_tensors(tok, [(source, target)], 24, False)
    with torch.no_grad():
        logp = torch.log_softmax(model(src, tgt_in, mask)[0], -1)
    return float(logp.gather(-1, tgt_out[0][:, None]).sum())


def test_compare_has_the_architecture_row():
    from components import compare
    from components.compare.model import ModelResult

    def res(key, backbone, chrf, bpc):
        return ModelResult(key=key, family="transformer", backbone=backbone, dataset="pydoc-pairs", kind="pairs",
                           run_id=f"r-{key}", metrics={"eval/chrf": chrf, "eval/bits_per_char": bpc,
                                                       "perf/params": 9e5, "perf/train_items_per_s": 3000.0,
                                                       "perf/decode_ms_per_char_cached": 0.8})
    e, d = res("pydoc-seq2seq", "encdec", 20.0, 2.2), res("pydoc-pairs-gpt", "gpt", 17.0, 2.5)
    row = compare.row_architecture("pydoc-pairs", [e, d])
    assert row.verdict == compare.AGREES and "chrF 20 vs 17" in row.evidence
    assert row.cells["pydoc-seq2seq"].startswith("encoder-decoder: chrF 20")
    assert "another source" not in row.cells["pydoc-seq2seq"]
    e.metrics["eval/bits_per_char_other_source"] = 2.6
    assert "2.2 bits/char (another source's: 2.6)" in compare.row_architecture("pydoc-pairs", [e, d]).cells[e.key]
    assert compare.row_architecture("pydoc-pairs", [e, res("pydoc-pairs-gpt", "gpt", 25.0, 2.1)]).verdict == \
        compare.DISAGREES
    assert compare.row_architecture("digits", []).verdict == compare.NOT_MEASURED
    assert "Architecture (transduction)" in compare.CLAIMS
