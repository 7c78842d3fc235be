"""Rows: one function per feature of the essay's Table 1, over the models of one dataset, and the
verdict logic (agrees / disagrees / mixed / not measured) with its thresholds.

    rows = make_rows(pipeline, machine)        # every feature of every dataset
    overall(rows, "Sampling speed")            # the verdict over all datasets

Each row quotes what every model measured (cells), a verdict, and the numbers behind it (evidence).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from components.compare.derive import (
    achieved_gflops,
    diffusion_samplers,
    fmt,
    gpt_sampling,
    headline_steps,
    mb,
    sample_flops_per_item,
    sequential_calls,
    si,
    spread,
    train_flops_per_item,
)
from components.compare.model import (
    AGREES,
    BASELINE_NAMES,
    DISAGREES,
    MIXED,
    NOT_APPLICABLE,
    NOT_MEASURED,
    Machine,
    ModelResult,
    Pipeline,
    Row,
)

# Verdict thresholds (stated in the report).
STABLE_LOSS_CV = 0.10        # final loss across seeds: coefficient of variation at most this is "stable"
STABLE_METRIC_CV = 0.20      # the main metric across seeds
SCALING_TIE = 1.05           # 2-thread speedups within 5% of each other count as equal
GENERALISES_NN_RATIO = 0.8   # eval/nn_ratio at least this: samples are as far from train as fresh data
COPIES_NN_RATIO = 0.5        # at most this: samples sit on training images


def combine(parts: Iterable[str]) -> str:
    """Verdict of several parts: all agree -> agrees, all disagree -> disagrees, else mixed."""
    parts = [p for p in parts if p != NOT_MEASURED]
    if not parts:
        return NOT_MEASURED
    if all(p == AGREES for p in parts):
        return AGREES
    if all(p == DISAGREES for p in parts):
        return DISAGREES
    return MIXED


def vote(flags: list[bool]) -> str:
    """All True -> agrees, all False -> disagrees, some of each -> mixed."""
    if not flags:
        return NOT_MEASURED
    return AGREES if all(flags) else DISAGREES if not any(flags) else MIXED


# ---------------------------------------------------------------------------
# Rows: one function per feature of Table 1 (models of one dataset)
# ---------------------------------------------------------------------------

def _families(models: list[ModelResult]) -> tuple[list[ModelResult], list[ModelResult]]:
    return ([m for m in models if m.family == "diffusion"], [m for m in models if m.family == "transformer"])


def _na(m: ModelResult, metric: str, notes: dict[str, str]) -> Optional[str]:
    """"n/a" when `metric` cannot exist for m (its reason added to notes[m.key]), else None."""
    why = m.not_applicable_reason(metric)
    if why is None:
        return None
    have = notes.get(m.key)
    if not have:
        notes[m.key] = why
    elif why not in have.split("; "):
        notes[m.key] = f"{have}; {why}"
    return NOT_APPLICABLE


def _missing_family(ds: str, models: list[ModelResult]) -> Optional[str]:
    diff, tr = _families(models)
    if not diff:
        return f"no diffusion model on {ds} in this run"
    if not tr:
        return f"no transformer model on {ds} in this run"
    return None


def row_quality(ds: str, models: list[ModelResult]) -> Row:
    cells, flags, ev, notes = {}, [], [], {}
    for m in models:
        if m.is_image:
            fd, real = m.get("eval/fd"), m.get("baseline/real_fd")
            simple = {n: m.get(f"baseline/{n}_fd") for n in ("kde", "gaussian")}
            simple = {n: v for n, v in simple.items() if v is not None}
            text = f"FD {fmt(fd)} (real data {fmt(real)}"
            text += "".join(f", {BASELINE_NAMES[n]} {fmt(v)}" for n, v in simple.items()) + ")"
            if m.get("eval/class_acc") is not None:
                text += (f"; class accuracy {fmt(m.get('eval/class_acc'), 2)} "
                         f"(real {fmt(m.get('baseline/real_class_acc'), 2)})")
            elif _na(m, "eval/class_acc", notes):
                text += f"; class accuracy {NOT_APPLICABLE}"
            if m.get("eval/bits_per_dim") is not None:
                text += (f"; {fmt(m.get('eval/bits_per_dim'))} bits/dim (pixel logistic regression "
                         f"{fmt(m.get('baseline/logreg_bits_per_dim'))})")
            if simple and fd is not None:
                name, best = min(simple.items(), key=lambda kv: kv[1])
                flags.append(fd < best)
                ev.append(f"{m.key} FD {fmt(fd)} {'<' if fd < best else '>='} "
                          f"{BASELINE_NAMES[name]} baseline {fmt(best)}")
        else:
            bpc = m.get("eval/bits_per_char")
            ngrams = {int(k.split("ngram")[1].split("_")[0]): v for k, v in m.metrics.items()
                      if re.fullmatch(r"baseline/ngram\d+_bits_per_char", k)}
            bound = " (upper bound)" if m.get("eval/bits_per_char_is_upper_bound") else ""
            text = f"{fmt(bpc)} bits/char{bound}"
            if m.get("eval/bits_per_char_sliding") is not None:   # a masked LM's bound with the GPT's context
                text += f", {fmt(m.get('eval/bits_per_char_sliding'))} with sliding windows"
            if ngrams:
                n, best = min(ngrams.items(), key=lambda kv: kv[1])
                text += f" (best n-gram: {n}-gram {fmt(best)})"
                flags.append(bpc < best)
                ev.append(f"{m.key} {fmt(bpc)} bits/char {'<' if bpc < best else '>='} {n}-gram {fmt(best)}")
        cells[m.key] = text
    verdict = vote(flags)
    evidence = "; ".join(ev) if ev else "no baseline to compare with"
    return Row(ds, "Generation quality", cells, verdict,
               f"'high' = better than the best simple baseline: {evidence}", notes)


def row_sampling_speed(ds: str, models: list[ModelResult]) -> Row:
    cells, diff_ms, tr_ms = {}, [], []
    for m in models:
        unit = m.unit
        if m.family == "diffusion":
            rs = diffusion_samplers(m)
            cells[m.key] = "; ".join(f"{r['label']}: {fmt(r['ms'])} ms/{unit} ({r['steps']} steps)" for r in rs)
            diff_ms += [(m.key, r["label"], r["ms"]) for r in rs]
        else:
            cached, nocache = gpt_sampling(m)
            text = f"{fmt(cached)} ms/{unit} with KV cache"
            if nocache is not None:
                text += f", {fmt(nocache)} without"
            if m.is_image:
                text += f" ({m.tokens_per_item} tokens per image)"
            cells[m.key] = text
            if cached is not None:
                tr_ms.append((m.key, cached))
    missing = _missing_family(ds, models)
    if missing or not diff_ms or not tr_ms:
        return Row(ds, "Sampling speed", cells, NOT_MEASURED, missing or "no timings")
    tkey, fastest_tr = min(tr_ms, key=lambda t: t[1])
    slower = [(k, lab, ms) for k, lab, ms in diff_ms if ms > fastest_tr]
    verdict = vote([ms > fastest_tr for _, _, ms in diff_ms])
    unit = models[0].unit
    ev = (f"{len(slower)} of {len(diff_ms)} diffusion samplers slower than {tkey} ({fmt(fastest_tr)} ms/{unit}): "
          + ", ".join(f"{lab} {fmt(ms)}" for _, lab, ms in diff_ms))
    return Row(ds, "Sampling speed", cells, verdict, ev)


def row_cost(ds: str, models: list[ModelResult], machine: Machine) -> Row:
    cells = {}
    for m in models:
        unit = m.unit
        budget = m.param("train.max_seconds")
        g = achieved_gflops(m)
        share = g / machine.best_peak if machine.best_peak > 0 else float("nan")
        total = g * 1e9 * m.metrics["perf/train_seconds"]
        text = (f"trained {fmt(m.metrics['perf/train_seconds'])} s"
                + (f" (budget {fmt(budget)} s)" if budget else "")
                + f"; {si(train_flops_per_item(m), 'FLOP')}/{unit} to train, {si(total, 'FLOP')} in all; "
                f"{fmt(g)} GFLOP/s = {share:.0%} of the matmul peak")
        sf = sample_flops_per_item(m)
        if sf is not None:
            text += f"; ~{si(sf, 'FLOP')}/{unit} to sample"
        cells[m.key] = text
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Computational cost", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    unit = models[0].unit
    d_train, t_train = max(train_flops_per_item(m) for m in diff), min(train_flops_per_item(m) for m in tr)
    parts = [AGREES if d_train > t_train else DISAGREES]
    ev = [f"training per {unit}: diffusion {si(d_train, 'FLOP')} vs transformer {si(t_train, 'FLOP')}"]
    d_s = [f for f in (sample_flops_per_item(m) for m in diff) if f is not None]
    t_s = [f for f in (sample_flops_per_item(m) for m in tr) if f is not None]
    if d_s and t_s:
        parts.append(AGREES if min(t_s) < min(d_s) else DISAGREES)
        ev.append(f"sampling per {unit}: transformer ~{si(min(t_s), 'FLOP')} vs diffusion ~{si(min(d_s), 'FLOP')}")
    ev.append("training seconds follow the budgets in params.yaml, so they are shown, not judged")
    return Row(ds, "Computational cost", cells, combine(parts), "; ".join(ev))


def row_memory(ds: str, models: list[ModelResult]) -> Row:
    cells = {}
    for m in models:
        text = f"{si(m.metrics['perf/params'])} parameters"
        tr, trd = m.get("perf/peak_rss_train_mb"), m.get("perf/peak_rss_train_delta_mb")
        sa, sad = m.get("perf/peak_rss_sample_mb"), m.get("perf/peak_rss_sample_delta_mb")
        if tr is not None:
            text += f"; peak RSS training {mb(tr)}" + (f" (+{mb(trd)})" if trd is not None else "")
        if sa is not None:
            text += f", sampling {mb(sa)}" + (f" (+{mb(sad)})" if sad is not None else "")
        if tr is None and sa is None:
            text += "; peak RSS not recorded"
        cells[m.key] = text
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Parameters and memory", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    metric = "perf/peak_rss_train_delta_mb"
    if not all(m.get(metric) is not None for m in models):
        metric = "perf/params"  # older runs: parameters are the only size measured
    d, t = max(m.metrics[metric] for m in diff), max(m.metrics[metric] for m in tr)
    what = "memory added while training" if metric != "perf/params" else "parameters (no memory recorded)"
    show = mb if metric != "perf/params" else si
    return Row(ds, "Parameters and memory", cells, AGREES if t > d else DISAGREES,
               f"{what}: transformer {show(t)} vs diffusion {show(d)} (small models: the claim is about large ones)")


def row_parallel(ds: str, models: list[ModelResult]) -> Row:
    cells, speedups = {}, {}
    for m in models:
        unit = "images" if m.unit == "image" and m.family == "diffusion" else "tokens"
        parts = []
        if len(m.scaling) >= 2:
            lo, hi = min(m.scaling), max(m.scaling)
            speedups[m.key] = m.scaling[hi] / m.scaling[lo]
            parts.append(f"training {fmt(m.scaling[lo])} {unit}/s on {lo} thread, {fmt(m.scaling[hi])} on {hi} "
                         f"(x{speedups[m.key]:.2f})")
        else:
            parts.append("training thread scaling not probed")
        calls = sequential_calls(m)
        if m.generation == "autoregressive":
            parts.append(f"sampling: {m.tokens_per_item if m.is_image else 1} sequential network call(s) "
                         f"per {m.unit}, one token each")
        elif m.generation == "masked":
            parts.append(f"sampling: {headline_steps(m)} sequential calls per {m.param('sample.length', 0, int)} "
                         f"characters ({fmt(calls)} per char), all positions at once")
        elif calls is not None:
            parts.append(f"sampling: {int(calls)} sequential network calls per image, all pixels at once")
        cells[m.key] = "; ".join(parts)
    missing = _missing_family(ds, models)
    if missing:
        return Row(ds, "Parallel processing", cells, NOT_MEASURED, missing)
    diff, tr = _families(models)
    verdicts, ev = [], []
    d_sp = [speedups[m.key] for m in diff if m.key in speedups]
    t_sp = [speedups[m.key] for m in tr if m.key in speedups]
    if d_sp and t_sp:
        d, t = max(d_sp), max(t_sp)
        verdicts.append(AGREES if t > d * SCALING_TIE else DISAGREES)
        rel = "higher" if t > d * SCALING_TIE else "lower" if t < d / SCALING_TIE else "about equal"
        ev.append(f"2-thread training speedup: transformer x{t:.2f} vs diffusion x{d:.2f} ({rel})"
                  + (" - below x1: other work was using the cores" if min(d, t) < 1 else ""))
    d_calls = [c for c in (sequential_calls(m) for m in diff) if c is not None]
    t_calls = [c for c in (sequential_calls(m) for m in tr) if c is not None]
    if d_calls and t_calls:
        d, t = min(d_calls), min(t_calls)
        verdicts.append(AGREES if d > t else DISAGREES)
        ev.append(f"sequential network calls per {models[0].unit} when sampling: diffusion {fmt(d)} vs "
                  f"transformer {fmt(t)}")
    return Row(ds, "Parallel processing", cells, combine(verdicts), "; ".join(ev) or "nothing measured")


def row_stability(ds: str, models: list[ModelResult]) -> Row:
    cells, stable, ev = {}, [], []
    for m in models:
        parts = []
        if len(m.seeds) >= 2:
            loss = spread([s["train/loss"] for s in m.seeds])
            main = spread([s[m.main_metric] for s in m.seeds])
            name = m.main_metric.split("/")[1]
            parts.append(f"final loss {fmt(loss[0])} ± {fmt(loss[1], 2)} (CV {loss[2]:.0%}), {name} {fmt(main[0])} "
                         f"± {fmt(main[1], 2)} (CV {main[2]:.0%}) over {len(m.seeds)} seeds"
                         + (f" (retrained, {int(m.seeds[0].get('steps', 0))} steps each)"
                            if m.seeds_source == "retrained" and m.seeds[0].get("steps") else ""))
            ok = loss[2] <= STABLE_LOSS_CV and main[2] <= STABLE_METRIC_CV
            stable.append(ok)
            ev.append(f"{m.key} loss CV {loss[2]:.0%}, {name} CV {main[2]:.0%}")
        else:
            parts.append("1 seed: run genflow compare --seeds 3")
        if m.get("eval/recall") is not None:
            parts.append(f"recall {fmt(m.get('eval/recall'), 2)} (real {fmt(m.get('baseline/real_recall'), 2)})")
        cells[m.key] = "; ".join(parts)
    verdicts = []
    if stable and len(stable) == len(models):
        verdicts.append(vote(stable))
        ev.insert(0, f"'stable' = final-loss CV <= {STABLE_LOSS_CV:.0%} and main-metric CV <= {STABLE_METRIC_CV:.0%}")
    else:
        ev.insert(0, "spread over seeds not measured (1 seed: run genflow compare --seeds 3)")
    diff, tr = _families(models)
    d_rec = [m.get("eval/recall") for m in diff if m.get("eval/recall") is not None]
    t_rec = [m.get("eval/recall") for m in tr if m.get("eval/recall") is not None]
    if d_rec and t_rec:
        d, t = max(d_rec), max(t_rec)
        verdicts.append(AGREES if d >= t else DISAGREES)
        ev.append(f"mode coverage (recall): diffusion {fmt(d, 2)} vs transformer {fmt(t, 2)}")
    return Row(ds, "Training stability", cells, combine(verdicts), "; ".join(ev))


def row_memorisation(ds: str, models: list[ModelResult]) -> Row:
    cells, verdicts, ev = {}, [], []
    for m in models:
        r = m.get("eval/nn_ratio")
        if r is None:
            cells[m.key] = "not measured (no nearest-neighbour metric for text)" if m.kind == "text" else "-"
            continue
        cells[m.key] = (f"NN ratio {fmt(r, 2)} (real {fmt(m.get('baseline/real_nn_ratio'), 2)}, "
                        f"KDE {fmt(m.get('baseline/kde_nn_ratio'), 2)}; ~0 = copies of training images"
                        + ("; well above 1 = farther from the data than real images" if r > 1.2 else "") + ")")
        if m.family == "diffusion":
            verdicts.append(AGREES if r >= GENERALISES_NN_RATIO else DISAGREES if r <= COPIES_NN_RATIO else MIXED)
            ev.append(f"{m.key} NN ratio {fmt(r, 2)}")
    verdict = combine(verdicts)
    text = (f"generalises = NN ratio >= {GENERALISES_NN_RATIO}, copies = <= {COPIES_NN_RATIO}: " + "; ".join(ev)
            if ev else "no diffusion model with a nearest-neighbour metric on this dataset")
    return Row(ds, "Memorisation", cells, verdict, text)


def row_architecture(ds: str, models: list[ModelResult]) -> Row:
    """Encoder-decoder against decoder-only on the same pairs: quality (chrF, bits/char), parameters,
    training and decoding cost; 'agrees' when the encoder-decoder is better on both quality measures."""
    feature = "Architecture (transduction)"
    encdec = [m for m in models if m.backbone == "encdec"]
    decoder_only = [m for m in models if m.backbone == "gpt" and m.kind == "pairs"]
    cells = {}
    for m in encdec + decoder_only:
        other, own = m.get("eval/bits_per_char_other_source"), m.get("eval/bits_per_char")
        reads = "" if other is None or own is None else f" (another source's: {fmt(other)})"
        cells[m.key] = (f"{'encoder-decoder' if m in encdec else 'decoder-only'}: chrF {fmt(m.get('eval/chrf'))} "
                        f"(retrieval {fmt(m.get('baseline/retrieval_chrf'))}), {fmt(own)} "
                        f"bits/char{reads}; {si(m.get('perf/params'))} parameters; "
                        f"{fmt(m.get('perf/train_items_per_s'))} target tokens/s training; "
                        f"{fmt(m.get('perf/decode_ms_per_char_cached'))} ms/char decoding")
    if not encdec or not decoder_only:
        return Row(ds, feature, cells, NOT_MEASURED,
                   "needs an encoder-decoder and a decoder-only model on the same pairs in this run")
    e, d = encdec[0], decoder_only[0]
    chrf = (e.get("eval/chrf"), d.get("eval/chrf"))
    bpc = (e.get("eval/bits_per_char"), d.get("eval/bits_per_char"))
    flags = ([chrf[0] > chrf[1]] if None not in chrf else []) + ([bpc[0] < bpc[1]] if None not in bpc else [])

    def ratio(a, b):
        return "-" if a is None or b is None or not b else f"{a / b:.2f}x"

    ev = (f"{e.key} vs {d.key}: chrF {fmt(chrf[0])} vs {fmt(chrf[1])}, bits/char {fmt(bpc[0])} vs {fmt(bpc[1])}; "
          f"parameters {ratio(e.get('perf/params'), d.get('perf/params'))}, training speed "
          f"{ratio(e.get('perf/train_items_per_s'), d.get('perf/train_items_per_s'))}, decoding time "
          f"{ratio(e.get('perf/decode_ms_per_char_cached'), d.get('perf/decode_ms_per_char_cached'))} "
          "(encoder-decoder / decoder-only)")
    return Row(ds, feature, cells, vote(flags), ev)


EDITING = "Editing (inpainting, super-resolution)"
MASK_WORDS = {"bottom": "bottom half", "left": "left half", "centre": "centre square", "random": "random 50%"}
SR_BASELINES = ("bicubic", "nearest")


def _inpaint_masks(m: ModelResult) -> list[str]:
    """The masks a model's run has inpainting metrics for, in components/evaluation/editing.py's order
    (class accuracy, or the hole's MSE alone where class accuracy is not applicable)."""
    return [k for k in MASK_WORDS if m.get(f"eval/inpaint_{k}_class_acc") is not None
            or m.get(f"eval/inpaint_{k}_mse") is not None]


def _sr_baseline(m: ModelResult, source: str, metric: str) -> Optional[float]:
    """baseline/<source>_sr_<metric>, or baseline/<source>_<metric> (both spellings are read)."""
    v = m.get(f"baseline/{source}_sr_{metric}")
    return v if v is not None else m.get(f"baseline/{source}_{metric}")


def _inpaint_cell(m: ModelResult, notes: dict[str, str]) -> str:
    masks = _inpaint_masks(m)
    can = ("any mask" if m.generation == "denoising" else
           "the raster suffix only (the pixels after a prefix, e.g. the bottom half): it cannot condition on later "
           "pixels")

    def acc(k: str) -> str:
        name = f"eval/inpaint_{k}_class_acc"
        if m.get(name) is None and _na(m, name, notes):
            return f"{MASK_WORDS[k]} {NOT_APPLICABLE}"
        return (f"{MASK_WORDS[k]} {fmt(m.get(name), 2)} (nearest-neighbour "
                f"{fmt(m.get(f'baseline/nn_inpaint_{k}_class_acc'), 2)}, mean fill "
                f"{fmt(m.get(f'baseline/mean_inpaint_{k}_class_acc'), 2)})")
    accs = ", ".join(acc(k) for k in masks)
    mse = "; ".join(f"{MASK_WORDS[k]} {fmt(m.get(f'eval/inpaint_{k}_mse'))} "
                    f"(NN {fmt(m.get(f'baseline/nn_inpaint_{k}_mse'))})" for k in masks)
    text = f"inpaints {can}; measured on {len(masks)} mask(s): class accuracy {accs}; MSE on the hole {mse}"
    if len(masks) == len(MASK_WORDS):
        text += (f"; border consistency {fmt(m.get('eval/inpaint_consistency'))} (real images "
                 f"{fmt(m.get('baseline/real_inpaint_consistency'))})")
    if m.get("perf/inpaint_ms_per_item") is not None:
        text += f"; {fmt(m.get('perf/inpaint_ms_per_item'))} ms per completion"
    return text


def _sr_cell(m: ModelResult, notes: dict[str, str]) -> str:
    parts = []
    for metric, name in (("psnr", "PSNR"), ("class_acc", "class accuracy"), ("fd", "FD")):
        v = m.get(f"eval/sr_{metric}")
        if v is None:
            if _na(m, f"eval/sr_{metric}", notes):
                parts.append(f"{name} {NOT_APPLICABLE}")
            continue
        base = ", ".join(f"{b} {fmt(_sr_baseline(m, b, metric), 2 if metric == 'class_acc' else 3)}"
                         for b in SR_BASELINES if _sr_baseline(m, b, metric) is not None)
        parts.append(f"{name} {fmt(v, 2 if metric == 'class_acc' else 3)}" + (f" ({base})" if base else ""))
    return "super-resolution (2x): " + "; ".join(parts)


def row_editing(ds: str, models: list[ModelResult]) -> Row:
    """What each paradigm can inpaint, how well (against nearest-neighbour and mean fill) and at what cost,
    plus super-resolution when a model with eval/sr_* metrics ran; 'agrees' when the diffusion model
    inpaints every mask, beats nearest-neighbour fill on class accuracy for each and, where measured,
    the transformer on the mask both can do and bicubic upscaling on class accuracy and FD."""
    inpainters = [m for m in models if m.is_image and _inpaint_masks(m)]
    upscalers = [m for m in models if m.get("eval/sr_psnr") is not None]
    notes: dict[str, str] = {}
    cells = {m.key: _inpaint_cell(m, notes) for m in inpainters}
    for m in upscalers:
        cells[m.key] = (cells[m.key] + "; " if m.key in cells else "") + _sr_cell(m, notes)
    sr_note = ("" if upscalers else "super-resolution: not run (no model with eval/sr_* metrics on "
               f"{ds}; genflow run --only digits-sr)")
    if not inpainters and not upscalers:
        return Row(ds, EDITING, cells, NOT_MEASURED,
                   "no image model with inpainting metrics on this dataset (eval.inpaint_samples > 0 logs them)"
                   + (f"; {sr_note}" if sr_note else ""))
    flags, ev = [], []
    diff = [m for m in inpainters if m.generation == "denoising"]
    tr = [m for m in inpainters if m.generation == "autoregressive"]
    for m in diff:
        masks = _inpaint_masks(m)
        flags.append(len(masks) == len(MASK_WORDS))
        beats = []
        for k in masks:
            ours, nn = m.get(f"eval/inpaint_{k}_class_acc"), m.get(f"baseline/nn_inpaint_{k}_class_acc")
            if nn is not None and ours is not None:
                flags.append(ours > nn)
                beats.append(f"{MASK_WORDS[k]} {fmt(ours, 2)} {'>' if ours > nn else '<='} {fmt(nn, 2)}")
        ev.append(f"{m.key} inpaints {len(masks)} of {len(MASK_WORDS)} masks; class accuracy against "
                  f"nearest-neighbour fill: {', '.join(beats) or 'no baseline'}")
        for t in tr:
            shared = [k for k in _inpaint_masks(t) if k in masks]
            for k in shared:
                a, b = m.get(f"eval/inpaint_{k}_class_acc"), t.get(f"eval/inpaint_{k}_class_acc")
                if a is None or b is None:   # class accuracy not applicable (unlabelled data)
                    continue
                flags.append(a >= b)
                cost = ""
                ms_d, ms_t = m.get("perf/inpaint_ms_per_item"), t.get("perf/inpaint_ms_per_item")
                if ms_d is not None and ms_t is not None:
                    cost = f"; {fmt(ms_d)} vs {fmt(ms_t)} ms per completion"
                ev.append(f"{MASK_WORDS[k]}, the one mask {t.key} can do: {m.key} {fmt(a, 2)} vs {t.key} "
                          f"{fmt(b, 2)}{cost}")
    for m in upscalers:
        acc, fd, bic_acc, bic_fd = (m.get("eval/sr_class_acc"), m.get("eval/sr_fd"),
                                    _sr_baseline(m, "bicubic", "class_acc"), _sr_baseline(m, "bicubic", "fd"))
        if acc is not None and bic_acc is not None:
            flags.append(acc > bic_acc)
        if fd is not None and bic_fd is not None:
            flags.append(fd < bic_fd)
        ev.append(f"{m.key} super-resolution: class accuracy {fmt(acc, 2)} vs bicubic {fmt(bic_acc, 2)}, "
                  f"FD {fmt(fd)} vs bicubic {fmt(bic_fd)}")
    if sr_note:
        ev.append(sr_note)
    return Row(ds, EDITING, cells, vote(flags), "; ".join(ev), notes)


PROMPTS = "Text-to-image (prompt adherence)"
PROMPT_MODELS = {"diffusion": "captions-unet", "transformer": "captions-encdec"}   # the keys params.yaml trains


def _prompted(models: list[ModelResult]) -> list[ModelResult]:
    """The models with prompt-adherence metrics (components/families/captions.py's names)."""
    return [m for m in models if m.get("eval/prompt_acc") is not None]


def _prompt_cell(m: ModelResult) -> str:
    err, label_only = m.get("eval/attribute_error"), m.get("baseline/label_only_attribute_error")
    share = f", {err / label_only:.2f}x" if err is not None and label_only else ""
    text = (f"prompt accuracy {fmt(m.get('eval/prompt_acc'), 2)}; attribute error {fmt(err)} (digit word alone "
            f"{fmt(label_only)}{share}; real images with their captions "
            f"{fmt(m.get('baseline/real_attribute_error'))}); FD {fmt(m.get('eval/fd'))} (real data "
            f"{fmt(m.get('baseline/real_fd'))}); {fmt(m.get('perf/sample_ms_per_item'))} ms/image to sample")
    if m.generation == "denoising":
        text += f" ({m.param('sample.steps', 0, int)} steps, guidance {fmt(m.param('sample.guidance', 1.0))})"
    sf = sample_flops_per_item(m) if m.generation in ("denoising", "autoregressive") else None
    return text + (f", ~{si(sf, 'FLOP')}/image" if sf is not None else "")


def row_prompts(ds: str, models: list[ModelResult]) -> Row:
    """Both paradigms prompted with the same captions: prompt accuracy, attribute error against the
    label-only and real baselines, FD and sampling cost. 'agrees' when each model's prompt gets through
    (attribute error below the digit word alone's) and the diffusion model follows its prompt at least
    as well as the transformer (prompt accuracy, attribute error) at no worse FD; 'not measured'
    while either paradigm has not run on this dataset."""
    prompted = _prompted(models)
    if not prompted:
        return Row(ds, PROMPTS, {}, NOT_MEASURED, f"not run: no model with prompt metrics on {ds} (captioned images: "
                   f"genflow run --only {PROMPT_MODELS['diffusion']},{PROMPT_MODELS['transformer']})")
    cells = {m.key: _prompt_cell(m) for m in prompted}
    diff, tr = _families(prompted)
    missing = [f"{family}: not run (no {family} model with eval/prompt_acc on {ds}; genflow run --only {key})"
               for family, key, have in (("diffusion", PROMPT_MODELS["diffusion"], diff),
                                         ("transformer", PROMPT_MODELS["transformer"], tr)) if not have]
    flags, ev = [], []
    for m in prompted:
        err, label_only = m.get("eval/attribute_error"), m.get("baseline/label_only_attribute_error")
        if err is not None and label_only is not None:
            flags.append(err < label_only)
            ev.append(f"{m.key} attribute error {fmt(err)} {'<' if err < label_only else '>='} digit word alone "
                      f"{fmt(label_only)}")
    if missing:
        return Row(ds, PROMPTS, cells, NOT_MEASURED, "; ".join(ev + missing))
    d, t = diff[0], tr[0]
    for name, metric, better in (("prompt accuracy", "eval/prompt_acc", max), ("attribute error",
                                 "eval/attribute_error", min), ("FD", "eval/fd", min)):
        a, b = d.get(metric), t.get(metric)
        if a is None or b is None:
            continue
        ok = a == better(a, b)
        flags.append(ok)
        ev.append(f"{name}: {d.key} {fmt(a)} vs {t.key} {fmt(b)} ({'diffusion' if ok else 'transformer'} "
                  f"{'ahead' if a != b else 'level'})")
    ms_d, ms_t = d.get("perf/sample_ms_per_item"), t.get("perf/sample_ms_per_item")
    ev.append(f"sampling {fmt(ms_d)} vs {fmt(ms_t)} ms/image (shown, not judged)")
    return Row(ds, PROMPTS, cells, vote(flags), "; ".join(ev))


def make_rows(pipeline: Pipeline, machine: Machine) -> list[Row]:
    rows = []
    for ds in pipeline.datasets():
        ms = pipeline.models_of(ds)
        rows += [row_quality(ds, ms), row_sampling_speed(ds, ms), row_cost(ds, ms, machine),
                 row_memory(ds, ms), row_parallel(ds, ms), row_stability(ds, ms), row_memorisation(ds, ms),
                 row_architecture(ds, ms), row_editing(ds, ms), row_prompts(ds, ms)]
    return rows


def overall(rows: list[Row], feature: str) -> str:
    return combine(r.verdict for r in rows if r.feature == feature)

