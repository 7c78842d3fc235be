"""Data sources, snapshots, splits and the prepared-data API (components/data.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import data
from components.config import DatasetConfig, ImageValidationConfig, SplitConfig, TextValidationConfig
from components.data import DataError
from conftest import make_imagefolder

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------



def image_cfg(src: Path, **kw) -> DatasetConfig:
    return DatasetConfig(source=f"imagefolder:{src}", kind="image", image_size=8, levels=17,
                         split=SplitConfig(val=0.2, test=0.2, seed=0),
                         image_validation=ImageValidationConfig(min_per_class=2), **kw)


def text_cfg(src: Path, **kw) -> DatasetConfig:
    kw.setdefault("split", SplitConfig(val=0.2, test=0.2, seed=0))
    return DatasetConfig(source=f"textfile:{src}", kind="text", min_doc_chars=10,
                         text_validation=TextValidationConfig(min_chars=10, max_vocab=512), **kw)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# builtin:digits
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    cfg = DatasetConfig(source="builtin:digits", kind="image", image_size=8, levels=17,
                        split=SplitConfig(val=0.1, test=0.2, seed=0))
    data.ingest("digits", cfg, root)
    data.prepare("digits", cfg, root)
    return root, cfg


def test_digits_snapshot_has_1797_images_10_classes_levels_0_to_16(digits_root):
    root, cfg = digits_root
    with np.load(root / "data/raw/digits/images.npz") as z:
        images, labels, classes = z["images"], z["labels"], list(z["classes"])
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16
    assert classes == [str(i) for i in range(10)]
    assert sorted(set(labels.tolist())) == list(range(10))


def test_digits_prepare_is_stratified_and_loadable(digits_root):
    root, cfg = digits_root
    m = data.load_manifest("digits", root)
    assert m["kind"] == "image" and m["image_size"] == 8 and m["levels"] == 17
    assert m["classes"] == [str(i) for i in range(10)]
    assert sum(m["counts"].values()) == 1797
    hist = {s: np.array(h) for s, h in m["class_histogram"].items()}
    per_class = hist["train"] + hist["val"] + hist["test"]
    # every class keeps the test and val shares (within rounding)
    assert np.all(np.abs(hist["test"] - per_class * 0.2) <= 0.5)
    assert np.all(np.abs(hist["val"] - per_class * 0.1) <= 0.5)
    x, y = data.load_images("digits", "test", root)
    assert x.shape == (m["counts"]["test"], 8, 8) and x.dtype == np.uint8 and y.dtype == np.int64
    assert x.max() <= 16
    assert np.array_equal(np.bincount(y, minlength=10), hist["test"])
    for rel, md5 in m["files"].items():
        assert data.file_md5(root / "data/prepared/digits" / rel) == md5


def test_digits_ingest_and_prepare_are_deterministic(digits_root, tmp_path):
    root, cfg = digits_root
    data.ingest("digits", cfg, tmp_path)
    data.prepare("digits", cfg, tmp_path)
    assert data.dataset_fingerprint("digits", tmp_path) == data.dataset_fingerprint("digits", root)
    assert listing(tmp_path / "data/prepared/digits") == listing(root / "data/prepared/digits")


def test_levels_requantise_builtin_images(digits_root, tmp_path):
    root, cfg = digits_root
    two = DatasetConfig(source="builtin:digits", kind="image", levels=2, split=cfg.split)
    (tmp_path / "data/raw").mkdir(parents=True)
    shutil.copytree(root / "data/raw/digits", tmp_path / "data/raw/digits")
    data.prepare("digits", two, tmp_path)
    x, _ = data.load_images("digits", "train", tmp_path)
    assert set(np.unique(x).tolist()) == {0, 1}
    assert data.load_manifest("digits", tmp_path)["levels"] == 2


# ---------------------------------------------------------------------------
# builtin:pydoc
# ---------------------------------------------------------------------------

def test_pydoc_harvest_of_a_module_list_is_deterministic():
    first = data.harvest_pydoc(["json", "textwrap"])
    second = data.harvest_pydoc(["json", "textwrap"])
    assert first == second
    ids = [i for i, _ in first]
    assert ids[0] == "json"  # module docstring first, modules in sorted order
    assert all(i.split(".")[0] in ("json", "textwrap") for i in ids)
    assert "json.decoder" in ids and "textwrap.dedent" in ids
    docs = [d for _, d in first]
    assert len(docs) == len(set(docs))  # deduplicated (json.loads is also json.decoder's ...)
    assert all(d == d.strip() and d for d in docs)


def test_pydoc_harvest_skips_modules_with_side_effects():
    ids = [i for i, _ in data.harvest_pydoc(["this", "antigravity", "tkinter", "__phello__", "textwrap"])]
    assert ids and all(i.startswith("textwrap") for i in ids)


def test_pydoc_corpus_size_is_sane(tmp_path):
    cfg = DatasetConfig(source="builtin:pydoc", kind="text", min_doc_chars=40,
                        split=SplitConfig(val=0.05, test=0.1, seed=0))
    data.ingest("pydoc", cfg, tmp_path)
    lines = (tmp_path / "data/raw/pydoc/docs.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    kept = [d for d in docs if len(d) >= 40]
    assert 1_000 < len(kept) < 20_000
    assert 400_000 < sum(map(len, kept)) < 2_000_000  # "about 0.8 MB of English text"
    data.prepare("pydoc", cfg, tmp_path)
    m = data.load_manifest("pydoc", tmp_path)
    assert sum(m["counts"].values()) == len(kept)
    assert m["vocab"] == "".join(sorted(set(data.load_text("pydoc", "train", tmp_path))))
    assert "e" in m["vocab"] and "\n" in m["vocab"]


# ---------------------------------------------------------------------------
# textfile
# ---------------------------------------------------------------------------

def test_textfile_single_file_splits_documents_on_blank_lines(tmp_path):
    paragraphs = [f"Paragraph number {i} says something long enough." for i in range(20)]
    src = tmp_path / "corpus.txt"
    src.write_bytes(("\r\n\r\n".join(paragraphs) + "\r\n\r\nshort\r\n").encode())  # CRLF file
    cfg = text_cfg(src)
    raw = data.ingest("notes", cfg, tmp_path)
    assert (raw / "corpus.txt").read_bytes() == src.read_bytes()  # byte for byte
    data.prepare("notes", cfg, tmp_path)
    m = data.load_manifest("notes", tmp_path)
    assert sum(m["counts"].values()) == 20  # "short" is under min_doc_chars
    assert m["documents_dropped"]["shorter_than_min_doc_chars"] == 1
    texts = {s: data.load_text("notes", s, tmp_path) for s in data.SPLITS}
    assert "\r" not in "".join(texts.values())
    for p in paragraphs:
        assert sum(p in t for t in texts.values()) == 1  # no paragraph in two splits


def test_textfile_folder_one_document_per_file_no_leak(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        where = src / "sub" if i % 3 == 0 else src
        (where / f"doc{i:02d}.txt").write_text(f"Document {i:02d}.\n\nIt has a second paragraph.\n")
    (src / "ignored.md").write_text("not a .txt file, not ingested")
    cfg = text_cfg(src, split=SplitConfig(val=0.2, test=0.2, seed=3))
    raw = data.ingest("docs", cfg, tmp_path)
    assert sorted(listing(raw)) == sorted([f"doc{i:02d}.txt" if i % 3 else f"sub/doc{i:02d}.txt"
                                           for i in range(12)] + ["snapshot.json"])
    data.prepare("docs", cfg, tmp_path)
    m = data.load_manifest("docs", tmp_path)
    assert m["counts"] == {"train": 8, "val": 2, "test": 2}
    texts = {s: data.load_text("docs", s, tmp_path) for s in data.SPLITS}
    for i in range(12):
        holders = [s for s, t in texts.items() if f"Document {i:02d}." in t]
        assert len(holders) == 1  # each whole file (both paragraphs) lives in one split
        assert f"Document {i:02d}.\n\nIt has a second paragraph." in texts[holders[0]]
    first = listing(tmp_path / "data/prepared/docs")
    data.prepare("docs", cfg, tmp_path)
    assert listing(tmp_path / "data/prepared/docs") == first


def test_textfile_duplicate_documents_are_kept_once(tmp_path):
    src = tmp_path / "dup.txt"
    src.write_text("\n\n".join(["The same paragraph, repeated."] * 5 + [f"Unique paragraph {i}." for i in range(6)]))
    cfg = text_cfg(src)
    data.ingest("dup", cfg, tmp_path)
    data.prepare("dup", cfg, tmp_path)
    m = data.load_manifest("dup", tmp_path)
    assert sum(m["counts"].values()) == 7 and m["documents_dropped"]["duplicates"] == 4


# ---------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------

def test_imagefolder_two_classes(tmp_path):
    src = make_imagefolder(tmp_path / "shapes", {"square": 6, "circle": 5})
    Image.fromarray(np.full((17, 16, 3), 200, np.uint8)).save(src / "circle" / "photo.JPG")  # RGB JPEG, 6% oblong
    (src / "circle" / "notes.txt").write_text("not an image")
    cfg = image_cfg(src)
    raw = data.ingest("shapes", cfg, tmp_path)
    assert (raw / "circle/img_0.png").read_bytes() == (src / "circle/img_0.png").read_bytes()
    assert not (raw / "circle/notes.txt").exists()
    data.prepare("shapes", cfg, tmp_path)
    m = data.load_manifest("shapes", tmp_path)
    assert m["classes"] == ["circle", "square"]  # sorted folder names
    assert m["counts"] == {"train": 8, "val": 2, "test": 2}
    assert m["class_histogram"]["test"] == [1, 1] and m["class_histogram"]["val"] == [1, 1]
    xs, ys = zip(*(data.load_images("shapes", s, tmp_path) for s in data.SPLITS))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.shape == (12, 8, 8) and x.dtype == np.uint8 and x.max() <= 16
    assert np.bincount(y).tolist() == [6, 6]
    assert any(np.all(img == round(200 / 255 * 16)) for img in x)  # the flat grey JPEG, quantised


def test_split_indices_deterministic_stratified_disjoint():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    split = SplitConfig(val=0.1, test=0.2, seed=7)
    a, b = data.split_indices(100, split, labels), data.split_indices(100, split, labels)
    assert all(np.array_equal(a[s], b[s]) for s in data.SPLITS)
    every = np.concatenate([a[s] for s in data.SPLITS])
    assert sorted(every.tolist()) == list(range(100))  # disjoint and complete
    assert np.bincount(labels[a["test"]]).tolist() == [10, 6, 4]
    assert np.bincount(labels[a["val"]]).tolist() == [5, 3, 2]
    other = data.split_indices(100, SplitConfig(val=0.1, test=0.2, seed=8), labels)
    assert not np.array_equal(a["test"], other["test"])
    tiny = data.split_indices(3, SplitConfig(val=0.05, test=0.05, seed=0))  # text: at least one each
    assert [len(tiny[s]) for s in data.SPLITS] == [1, 1, 1]


# ---------------------------------------------------------------------------
# failures leave data/raw and data/prepared as they were
# ---------------------------------------------------------------------------

def test_missing_source_is_refused_and_raw_untouched(tmp_path):
    old = tmp_path / "data/raw/shapes"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("previous snapshot")
    with pytest.raises(DataError) as e:
        data.ingest("shapes", image_cfg(Path("/x")), tmp_path)
    assert str(e.value).startswith("datasets.shapes.source: imagefolder:/x does not exist")
    assert listing(old) == {"keep.txt": b"previous snapshot"}


def test_ingest_failing_midway_leaves_raw_untouched(tmp_path, monkeypatch):
    src = make_imagefolder(tmp_path / "shapes", {"a": 3, "b": 3})
    cfg = image_cfg(src)
    data.ingest("shapes", cfg, tmp_path)
    before = listing(tmp_path / "data/raw/shapes")
    make_imagefolder(src, {"a": 3, "b": 3}, seed=1)  # the source changes...
    calls = []

    def flaky_copy(a, b):
        calls.append(a)
        if len(calls) == 4:
            raise OSError("disk full")
        return Path(b).write_bytes(Path(a).read_bytes())

    monkeypatch.setattr(data.shutil, "copyfile", flaky_copy)
    with pytest.raises(OSError, match="disk full"):
        data.ingest("shapes", cfg, tmp_path)  # ...but the copy dies half way
    assert listing(tmp_path / "data/raw/shapes") == before
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == ["shapes"]  # no temp folder left


def test_prepare_failure_leaves_prepared_untouched(tmp_path):
    src = make_imagefolder(tmp_path / "shapes", {"a": 4, "b": 4})
    cfg = image_cfg(src)
    data.ingest("shapes", cfg, tmp_path)
    data.prepare("shapes", cfg, tmp_path)
    before = listing(tmp_path / "data/prepared/shapes")
    (tmp_path / "data/raw/shapes/a/img_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"data/raw/shapes/a/img_1.png: corrupt PNG"):
        data.prepare("shapes", cfg, tmp_path)
    assert listing(tmp_path / "data/prepared/shapes") == before
    assert sorted(p.name for p in (tmp_path / "data/prepared").iterdir()) == ["shapes"]


# ---------------------------------------------------------------------------
# configuration and API errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("source,kind,match", [
    ("builtin:mnist", "image", r"datasets.d.source: unknown builtin 'mnist'"),
    ("builtin:pydoc", "image", r"datasets.d.kind: image, but builtin:pydoc holds text data"),
    ("ftp:somewhere", "image", r"datasets.d.source: 'ftp:somewhere' is not one of"),
    ("textfile:", "text", r"datasets.d.source: textfile: names no path"),
])
def test_bad_source_is_refused(tmp_path, source, kind, match):
    with pytest.raises(DataError, match=match):
        data.ingest("d", DatasetConfig(source=source, kind=kind), tmp_path)


def test_imagefolder_without_class_folders_is_one_unlabelled_class(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    data.ingest("flat", image_cfg(tmp_path / "flat"), tmp_path)
    assert (tmp_path / "data/raw/flat/a.png").exists()
    raw = data.read_raw_images("flat", image_cfg(tmp_path / "flat"), tmp_path)
    assert raw.classes == ["flat"] and not raw.labelled and [it.label for it in raw.items] == [0]


def test_imagefolder_with_class_folders_and_loose_images_is_refused(tmp_path):
    make_imagefolder(tmp_path / "mix", {"a": 2})
    Image.new("L", (8, 8)).save(tmp_path / "mix" / "loose.png")
    with pytest.raises(DataError, match="is not inside a class sub-folder"):
        data.ingest("mix", image_cfg(tmp_path / "mix"), tmp_path)


def test_relative_source_resolves_against_root(tmp_path):
    make_imagefolder(tmp_path / "imgs", {"a": 2, "b": 2})
    data.ingest("rel", image_cfg(Path("imgs")), tmp_path)
    assert (tmp_path / "data/raw/rel/a/img_0.png").exists()


def test_prepared_api_errors_say_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"data/prepared/nope/manifest.json: not found; "
                                        r"run `genflow stage prepare nope`"):
        data.load_manifest("nope", tmp_path)
    with pytest.raises(DataError, match="split 'dev'"):
        data.load_text("nope", "dev", tmp_path)
    with pytest.raises(DataError, match="run `genflow stage ingest nope` first"):
        data.dataset_fingerprint("nope", tmp_path)


def test_fingerprint_follows_raw_content(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("First document of the corpus.\n\nSecond document of the corpus.\n")
    cfg = text_cfg(src)
    data.ingest("t", cfg, tmp_path)
    first = data.dataset_fingerprint("t", tmp_path)
    assert data.dataset_fingerprint("t", tmp_path) == first
    src.write_text("First document of the corpus.\n\nSecond document, edited.\n")
    data.ingest("t", cfg, tmp_path)
    assert data.dataset_fingerprint("t", tmp_path) != first
