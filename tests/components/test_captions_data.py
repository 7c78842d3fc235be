"""Captioned images: builtin:digits-captions (captions from the label and measured pixels), a user's
imagefolder with metadata.jsonl or metadata.csv, and the captions suite's rules."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from components import captions, data, validation
from components.config import CaptionValidationConfig, DatasetConfig, SplitConfig
from components.errors import DataError


def builtin_cfg(**kw) -> DatasetConfig:
    return DatasetConfig(source="builtin:digits-captions", kind="captions", **kw)


def folder_cfg(path, **bounds) -> DatasetConfig:
    cv = CaptionValidationConfig(**{"max_chars": 30, "min_images": 4, **bounds})
    return DatasetConfig(source=f"imagefolder:{path}", kind="captions", split=SplitConfig(val=0.0, test=0.25, seed=0),
                         caption_validation=cv)


# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------

def test_caption_generation_is_deterministic_and_every_caption_names_its_digit():
    images, labels, _ = data.load_digits_arrays()
    images, labels = images[:300], labels[:300]
    one, cuts = captions.caption_records(images, labels, 17, seed=0, phrasings=3)
    again, _ = captions.caption_records(images, labels, 17, seed=0, phrasings=3)
    other, _ = captions.caption_records(images, labels, 17, seed=1, phrasings=3)
    assert one == again
    assert [r["texts"] for r in one] != [r["texts"] for r in other]   # the seed draws the phrasings
    assert all(len(r["texts"]) == 3 for r in one)
    for r in one:
        for text in r["texts"]:
            asked = captions.parse_caption(text)
            assert asked["digit"] == r["label"], text
            for k in captions.PROPERTIES:   # whatever a caption says about a property is the image's bucket
                assert asked[k] is None or captions.BUCKET_WORDS[k][asked[k]] == r["words"][k], (text, r["words"])
        full = captions.parse_caption(r["texts"][0])   # the first phrasing names every said property
        assert {k: full[k] for k in captions.PROPERTIES} == \
            {k: (None if w == captions.UNSAID else captions.BUCKET_WORDS[k].index(w)) for k, w in r["words"].items()}
    # terciles: each bucket of each property holds about a third of the images
    for k in captions.PROPERTIES:
        counts = np.bincount([captions.BUCKET_WORDS[k].index(r["words"][k]) for r in one], minlength=3)
        assert counts.min() >= 70, (k, counts)
    assert cuts["ink"][0] < cuts["ink"][1]


def test_measure_reads_slant_width_and_ink_from_the_moments():
    slash = np.zeros((8, 8))
    for r in range(8):
        slash[r, 7 - r] = 16   # "/": the top is to the right
    bar = np.zeros((8, 8))
    bar[:, 3:5] = 16
    block = np.zeros((8, 8))
    block[:, 1:7] = 16
    m = captions.measure(np.stack([slash, slash[:, ::-1], bar, block, np.zeros((8, 8))]), 17)
    assert m["slant"][0] == pytest.approx(1.0) and m["slant"][1] == pytest.approx(-1.0)
    assert m["slant"][2] == pytest.approx(0.0) and m["width"][2] < m["width"][3]
    assert m["ink"][2] == pytest.approx(0.25) and m["ink"][3] == pytest.approx(0.75)
    assert [m[k][4] for k in captions.PROPERTIES] == [0.0, 0.0, 0.0]   # no ink: no nonsense


# ---------------------------------------------------------------------------
# builtin:digits-captions through ingest, validate, prepare
# ---------------------------------------------------------------------------

def test_builtin_prepares_with_properties_the_pixels_give_back(tmp_path):
    cfg = builtin_cfg()
    data.ingest("dc", cfg, tmp_path)
    summary = validation.validate("dc", cfg, tmp_path, docs=False)
    assert summary["success"] and summary["suite"] == "genflow_captions" and summary["rows"] == 1797
    data.prepare("dc", cfg, tmp_path)
    m = data.load_manifest("dc", tmp_path)
    assert m["kind"] == "captions" and sum(m["counts"].values()) == 1797 and m["classes"] == list("0123456789")
    assert m["max_caption_chars"] <= cfg.caption_validation.max_chars
    cuts = m["caption_thresholds"]
    for split in data.SPLITS:
        x, y = data.load_images("dc", split, tmp_path)
        recs = data.load_captions("dc", split, tmp_path)
        assert len(recs) == len(x) == m["counts"][split]
        again = captions.measure(x, m["levels"])   # recomputed from the prepared pixels
        for k in captions.PROPERTIES:
            np.testing.assert_allclose([r[k] for r in recs], again[k], rtol=0, atol=1e-12)
        for r, label, i in zip(recs, y.tolist(), range(len(recs))):
            assert r["label"] == label
            assert r["words"] == captions.bucket_words(captions.buckets(again, cuts, i))
            assert all(captions.parse_caption(t)["digit"] == label for t in r["texts"])
            assert set("".join(r["texts"])) <= set(m["vocab"]) | set(m["unseen_chars"].get(split, ""))
    before, raw = dict(m["files"]), data.dataset_fingerprint("dc", tmp_path)
    data.ingest("dc", cfg, tmp_path)    # the same bytes again, raw and prepared: the same DVC hashes
    data.prepare("dc", cfg, tmp_path)
    assert data.dataset_fingerprint("dc", tmp_path) == raw and data.load_manifest("dc", tmp_path)["files"] == before


# ---------------------------------------------------------------------------
# A user's captioned imagefolder
# ---------------------------------------------------------------------------

CAPTIONS = {"a.png": "a thick seven", "b.png": "a thin one", "sub/c.png": "an upright zero",
            "d.jpg": "a wide two", "e.png": "a narrow four", "f.png": "a small thin zero"}


def make_folder(tmp_path, fmt: str, rows: list[tuple[str, str]], images=CAPTIONS) -> "Path":   # noqa: F821
    folder = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for name in images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name)
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows), encoding="utf-8")
    else:
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["file_name", "text"])
            w.writerows(rows)
    return folder


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_metadata_folder_prepares(tmp_path, fmt):
    folder = make_folder(tmp_path, fmt, list(CAPTIONS.items()) + [("a.png", "a seven, thick")])
    cfg = folder_cfg(folder)
    data.ingest("mine", cfg, tmp_path)
    assert validation.validate("mine", cfg, tmp_path, docs=False)["success"]
    data.prepare("mine", cfg, tmp_path)
    m = data.load_manifest("mine", tmp_path)
    assert m["counts"]["test"] >= 1 and sum(m["counts"].values()) == 6 and m["classes"] == []
    got = {}
    for split in data.SPLITS:
        x, y = data.load_images("mine", split, tmp_path)
        recs = data.load_captions("mine", split, tmp_path)
        assert x.shape[1:] == (8, 8) and (y == -1).all() and len(recs) == len(x)
        got.update({r["file"]: r["texts"] for r in recs})
        for k, v in captions.measure(x, 17).items():
            np.testing.assert_allclose([r[k] for r in recs], v, atol=1e-12)
    assert got == {f: [t] for f, t in CAPTIONS.items()} | {"a.png": ["a thick seven", "a seven, thick"]}   # both lines


def failure(tmp_path, rows, fmt="jsonl", images=CAPTIONS, **bounds) -> str:
    folder = make_folder(tmp_path, fmt, rows, images)
    cfg = folder_cfg(folder, **bounds)
    data.ingest("bad", cfg, tmp_path)
    with pytest.raises(validation.DataValidationError) as e:
        validation.validate("bad", cfg, tmp_path, docs=False)
    with pytest.raises(DataError) as p:   # prepare refuses the same snapshot on its own
        data.prepare("bad", cfg, tmp_path)
    assert "\n" not in str(e.value) and "\n" not in str(p.value)
    assert not data.prepared_dir("bad", tmp_path).exists()   # nothing prepared
    return str(e.value)


def test_a_caption_naming_a_missing_file_is_named_with_its_line(tmp_path):
    rows = list(CAPTIONS.items()) + [("x.png", "a thick eight")]
    msg = failure(tmp_path, rows)
    assert "data/raw/bad/metadata.jsonl:7: file_name 'x.png' not found in the folder" in msg
    assert "[file_present]" in msg


def test_an_image_without_caption_is_named(tmp_path):
    rows = [r for r in CAPTIONS.items() if r[0] != "sub/c.png"]
    msg = failure(tmp_path, rows, fmt="csv")
    assert "data/raw/bad/sub/c.png: no caption in data/raw/bad/metadata.csv" in msg and "[caption_present]" in msg


def test_empty_and_too_long_captions_are_named_with_their_lines(tmp_path):
    rows = list(CAPTIONS.items())
    rows[1] = ("b.png", "   ")
    rows[3] = ("d.jpg", "a very wide and rather thick two, drawn slowly")
    rows[4] = ("e.png", "a narrow\tfour")
    msg = failure(tmp_path, rows)
    assert ("data/raw/bad/metadata.jsonl:5: 1 control character; a caption is one line of text (no newline or "
            "tab) [no_control_chars]") in msg
    assert "metadata.jsonl:2: empty text for 'b.png'; write its caption or remove the line [not_empty]" in msg
    assert ("data/raw/bad/metadata.jsonl:4: text of 46 characters, more than caption_validation.max_chars=30; "
            "shorten it [length_bound]") in msg


def test_csv_line_numbers_count_the_header(tmp_path):
    rows = list(CAPTIONS.items())
    rows[0] = ("a.png", "")
    msg = failure(tmp_path, rows, fmt="csv")
    assert "data/raw/bad/metadata.csv:2: empty text for 'a.png'; write its caption or remove the line" in msg


def test_an_unreadable_line_and_too_few_images(tmp_path):
    folder = make_folder(tmp_path, "jsonl", list(CAPTIONS.items())[:3], images=dict(list(CAPTIONS.items())[:3]))
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"file_name": "a.png"}\nnot json\n')
    cfg = folder_cfg(folder)
    data.ingest("bad", cfg, tmp_path)
    with pytest.raises(validation.DataValidationError) as e:
        validation.validate("bad", cfg, tmp_path, docs=False)
    msg = str(e.value)
    assert "metadata.jsonl:4: needs a file_name and a text (both strings) [readable]" in msg
    assert 'metadata.jsonl:5: not a JSON line {"file_name": "...", "text": "..."} [readable]' in msg
    assert "3 usable captioned images, need at least 4 (caption_validation.min_images) [min_images]" in msg


def test_a_captions_folder_without_metadata_is_refused_before_ingest(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    with pytest.raises(DataError, match=r"has no metadata.jsonl or metadata.csv; add one"):
        data.parse_source("plain", folder_cfg(folder), tmp_path)
    (folder / "metadata.jsonl").write_text("", encoding="utf-8")
    (folder / "metadata.csv").write_text("file_name,text\n", encoding="utf-8")
    with pytest.raises(DataError, match="has both metadata.jsonl and metadata.csv; keep one"):
        data.parse_source("plain", folder_cfg(folder), tmp_path)
    with pytest.raises(DataError, match="set kind: captions"):
        data.parse_source("dc", DatasetConfig(source="builtin:digits-captions", kind="image"), tmp_path)


def test_a_corrupt_image_in_a_captions_folder_is_named(tmp_path):
    folder = make_folder(tmp_path, "jsonl", list(CAPTIONS.items()))
    (folder / "e.png").write_bytes(b"not a png at all")
    cfg = folder_cfg(folder)
    data.ingest("bad", cfg, tmp_path)
    with pytest.raises(validation.DataValidationError) as e:
        validation.validate("bad", cfg, tmp_path, docs=False)
    assert "data/raw/bad/e.png: corrupt PNG (cannot identify image file) [decodable]" in str(e.value)
