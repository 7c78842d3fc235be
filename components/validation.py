"""Great Expectations checks of a raw snapshot: one suite per data kind (images, text).

``validate(name, cfg, root)`` decodes data/raw/<name>/ into one row per image (or per text file,
or per document of docs.jsonl), runs the kind's suite on an ephemeral GX context and writes

    data/validation/<name>.json          summary: per-expectation success, unexpected counts, problems
    data/validation/<name>_docs/index.html   GX Data Docs page of the same result (docs=True)

The summary is written even when the suite fails; then ``DataValidationError`` is raised with one
line naming every failed rule and the offending files, e.g.
``data/raw/shapes/circle/img_3.png: corrupt PNG (cannot identify image file) [decodable]``.

Rules (the ``rule`` of each expectation; params.yaml keys in brackets):
    images  decodable, image_size, no_nan, value_range, known_label, class_present,
            min_per_class [image_validation.min_per_class],
            train_test_duplicates [image_validation.max_duplicate_share],
            one_mode (only with datasets.*.mixed_modes: refuse: grey and colour files not mixed)
    text    readable_utf8, not_empty, no_control_chars (newline and tab allowed),
            min_chars [text_validation.min_chars], max_vocab [text_validation.max_vocab]
    pairs   readable (UTF-8, a JSON line or two TSV columns), not_empty (source and target),
            no_control_chars, length_bounds [pair_validation.max_source_chars, max_target_chars],
            train_test_overlap (no exact pair in both train and test), min_pairs [pair_validation.min_pairs]
    captions  readable (UTF-8; a JSON line {"file_name", "text"} or a CSV row), file_present (every
            caption names an image in the folder), caption_present (every image has a caption),
            decodable, image_size, not_empty, length_bound [caption_validation.max_chars],
            no_control_chars (a caption is one line), min_images [caption_validation.min_images]

great_expectations is imported only inside ``validate`` (it takes seconds to import).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from components.config import DatasetConfig
from components.data import (
    MAX_ASPECT,
    DataError,
    PairRow,
    RawCaptions,
    RawImages,
    RawText,
    caption_problems,
    display_path,
    image_array,
    mixed_mode_problems,
    pair_splits,
    raw_dir,
    read_raw_captions,
    read_raw_images,
    read_raw_pairs,
    read_raw_text,
    split_indices,
    unit_documents,
)
from components.files import write_json, write_text
from components.layout import Layout

SHOWN_PER_RULE = 3   # offending files named per failed rule in the one-line error
KEPT_PER_RULE = 20   # offending files kept per rule in the JSON summary (GX's partial list)
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc minus \t and \n


class DataValidationError(DataError):
    """The raw snapshot failed its Great Expectations suite; the message names rules and files."""


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def validation_path(name: str, root: str | Path = ".") -> Path:
    return Layout(root).validation_file(name)


def docs_dir(name: str, root: str | Path = ".") -> Path:
    return Layout(root).data / "validation" / f"{name}_docs"


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def validate(name: str, cfg: DatasetConfig, root: str | Path = ".", *, docs: bool = True) -> dict:
    """Run the suite for cfg.kind on data/raw/<name>/; write the summary (and Data Docs); return it.

    Raises DataValidationError (after writing the summary) when any expectation fails.
    """
    if cfg.kind == "image":
        rows, columns, expectations, explain = _image_table(name, cfg, read_raw_images(name, cfg, root))
    elif cfg.kind == "captions":
        rows, columns, expectations, explain = _captions_table(name, cfg, read_raw_captions(name, cfg, root), root)
    elif cfg.kind == "pairs":
        rows, columns, expectations, explain = _pairs_table(name, cfg, read_raw_pairs(name, root), root)
    else:
        rows, columns, expectations, explain = _text_table(name, cfg, read_raw_text(name, cfg, root), root)
    result = _run_suite(f"genflow_{cfg.kind}", rows, columns, expectations)

    checks, problems = [], []
    for r in result.results:
        rule = r.expectation_config.meta["rule"]
        res = _plain(r.result)
        files = [d["file"] for d in res.get("partial_unexpected_index_list") or []]
        found = [] if r.success else explain(rule, files)
        # GX lists the first KEPT_PER_RULE offending files; the message names SHOWN_PER_RULE of them
        hidden = max(len(found) - SHOWN_PER_RULE, 0) + max((res.get("unexpected_count") or 0) - len(files), 0)
        problems += [f"{p} [{rule}]" for p in found[:SHOWN_PER_RULE]]
        if found and hidden:
            problems.append(f"and {hidden} more [{rule}]")
        kwargs = {k: v for k, v in _plain(r.expectation_config.kwargs).items() if k != "batch_id"}
        checks.append({"rule": rule, "expectation": r.expectation_config.type, "kwargs": kwargs,
                       "success": bool(r.success), "unexpected_count": res.get("unexpected_count"),
                       "element_count": res.get("element_count"), "observed_value": res.get("observed_value"),
                       "problems": found[:KEPT_PER_RULE]})

    import great_expectations as gx

    problems = list(dict.fromkeys(problems))  # a file flagged by two checks of one rule is named once
    report = display_path(validation_path(name, root), root)
    summary = {
        "dataset": name, "kind": cfg.kind, "source": cfg.source, "suite": f"genflow_{cfg.kind}",
        "success": bool(result.success), "rows": len(rows),
        "statistics": _plain(dict(result.statistics)), "expectations": checks,
        "failed_rules": [c["rule"] for c in checks if not c["success"]],
        "docs": display_path(docs_dir(name, root) / "index.html", root) if docs else None,
        "great_expectations_version": gx.__version__,
    }
    write_json(validation_path(name, root), summary)
    if docs:
        _write_docs(result, docs_dir(name, root))
    if not result.success:
        raise DataValidationError(f"datasets.{name}: {display_path(raw_dir(name, root), root)} failed validation: "
                                  + "; ".join(problems) + f"; full report: {report}")
    return summary


# ---------------------------------------------------------------------------
# Images: one row per image
# ---------------------------------------------------------------------------

def _image_table(name: str, cfg: DatasetConfig, raw: RawImages) -> tuple[list[dict], dict[str, str], list, Callable]:
    """Rows (one per image), their column dtypes, the image suite's expectations, and explain(rule, files)."""
    import great_expectations.expectations as gxe

    S, top, n_classes = cfg.image_size, raw.source_levels - 1, len(raw.classes)
    iv = cfg.image_validation
    labels = np.array([it.label for it in raw.items], dtype=np.int64)
    per_class = Counter(labels.tolist())
    # the split prepare will write: exact train/test duplicates are leakage
    idx = split_indices(len(labels), cfg.split, labels=labels)
    split_of = {int(i): s for s, ids in idx.items() for i in ids}
    usable = [it.error is None and not np.isnan(np.asarray(it.pixels, dtype=np.float64)).any() for it in raw.items]
    train_copy = {}   # digest of the pixels -> first train image: 32 bytes per image, not a copy of the pixels
    for i in idx["train"]:
        if usable[i]:
            train_copy.setdefault(_pixel_digest(image_array(raw.items[i], raw, cfg.levels)), i)

    def train_twin(it) -> str | None:
        """The train image with exactly the same pixels as `it`, if any (digests equal, then pixels compared)."""
        pixels = image_array(it, raw, cfg.levels)
        j = train_copy.get(_pixel_digest(pixels))
        if j is not None and np.array_equal(image_array(raw.items[j], raw, cfg.levels), pixels):
            return raw.items[j].file
        return None

    rows, by_file = [], {}
    for i, it in enumerate(raw.items):
        row = {"file": it.file, "label": it.label, "decoded": it.error is None,
               "width": None, "height": None, "aspect": None, "nan_count": None,
               "pixel_min": None, "pixel_max": None,
               "class_count": per_class[it.label] if 0 <= it.label < n_classes else None,
               "duplicate_of_train": None, "colour": it.colour if it.error is None else None}
        if it.error is None:
            px = np.asarray(it.pixels, dtype=np.float64)  # (H, W)
            w, h = it.size
            row.update(width=w, height=h, aspect=max(w, h) / max(min(w, h), 1),
                       nan_count=int(np.isnan(px).sum()))
            if not np.isnan(px).all():
                row.update(pixel_min=float(np.nanmin(px)), pixel_max=float(np.nanmax(px)))
            if usable[i] and split_of[i] == "test":
                twin = train_twin(it)
                row["duplicate_of_train"] = twin is not None
                row["twin"] = twin
        rows.append(row)
        by_file[it.file] = (row, it)
    columns = {"file": "string", "label": "Int64", "decoded": "boolean", "width": "Int64", "height": "Int64",
               "aspect": "Float64", "nan_count": "Int64", "pixel_min": "Float64", "pixel_max": "Float64",
               "class_count": "Int64", "duplicate_of_train": "boolean", "colour": "boolean"}

    def rule(name: str, expectation):
        expectation.meta = {"rule": name}
        return expectation

    size_checks, size_rule = _size_expectations(S, raw.resized)
    share = iv.max_duplicate_share
    expectations = [
        rule("decodable", gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True],
                                                          description="every file decodes as an image")),
        *[rule("image_size", e) for e in size_checks],
        rule("no_nan", gxe.ExpectColumnValuesToBeBetween(column="nan_count", max_value=0,
                                                         description="no NaN pixel values")),
        rule("value_range", gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0,
                                                              description="pixel values are >= 0")),
        rule("value_range", gxe.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=top,
                                                              description=f"pixel values are <= {top}")),
        rule("known_label", gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(n_classes)),
                                                            description="labels name a known class")),
        rule("class_present", gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=list(range(n_classes)), description="every class has images")),
        rule("min_per_class", gxe.ExpectColumnValuesToBeBetween(
            column="class_count", min_value=iv.min_per_class,
            description=f"every class has at least {iv.min_per_class} images (image_validation.min_per_class)")),
        rule("train_test_duplicates", gxe.ExpectColumnValuesToBeInSet(
            column="duplicate_of_train", value_set=[False], mostly=1.0 - share,
            description=f"at most {share:.0%} of test images are exact copies of train images")),
    ]
    mixed = {line.split(": ", 1)[0]: line for line in mixed_mode_problems(name, raw)} \
        if raw.resized and cfg.mixed_modes == "refuse" else {}
    if mixed:   # grey and colour files in one folder, refused: the minority's files are named
        minority_colour = {it.file: it.colour for it in raw.items}[next(iter(mixed))]
        expectations.append(rule("one_mode", gxe.ExpectColumnValuesToBeInSet(
            column="colour", value_set=[not minority_colour], description="every image is grey, or every image colour "
            "(datasets.*.mixed_modes: refuse)")))

    def explain(rule_name: str, files: list[str]) -> list[str]:
        if rule_name == "class_present":
            return [f"{path}: class {c!r} has no images" for k, (c, path) in
                    enumerate(zip(raw.classes, raw.class_paths)) if per_class.get(k, 0) == 0]
        if rule_name == "min_per_class":
            return [f"{path}: class {c!r} has {_count(per_class[k], 'image')}, need at least {iv.min_per_class} "
                    "(image_validation.min_per_class)"
                    for k, (c, path) in enumerate(zip(raw.classes, raw.class_paths))
                    if 0 < per_class.get(k, 0) < iv.min_per_class]
        out = []
        for f in files:
            row, it = by_file[f]
            if rule_name == "decodable":
                out.append(f"{f}: {it.error}")
            elif rule_name == "image_size":
                out.append(f"{f}: {row['width']}x{row['height']} pixels, {size_rule}")
            elif rule_name == "no_nan":
                out.append(f"{f}: {_count(row['nan_count'], 'NaN pixel value')}")
            elif rule_name == "value_range":
                out.append(f"{f}: pixel values {row['pixel_min']:g}..{row['pixel_max']:g} outside 0..{top}")
            elif rule_name == "known_label":
                out.append(f"{f}: label {row['label']} is not a known class (0..{n_classes - 1})")
            elif rule_name == "one_mode":
                out.append(mixed[f])
            elif rule_name == "train_test_duplicates":
                out.append(f"{f}: test image with the same pixels as train image {row['twin']} "
                           f"(image_validation.max_duplicate_share={share})")
        return list(dict.fromkeys(out))  # one line per file even if two size checks flag it

    return rows, columns, expectations, explain


