"""Great Expectations suites on raw snapshots (components/validation.py): one bad input per rule."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import data
from components.config import DatasetConfig, ImageValidationConfig, SplitConfig, TextValidationConfig
from components.data import DataError
from components.validation import DataValidationError, validate
from conftest import make_imagefolder

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------



def image_cfg(src, min_per_class=2, **kw) -> DatasetConfig:
    return DatasetConfig(source=f"imagefolder:{src}", kind="image", image_size=8, levels=17,
                         split=SplitConfig(val=0.2, test=0.2, seed=0),
                         image_validation=ImageValidationConfig(min_per_class=min_per_class, **kw))


def text_cfg(src, min_chars=20, max_vocab=512) -> DatasetConfig:
    return DatasetConfig(source=f"textfile:{src}", kind="text", min_doc_chars=5,
                         split=SplitConfig(val=0.2, test=0.2, seed=0),
                         text_validation=TextValidationConfig(min_chars=min_chars, max_vocab=max_vocab))


def hand_made_npz(root: Path, name: str, images: np.ndarray, labels, classes) -> DatasetConfig:
    """A raw snapshot written by hand, as ingest would lay out builtin:digits."""
    folder = root / "data/raw" / name
    folder.mkdir(parents=True)
    data.save_npz(folder / "images.npz", images=images, labels=np.asarray(labels, np.int64),
                  classes=np.array(classes), levels=np.array(17))
    data.write_json(folder / data.SNAPSHOT, {"layout": "npz"})
    return DatasetConfig(source="builtin:digits", kind="image", image_size=images.shape[1], levels=17,
                         split=SplitConfig(val=0.0, test=0.25, seed=0),
                         image_validation=ImageValidationConfig(min_per_class=1))


def failure(name, cfg, root) -> tuple[str, dict]:
    """Run validate expecting failure; return the one-line message and the written summary."""
    with pytest.raises(DataValidationError) as e:
        validate(name, cfg, root, docs=False)
    message = str(e.value)
    assert "\n" not in message
    summary = json.loads((root / "data/validation" / f"{name}.json").read_text())
    assert summary["success"] is False
    return message, summary


def rule_result(summary: dict, rule: str) -> list[dict]:
    return [c for c in summary["expectations"] if c["rule"] == rule]


# ---------------------------------------------------------------------------
# passing suites
# ---------------------------------------------------------------------------

def test_digits_pass_and_write_summary_and_data_docs(tmp_path):
    cfg = DatasetConfig(source="builtin:digits", kind="image", image_size=8, levels=17,
                        split=SplitConfig(val=0.1, test=0.2, seed=0),
                        image_validation=ImageValidationConfig(min_per_class=20))
    data.ingest("digits", cfg, tmp_path)
    summary = validate("digits", cfg, tmp_path, docs=True)
    assert summary["success"] is True and summary["rows"] == 1797
    assert summary == json.loads((tmp_path / "data/validation/digits.json").read_text())
    rules = {c["rule"] for c in summary["expectations"]}
    assert rules == {"decodable", "image_size", "no_nan", "value_range", "known_label", "class_present",
                     "min_per_class", "train_test_duplicates"}
    assert all(c["success"] for c in summary["expectations"])
    assert rule_result(summary, "decodable")[0]["unexpected_count"] == 0
    html = (tmp_path / "data/validation/digits_docs/index.html").read_text()
    assert "genflow_image" in html and "every file decodes as an image" in html


def test_text_folder_passes(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    for i in range(5):
        (src / f"n{i}.txt").write_text(f"Note {i}:\tplenty of words here.\n")
    summary = validate_after_ingest("notes", text_cfg(src), tmp_path)
    assert summary["success"] and summary["rows"] == 5
    assert rule_result(summary, "max_vocab")[0]["observed_value"] == len(set("".join(
        f"Note {i}:\tplenty of words here.\n" for i in range(5))))


def validate_after_ingest(name, cfg, root, docs=False):
    data.ingest(name, cfg, root)
    return validate(name, cfg, root, docs=docs)


# ---------------------------------------------------------------------------
# images: one bad input per rule
# ---------------------------------------------------------------------------

@pytest.fixture
def shapes(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"circle": 5, "square": 5})
    return src, image_cfg(src)


def test_corrupt_png(tmp_path, shapes):
    src, cfg = shapes
    (src / "circle" / "img_3.png").write_bytes(b"this is not a png")
    data.ingest("shapes", cfg, tmp_path)
    message, summary = failure("shapes", cfg, tmp_path)
    assert "data/raw/shapes/circle/img_3.png: corrupt PNG (cannot identify image file) [decodable]" in message
    assert message.startswith("datasets.shapes: data/raw/shapes failed validation: ")
    assert message.endswith("full report: data/validation/shapes.json")
    assert rule_result(summary, "decodable")[0]["unexpected_count"] == 1
    assert summary["failed_rules"] == ["decodable"]


def test_truncated_jpeg(tmp_path, shapes):
    src, cfg = shapes
    buf = src / "square" / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    buf.write_bytes(buf.read_bytes()[:300])
    data.ingest("shapes", cfg, tmp_path)
    message, _ = failure("shapes", cfg, tmp_path)
    assert "data/raw/shapes/square/photo.jpg: corrupt JPEG (" in message


def test_wrong_image_size(tmp_path, shapes):
    src, cfg = shapes
    Image.new("L", (4, 4)).save(src / "circle" / "tiny.png")          # smaller than image_size
    Image.new("L", (16, 24)).save(src / "square" / "tall.png")        # far from square
    Image.new("L", (16, 17)).save(src / "square" / "nearly.png")      # within 10%: accepted
    data.ingest("shapes", cfg, tmp_path)
    message, summary = failure("shapes", cfg, tmp_path)
    assert "data/raw/shapes/circle/tiny.png: 4x4 pixels, expected at least 8x8" in message
    assert "data/raw/shapes/square/tall.png: 16x24 pixels, expected at least 8x8 and square within 10%" in message
    assert "nearly.png" not in message
    assert message.count("tiny.png") == 1  # flagged by width and height checks, named once
    assert summary["failed_rules"] == ["image_size", "image_size", "image_size"]


def test_nan_in_hand_made_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 17, (8, 4, 4)).astype(np.float32)
    images[3, 1, 2] = np.nan
    cfg = hand_made_npz(tmp_path, "nanset", images, [0, 1] * 4, ["0", "1"])
    message, summary = failure("nanset", cfg, tmp_path)
    assert "data/raw/nanset/images.npz[3]: 1 NaN pixel value [no_nan]" in message
    assert summary["failed_rules"] == ["no_nan"]


def test_unknown_label_and_value_range_in_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 17, (8, 4, 4)).astype(np.int16)
    images[5, 0, 0] = 40
    cfg = hand_made_npz(tmp_path, "labels", images, [0, 1, 0, 1, 0, 1, 0, 7], ["0", "1"])
    message, summary = failure("labels", cfg, tmp_path)
    assert "data/raw/labels/images.npz[7]: label 7 is not a known class (0..1) [known_label]" in message
    assert "data/raw/labels/images.npz[5]: pixel values" in message and "outside 0..16 [value_range]" in message


def test_npz_of_the_wrong_shape(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    images[0, 0, 0] = 1
    cfg = hand_made_npz(tmp_path, "shape", images, [0, 1, 0, 1], ["0", "1"])
    cfg.image_size = 16
    message, _ = failure("shape", cfg, tmp_path)
    assert "data/raw/shape/images.npz[0]: 8x8 pixels, expected 16x16" in message


def test_class_with_no_images(tmp_path, shapes):
    src, cfg = shapes
    (src / "triangle").mkdir()
    data.ingest("shapes", cfg, tmp_path)
    message, summary = failure("shapes", cfg, tmp_path)
    assert "data/raw/shapes/triangle: class 'triangle' has no images [class_present]" in message
    assert summary["failed_rules"] == ["class_present"]


def test_class_below_min_per_class(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"big": 6, "small": 2})
    cfg = image_cfg(src, min_per_class=3)
    data.ingest("few", cfg, tmp_path)
    message, _ = failure("few", cfg, tmp_path)
    assert "data/raw/few/small: class 'small' has 2 images, need at least 3 (image_validation.min_per_class)" in message
    assert "'big'" not in message


def test_train_test_duplicates(tmp_path):
    src = tmp_path / "src"
    for cls, grey in (("a", 10), ("b", 240)):
        (src / cls).mkdir(parents=True)
        for i in range(5):  # every image of a class is the same picture
            Image.new("L", (8, 8), grey).save(src / cls / f"img_{i}.png")
    cfg = image_cfg(src)
    data.ingest("dupes", cfg, tmp_path)
    message, summary = failure("dupes", cfg, tmp_path)
    assert "test image with the same pixels as train image data/raw/dupes/" in message
    assert rule_result(summary, "train_test_duplicates")[0]["unexpected_count"] == 2  # one test image per class
    allowed = image_cfg(src, max_duplicate_share=1.0)
    assert validate("dupes", allowed, tmp_path, docs=False)["success"]


# ---------------------------------------------------------------------------
# text: one bad input per rule
# ---------------------------------------------------------------------------

@pytest.fixture
def notes(tmp_path):
    src = tmp_path / "notes"
    src.mkdir()
    (src / "good.txt").write_text("A perfectly ordinary note with enough characters.\n")
    return src


def test_empty_text_file(tmp_path, notes):
    (notes / "empty.txt").write_bytes(b"")
    data.ingest("notes", text_cfg(notes), tmp_path)
    message, summary = failure("notes", text_cfg(notes), tmp_path)
    assert "data/raw/notes/empty.txt: empty text file [not_empty]" in message
    assert summary["failed_rules"] == ["not_empty"]


def test_non_utf8_bytes(tmp_path, notes):
    (notes / "latin1.txt").write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    data.ingest("notes", text_cfg(notes), tmp_path)
    message, summary = failure("notes", text_cfg(notes), tmp_path)
    assert ("data/raw/notes/latin1.txt: not valid UTF-8 (byte 0xe9 at line 2, offset 14); "
            "re-save the file as UTF-8 [readable_utf8]") in message
    assert rule_result(summary, "readable_utf8")[0]["unexpected_count"] == 1


def test_control_characters(tmp_path, notes):
    (notes / "bell.txt").write_text("fine line\twith a tab\nthen a bell \x07 here\n")
    data.ingest("notes", text_cfg(notes), tmp_path)
    message, _ = failure("notes", text_cfg(notes), tmp_path)
    assert "data/raw/notes/bell.txt: 1 control character (first U+0007 at line 2)" in message


def test_text_too_small_and_vocab_too_large(tmp_path, notes):
    cfg = text_cfg(notes, min_chars=10_000, max_vocab=10)
    data.ingest("notes", cfg, tmp_path)
    message, summary = failure("notes", cfg, tmp_path)
    assert "need at least 10000 (text_validation.min_chars) [min_chars]" in message
    assert "distinct characters, more than text_validation.max_vocab=10 [max_vocab]" in message
    assert summary["failed_rules"] == ["min_chars", "max_vocab"]


def test_single_textfile_empty(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("")
    data.ingest("one", text_cfg(src), tmp_path)
    message, _ = failure("one", text_cfg(src), tmp_path)
    assert "data/raw/one/one.txt: empty text file" in message


def test_missing_snapshot_says_ingest_first(tmp_path):
    with pytest.raises(DataError, match=r"run `genflow stage ingest ghost` first") as e:
        validate("ghost", text_cfg(tmp_path), tmp_path, docs=False)
    assert not isinstance(e.value, DataValidationError)


def test_many_offenders_are_counted_not_all_named(tmp_path, notes):
    for i in range(5):
        (notes / f"empty{i}.txt").write_bytes(b"")
    data.ingest("notes", text_cfg(notes), tmp_path)
    message, summary = failure("notes", text_cfg(notes), tmp_path)
    assert message.count("empty text file") == 3 and "and 2 more [not_empty]" in message
    assert rule_result(summary, "not_empty")[0]["unexpected_count"] == 5
    assert len(rule_result(summary, "not_empty")[0]["problems"]) == 5


# ---------------------------------------------------------------------------
# A passed validation of the same inputs is reused (flows/stages.py)
# ---------------------------------------------------------------------------

def test_a_passed_validation_is_reused_until_the_raw_data_or_params_change(tmp_path, capsys):
    from components.config import Params
    from flows import stages

    src = make_imagefolder(tmp_path / "src", {"a": 4, "b": 4})
    p = Params(datasets={"mine": image_cfg(src)})
    root = tmp_path / "project"
    root.mkdir()
    report = root / "data" / "validation" / "mine.json"

    def validate_again() -> bool:
        """True when the suite ran (the report written again: a new file), False when it was reused."""
        before = report.stat().st_ino if report.exists() else None
        stages.run_stage(p, "validate", "mine", root)
        reused = "kept" in capsys.readouterr().out
        assert reused == (report.stat().st_ino == before)
        return not reused

    stages.run_stage(p, "ingest", "mine", root)
    assert validate_again()                      # first time: the suite runs
    assert not validate_again()                  # same raw bytes, params, code: reused
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(src / "a" / "new.png")
    stages.run_stage(p, "ingest", "mine", root)  # new raw bytes
    assert validate_again()
    assert not validate_again()
    p.datasets["mine"].image_validation.min_per_class = 3   # other params: validated again
    assert validate_again()

    p.datasets["mine"].image_validation.min_per_class = 50  # fails: raises, and nothing is recorded as passed
    with pytest.raises(DataValidationError):
        stages.run_stage(p, "validate", "mine", root)
    p.datasets["mine"].image_validation.min_per_class = 3   # the passed inputs of before: reused again
    assert not json.loads(report.read_text())["success"]    # ... but the report on disk is the failed one,
    assert validate_again()                                 # so the suite runs
