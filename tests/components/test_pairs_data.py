"""Pairs data: builtin:pydoc-pairs, the pairs:PATH source (JSONL and TSV), the pairs suite's rules."""
import json

import pytest

from components import data, validation
from components.config import DatasetConfig, PairValidationConfig, SplitConfig
from components.errors import DataError


def pairs_cfg(source: str, **bounds) -> DatasetConfig:
    pv = PairValidationConfig(**{"min_pairs": 10, "max_source_chars": 40, "max_target_chars": 60, **bounds})
    return DatasetConfig(source=source, kind="pairs", split=SplitConfig(val=0.1, test=0.2, seed=0),
                         pair_validation=pv)


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


GOOD = [{"source": f"mod.f{i}(x)", "target": f"Return x plus {i}."} for i in range(30)]


def test_first_sentence_skips_a_signature_paragraph_and_joins_lines():
    assert data.first_sentence("join(a, *p) -> str\n\nJoin two\npaths. More text.", "join") == "Join two paths."
    assert data.first_sentence("No full stop here") == "No full stop here"
    assert data.first_sentence("Version 3.1 is out. Yes.") == "Version 3.1 is out."


def test_pydoc_pairs_harvest_is_deterministic_and_split_by_module():
    one = data.harvest_pydoc_pairs(["json", "posixpath", "textwrap"])
    assert one == data.harvest_pydoc_pairs(["json", "posixpath", "textwrap"])
    sources = [s for _, s, _ in one]
    assert "posixpath.join(a, *p)" in sources and len(set(sources)) == len(sources)
    assert all(t and "\n" not in t for _, _, t in one)
    assert all(" at 0x" not in s for s in sources)   # no memory addresses in signatures


def test_builtin_pairs_ingest_validate_prepare(tmp_path, monkeypatch):
    harvested = [(f"m{i % 12}", f"m{i % 12}.f{i}(a)", f"Do thing {i}.") for i in range(60)]
    harvested.append(("m0", "m0.long(" + "x" * 80 + ")", "Too long a source."))   # beyond the bound: dropped
    monkeypatch.setattr(data, "harvest_pydoc_pairs", lambda: harvested)
    cfg = pairs_cfg("builtin:pydoc-pairs", max_source_chars=80, max_target_chars=96)
    data.ingest("pp", cfg, tmp_path)
    assert validation.validate("pp", cfg, tmp_path, docs=False)["success"]
    data.prepare("pp", cfg, tmp_path)
    m = data.load_manifest("pp", tmp_path)
    assert sum(m["counts"].values()) == 60 and m["kind"] == "pairs"
    splits = {s: data.load_pairs("pp", s, tmp_path) for s in data.SPLITS}
    modules = {s: {src.split(".")[0] for src, _ in p} for s, p in splits.items()}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["val"]   # no module leaks


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_user_pairs_file_goes_through(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, GOOD)
    else:
        path.write_text("".join(f"{p['source']}\t{p['target']}\n" for p in GOOD), encoding="utf-8")
    cfg = pairs_cfg(f"pairs:{path}")
    data.ingest("mine", cfg, tmp_path)
    assert validation.validate("mine", cfg, tmp_path, docs=False)["success"]
    data.prepare("mine", cfg, tmp_path)
    got = sum((data.load_pairs("mine", s, tmp_path) for s in data.SPLITS), [])
    assert sorted(got) == sorted((p["source"], p["target"]) for p in GOOD)


def failing(tmp_path, lines: str, suffix=".jsonl", prepare_refuses=True, **bounds) -> str:
    path = tmp_path / f"bad{suffix}"
    path.write_text(lines, encoding="utf-8")
    cfg = pairs_cfg(f"pairs:{path}", **bounds)
    data.ingest("bad", cfg, tmp_path)
    with pytest.raises(validation.DataValidationError) as e:
        validation.validate("bad", cfg, tmp_path, docs=False)
    if prepare_refuses:   # a bad row: prepare refuses the same snapshot too (the flow never gets there)
        with pytest.raises(DataError):
            data.prepare("bad", cfg, tmp_path)
    assert "\n" not in str(e.value)
    return str(e.value)


def good_lines(n=30):
    return "".join(json.dumps(p) + "\n" for p in GOOD[:n])


def test_empty_side_is_named_with_file_and_line(tmp_path):
    msg = failing(tmp_path, good_lines() + json.dumps({"source": "f()", "target": "  "}) + "\n")
    assert "data/raw/bad/bad.jsonl:31: empty target [not_empty]" in msg


def test_unreadable_line_and_tsv_columns(tmp_path):
    msg = failing(tmp_path, good_lines() + "{not json\n")
    assert "bad.jsonl:31: not a JSON line" in msg and "[readable]" in msg
    tsv = "".join(f"{p['source']}\t{p['target']}\n" for p in GOOD) + "only one column\n"
    msg = failing(tmp_path, tsv, suffix=".tsv")
    assert "bad.tsv:31: 1 tab-separated columns, expected 2" in msg


def test_length_bounds(tmp_path):
    msg = failing(tmp_path, good_lines() + json.dumps({"source": "f" * 41, "target": "ok."}) + "\n")
    assert "bad.jsonl:31: source of 41 characters, more than pair_validation.max_source_chars=40 [length_bounds]" in msg


def test_min_pairs(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", GOOD[:5])
    cfg = pairs_cfg(f"pairs:{path}")
    data.ingest("few", cfg, tmp_path)
    with pytest.raises(validation.DataValidationError, match=r"5 usable pairs, need at least 10 .*\[min_pairs\]"):
        validation.validate("few", cfg, tmp_path, docs=False)


def test_exact_pair_in_train_and_test_is_refused(tmp_path):
    # every line its own group: repeat every pair, so some copy lands in test and its twin in train
    msg = failing(tmp_path, good_lines() + good_lines(), prepare_refuses=False)
    assert "test pair identical to train pair data/raw/bad/bad.jsonl:" in msg and "[train_test_overlap]" in msg


def test_the_run_accepts_pairs_sources_and_names_a_missing_file(tmp_path, project_root):
    from components.config import load_params
    from components.errors import DataError
    from flows.preflight import check_sources

    params = load_params(project_root / "params.yaml")
    check_sources(params, ["pydoc-pairs"])   # builtin:pydoc-pairs
    params = load_params(project_root / "params.yaml", [f"datasets.pydoc-pairs.source=pairs:{tmp_path}/no.jsonl"])
    with pytest.raises(DataError, match="pairs:.*no.jsonl does not exist"):
        check_sources(params, ["pydoc-pairs"])