def _pixel_digest(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(pixels.tobytes(), digest_size=16).digest()


def _size_expectations(S: int, resized: bool) -> tuple[list, str]:
    """The image_size rule's expectations on the width, height and aspect columns, and its wording."""
    import great_expectations.expectations as gxe

    if resized:
        return [
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=S,
                                              description=f"images are at least {S} pixels wide"),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=S,
                                              description=f"images are at least {S} pixels high"),
            gxe.ExpectColumnValuesToBeBetween(column="aspect", max_value=MAX_ASPECT,
                                              description="images are square within 10% (they are resized)"),
        ], f"expected at least {S}x{S} and square within 10% (images are resized to {S}x{S})"
    return [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=S, max_value=S,
                                              description=f"images are {S}x{S} (datasets.*.image_size)")
            for c in ("width", "height")], f"expected {S}x{S} (image_size)"


# ---------------------------------------------------------------------------
# Text: one row per file (or per document of docs.jsonl)
# ---------------------------------------------------------------------------

def _text_table(name: str, cfg: DatasetConfig, raw: RawText, root) -> tuple[list[dict], dict[str, str], list, Callable]:
    """Rows (one per file or document), their column dtypes, the text suite's expectations, and explain."""
    import great_expectations.expectations as gxe

    tv = cfg.text_validation
    rows, by_file, seen = [], {}, set()
    for unit in raw.units:
        row = {"file": unit.file, "readable": unit.error is None, "chars": None, "kept_chars": 0,
               "control_chars": None, "new_chars": 0}
        if unit.text is not None:
            bad = CONTROL_CHARS.findall(unit.text)
            chars = set(unit.text)
            row.update(chars=len(unit.text), control_chars=len(bad), new_chars=len(chars - seen),
                       kept_chars=sum(map(len, unit_documents(unit, raw.paragraphs, cfg.min_doc_chars))))
            seen |= chars
            if bad:
                pos = CONTROL_CHARS.search(unit.text).start()
                row["first_control"] = f"U+{ord(bad[0]):04X} at line {unit.text.count(chr(10), 0, pos) + 1}"
        rows.append(row)
        by_file[unit.file] = (row, unit)
    columns = {"file": "string", "readable": "boolean", "chars": "Int64", "kept_chars": "Int64",
               "control_chars": "Int64", "new_chars": "Int64"}
    total_kept, vocab = sum(r["kept_chars"] for r in rows), len(seen)

    def rule(name_: str, expectation):
        expectation.meta = {"rule": name_}
        return expectation

    expectations = [
        rule("readable_utf8", gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True],
                                                              description="every file is valid UTF-8")),
        rule("not_empty", gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=1,
                                                            description="no empty file or document")),
        rule("no_control_chars", gxe.ExpectColumnValuesToBeBetween(
            column="control_chars", max_value=0, description="no control characters except newline and tab")),
        rule("min_chars", gxe.ExpectColumnSumToBeBetween(
            column="kept_chars", min_value=tv.min_chars,
            description=f"at least {tv.min_chars} characters in kept documents (text_validation.min_chars)")),
        rule("max_vocab", gxe.ExpectColumnSumToBeBetween(
            column="new_chars", max_value=tv.max_vocab,
            description=f"at most {tv.max_vocab} distinct characters (text_validation.max_vocab)")),
    ]
    where = display_path(raw_dir(name, root), root)

    def explain(rule_name: str, files: list[str]) -> list[str]:
        if rule_name == "min_chars":
            return [f"{where}: {total_kept} characters in documents of at least {cfg.min_doc_chars} characters, "
                    f"need at least {tv.min_chars} (text_validation.min_chars)"]
        if rule_name == "max_vocab":
            return [f"{where}: {vocab} distinct characters, more than text_validation.max_vocab={tv.max_vocab}"]
        out = []
        for f in files:
            row, unit = by_file[f]
            if rule_name == "readable_utf8":
                out.append(f"{f}: {unit.error}")
            elif rule_name == "not_empty":
                out.append(f"{f}: {'empty text file' if unit.is_file else 'empty document'}")
            elif rule_name == "no_control_chars":
                out.append(f"{f}: {_count(row['control_chars'], 'control character')} (first {row['first_control']}); "
                           "only newline and tab are allowed")
        return out

    return rows, columns, expectations, explain


# ---------------------------------------------------------------------------
# Pairs: one row per line of the pairs file
# ---------------------------------------------------------------------------

def _pairs_table(name: str, cfg: DatasetConfig, raw: list[PairRow], root) -> tuple[list[dict], dict[str, str], list,
                                                                                    Callable]:
    """Rows (one per pair), their column dtypes, the pairs suite's expectations, and explain."""
    import great_expectations.expectations as gxe

    pv = cfg.pair_validation
    where = pair_splits(raw, cfg.split)   # the split prepare will write: a test pair also in train is leakage
    train_line = {}
    for r, s in zip(raw, where):
        if s == "train" and r.error is None:
            train_line.setdefault((r.source, r.target), r.file)
    rows, by_file = [], {}
    for r, s in zip(raw, where):
        row = {"file": r.file, "readable": r.error is None, "source_chars": None, "target_chars": None,
               "control_chars": None, "in_train": None, "usable": 0}
        if r.error is None:
            text = r.source + r.target
            row.update(source_chars=len(r.source), target_chars=len(r.target),
                       control_chars=len(CONTROL_CHARS.findall(text)),
                       usable=int(bool(r.source and r.target and len(r.source) <= pv.max_source_chars
                                       and len(r.target) <= pv.max_target_chars)))
            if s == "test":
                row["in_train"] = train_line.get((r.source, r.target))
        rows.append(row)
        by_file[r.file] = (row, r)
    columns = {"file": "string", "readable": "boolean", "source_chars": "Int64", "target_chars": "Int64",
               "control_chars": "Int64", "in_train": "string", "usable": "Int64"}

    def rule(name_: str, expectation):
        expectation.meta = {"rule": name_}
        return expectation

    expectations = [
        rule("readable", gxe.ExpectColumnValuesToBeInSet(
            column="readable", value_set=[True], description="every line is UTF-8 and a pair (JSON or 2 TSV columns)")),
        *[rule("not_empty", gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1, description=f"no empty {side}"))
          for c, side in (("source_chars", "source"), ("target_chars", "target"))],
        rule("no_control_chars", gxe.ExpectColumnValuesToBeBetween(
            column="control_chars", max_value=0, description="no control characters except newline and tab")),
        rule("length_bounds", gxe.ExpectColumnValuesToBeBetween(
            column="source_chars", max_value=pv.max_source_chars,
            description=f"sources of at most {pv.max_source_chars} characters (pair_validation.max_source_chars)")),
        rule("length_bounds", gxe.ExpectColumnValuesToBeBetween(
            column="target_chars", max_value=pv.max_target_chars,
            description=f"targets of at most {pv.max_target_chars} characters (pair_validation.max_target_chars)")),
        rule("train_test_overlap", gxe.ExpectColumnValuesToBeNull(
            column="in_train", description="no test pair is also a train pair")),
        rule("min_pairs", gxe.ExpectColumnSumToBeBetween(
            column="usable", min_value=pv.min_pairs,
            description=f"at least {pv.min_pairs} usable pairs (pair_validation.min_pairs)")),
    ]
    folder = display_path(raw_dir(name, root), root)

    def explain(rule_name: str, files: list[str]) -> list[str]:
        if rule_name == "min_pairs":
            usable = sum(r["usable"] for r in rows)
            return [f"{folder}: {_count(usable, 'usable pair')}, need at least {pv.min_pairs} "
                    "(pair_validation.min_pairs)"]
        out = []
        for f in files:
            row, r = by_file[f]
            if rule_name == "readable":
                out.append(f"{f}: {r.error}")
            elif rule_name == "not_empty":
                out.append(f"{f}: empty {'source' if not r.source else 'target'}")
            elif rule_name == "no_control_chars":
                out.append(f"{f}: {_count(row['control_chars'], 'control character')}; only newline and tab "
                           "are allowed")
            elif rule_name == "length_bounds":
                for side, n, limit in (("source", row["source_chars"], pv.max_source_chars),
                                       ("target", row["target_chars"], pv.max_target_chars)):
                    if n > limit:
                        out.append(f"{f}: {side} of {n} characters, more than pair_validation.max_{side}_chars="
                                   f"{limit}")
            elif rule_name == "train_test_overlap":
                out.append(f"{f}: test pair identical to train pair {row['in_train']}")
        return list(dict.fromkeys(out))

    return rows, columns, expectations, explain


# ---------------------------------------------------------------------------
# Captions: one row per caption line, and one per image that no line names
# ---------------------------------------------------------------------------

CAPTION_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")   # a caption is one line: no tab or newline either


def _captions_table(name: str, cfg: DatasetConfig, raw: RawCaptions, root) -> tuple[list[dict], dict[str, str], list,
                                                                                     Callable]:
    """Rows, their column dtypes, the captions suite's expectations, and explain. The images join the
    lines on file_name: an image's columns sit on the first line naming it (or on a row of its own,
    has_caption false, when none does), so each image is checked once and each line once."""
    import great_expectations.expectations as gxe

    S, cv = cfg.image_size, cfg.caption_validation
    image_of = dict(zip(raw.keys, raw.images.items))
    first_line = {}
    for ln in raw.lines:
        if ln.error is None and ln.file_name in image_of:
            first_line.setdefault(ln.file_name, ln.where)

    def image_columns(it) -> dict:
        if it.error is not None:
            return {"decoded": False}
        w, h = it.size
        return {"decoded": True, "width": w, "height": h, "aspect": max(w, h) / max(min(w, h), 1)}

    rows, by_id = [], {}
    for ln in raw.lines:
        row = {"file": ln.where, "readable": ln.error is None, "has_caption": True, "has_file": None,
               "decoded": None, "width": None, "height": None, "aspect": None,
               "min_chars": None, "max_chars": None, "control_chars": None, "usable": 0}
        if ln.error is None:
            lengths = [len(t) for t in ln.texts] or [0]
            it = image_of.get(ln.file_name)
            row.update(has_file=it is not None, min_chars=min(lengths), max_chars=max(lengths),
                       control_chars=sum(len(CAPTION_CONTROL_CHARS.findall(t)) for t in ln.texts))
            if it is not None and first_line[ln.file_name] == ln.where:
                row.update(image_columns(it))
                row["image"] = it.file
                row["usable"] = int(it.error is None and min(lengths) > 0 and max(lengths) <= cv.max_chars)
        rows.append(row)
        by_id[ln.where] = (row, ln)
    for key, it in image_of.items():
        if key not in first_line:
            row = {"file": it.file, "readable": True, "has_caption": False, "has_file": True,
                   "image": it.file, "usable": 0, **image_columns(it)}
            rows.append(row)
            by_id[it.file] = (row, None)
    columns = {"file": "string", "readable": "boolean", "has_caption": "boolean", "has_file": "boolean",
               "decoded": "boolean", "width": "Int64", "height": "Int64", "aspect": "Float64",
               "min_chars": "Int64", "max_chars": "Int64", "control_chars": "Int64", "usable": "Int64"}

    def rule(name_: str, expectation):
        expectation.meta = {"rule": name_}
        return expectation

    size_checks, size_rule = _size_expectations(S, raw.images.resized)
    expectations = [
        rule("readable", gxe.ExpectColumnValuesToBeInSet(
            column="readable", value_set=[True],
            description="every caption line is UTF-8 and names a file and a text")),
        rule("file_present", gxe.ExpectColumnValuesToBeInSet(
            column="has_file", value_set=[True], description="every caption names an image in the folder")),
        rule("caption_present", gxe.ExpectColumnValuesToBeInSet(
            column="has_caption", value_set=[True], description="every image has a caption")),
        rule("decodable", gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True],
                                                          description="every image decodes")),
        *[rule("image_size", e) for e in size_checks],
        rule("not_empty", gxe.ExpectColumnValuesToBeBetween(column="min_chars", min_value=1,
                                                            description="no empty caption")),
        rule("length_bound", gxe.ExpectColumnValuesToBeBetween(
            column="max_chars", max_value=cv.max_chars,
            description=f"captions of at most {cv.max_chars} characters (caption_validation.max_chars)")),
        rule("no_control_chars", gxe.ExpectColumnValuesToBeBetween(
            column="control_chars", max_value=0, description="captions are one line, without control characters")),
        rule("min_images", gxe.ExpectColumnSumToBeBetween(
            column="usable", min_value=cv.min_images,
            description=f"at least {cv.min_images} captioned images (caption_validation.min_images)")),
    ]
    folder = display_path(raw_dir(name, root), root)
    said = {(rule_, where): line for rule_, where, line in caption_problems(raw, cv.max_chars)}   # prepare's words

    def explain(rule_name: str, files: list[str]) -> list[str]:
        if rule_name == "min_images":
            usable = sum(r["usable"] for r in rows)
            return [f"{folder}: {_count(usable, 'usable captioned image')}, need at least {cv.min_images} "
                    "(caption_validation.min_images)"]
        out = []
        for f in files:
            row, _ = by_id[f]
            if rule_name == "image_size":
                out.append(f"{row['image']}: {row['width']}x{row['height']} pixels, {size_rule}")
            elif rule_name == "no_control_chars":
                out.append(f"{f}: {_count(row['control_chars'], 'control character')}; a caption is one line of "
                           "text (no newline or tab)")
            else:   # an image's rule names the image, a line's rule the line
                line = said.get((rule_name, row.get("image") if rule_name == "decodable" else f))
                out.append(line or f"{f}: fails {rule_name}")
        return list(dict.fromkeys(out))

    return rows, columns, expectations, explain


# ---------------------------------------------------------------------------
# Great Expectations plumbing
# ---------------------------------------------------------------------------

def _run_suite(suite_name: str, rows: list[dict], columns: dict[str, str], expectations: list):
    """Validate one DataFrame (columns typed as given) against a suite built in one call."""
    import great_expectations as gx
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = pd.DataFrame({c: pd.array([r.get(c) for r in rows], dtype=t) for c, t in columns.items()})
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # they flood stderr otherwise
    suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
    batch = (context.data_sources.add_pandas("genflow").add_dataframe_asset(suite_name)
             .add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame}))
    result = batch.validate(suite, result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["file"],
                                                  "partial_unexpected_count": KEPT_PER_RULE})
    for r in result.results:
        r.result = _plain(r.result)  # numpy scalars break GX's Data Docs renderer and json
    return result


def _write_docs(result, folder: Path) -> None:
    """Render the validation result as a GX Data Docs page (index.html)."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    html = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
    write_text(folder / "index.html", html)


def _plain(obj: Any) -> Any:
    """JSON-able copy: numpy scalars to Python, NaN to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
