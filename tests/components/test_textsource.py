"""textfile: sources of every shape (components/textsource.py) through ingest, validate and prepare."""
import pytest

from components import data
from components.config import DatasetConfig, SplitConfig, TextValidationConfig
from components.data import DataError
from components.textsource import decode_text, split_by_characters
from components.validation import DataValidationError, validate

SENTENCES = [f"Sentence {i:03d} of the tiny corpus tells a short story about the number {i}." for i in range(60)]


def text_cfg(src, **kw) -> DatasetConfig:
    return DatasetConfig(source=f"textfile:{src}", kind="text", min_doc_chars=10,
                         split=SplitConfig(val=0.1, test=0.1, seed=0),
                         text_validation=TextValidationConfig(min_chars=100, max_vocab=512), **kw)


def run_stages(src, name="notes", root=None):
    """ingest -> validate -> prepare, as `genflow run` does; returns (manifest, {split: text})."""
    cfg = text_cfg(src)
    data.ingest(name, cfg, root)
    summary = validate(name, cfg, root, docs=False)
    assert summary["success"] is True
    data.prepare(name, cfg, root)
    return data.load_manifest(name, root), {s: data.load_text(name, s, root) for s in data.SPLITS}


def write_book(path, n=400):
    path.write_text(" ".join(f"Word{i % 37} of chapter {i // 50}." for i in range(n)), encoding="utf-8")


def test_one_sentence_per_line_splits_by_characters(tmp_path, capsys):
    src = tmp_path / "lines.txt"
    text = "\n".join(SENTENCES) + "\n"
    src.write_text(text, encoding="utf-8")
    m, texts = run_stages(src, root=tmp_path)
    assert m["split_by"] == "characters" and m["documents"] == 1
    joined = texts["train"] + texts["val"] + texts["test"]
    assert joined == text.strip()  # contiguous ranges, in order, nothing lost
    n = len(joined)
    assert len(texts["train"]) == int(n * 0.8) and len(texts["val"]) == int(n * 0.1)
    assert "datasets.notes: 1 document(s), too few to split by document; split by characters" in capsys.readouterr().out


def test_one_long_book_splits_by_characters(tmp_path):
    src = tmp_path / "book.txt"
    write_book(src, 5000)
    m, texts = run_stages(src, root=tmp_path)
    assert m["split_by"] == "characters"
    assert all(texts[s] for s in data.SPLITS)
    assert m["chars"]["train"] > 7 * m["chars"]["test"]


def test_paragraphs_split_by_documents(tmp_path):
    src = tmp_path / "paras.txt"
    src.write_text("\n\n".join(SENTENCES), encoding="utf-8")
    m, texts = run_stages(src, root=tmp_path)
    assert m["split_by"] == "documents" and m["documents"] == 60
    assert m["counts"] == {"train": 48, "val": 6, "test": 6}


def test_folder_of_files_by_documents_and_few_files_by_characters(tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i, s in enumerate(SENTENCES[:20]):
        (many / f"{i:02d}.txt").write_text(s + "\n", encoding="utf-8")
    m, _ = run_stages(many, "many", tmp_path)
    assert m["split_by"] == "documents" and sum(m["counts"].values()) == 20
    few = tmp_path / "few"
    few.mkdir()
    write_book(few / "a.txt")
    write_book(few / "b.txt", 300)
    m, texts = run_stages(few, "few", tmp_path)
    assert m["split_by"] == "characters" and m["documents"] == 2
    assert all(texts[s] for s in data.SPLITS)


def test_crlf_and_bom_are_normalised_and_counted(tmp_path):
    src = tmp_path / "windows.txt"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(SENTENCES).encode("utf-8") + b"\r\n")
    m, texts = run_stages(src, root=tmp_path)
    assert (tmp_path / "data/raw/notes/windows.txt").read_bytes() == src.read_bytes()  # the snapshot is a byte copy
    joined = "".join(texts.values())
    assert "\r" not in joined and "\ufeff" not in joined
    assert joined.startswith("Sentence 000")
    assert m["normalised"] == {"bom_stripped": 1, "crlf_files": 1, "crlf_line_ends": 60}
    assert m["split_by"] == "characters"


def test_other_encoding_is_one_line_with_offset_and_remedy(tmp_path):
    src = tmp_path / "latin.txt"
    src.write_bytes("\n".join(SENTENCES[:5]).encode() + "\ncaf\xe9\n".encode("latin-1"))
    cfg = text_cfg(src)
    data.ingest("notes", cfg, tmp_path)
    offset = src.read_bytes().index(b"\xe9")
    with pytest.raises(DataValidationError) as e:
        validate("notes", cfg, tmp_path, docs=False)
    message = str(e.value)
    assert "\n" not in message
    assert (f"data/raw/notes/latin.txt: not valid UTF-8 (byte 0xe9 at line 6, offset {offset}); "
            "re-save the file as UTF-8") in message
    with pytest.raises(DataError, match=rf"latin.txt: not valid UTF-8 .*offset {offset}\); re-save the file as UTF-8"):
        data.prepare("notes", cfg, tmp_path)
    assert not (tmp_path / "data/prepared/notes").exists()  # nothing half-written


def test_too_little_text_even_for_characters(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("Only a dozen characters.", encoding="utf-8")
    cfg = DatasetConfig(source=f"textfile:{src}", kind="text", min_doc_chars=5,
                        split=SplitConfig(val=0.01, test=0.01, seed=0))
    data.ingest("tiny", cfg, tmp_path)
    with pytest.raises(DataError, match=r"datasets.tiny.split: the val split would be empty even split by characters"):
        data.prepare("tiny", cfg, tmp_path)


def test_decode_and_character_split_units():
    d = decode_text(b"\xef\xbb\xbfa\r\nb\r\n")
    assert (d.text, d.bom, d.crlf, d.error) == ("a\nb\n", True, 2, None)
    assert decode_text(b"plain\n").bom is False
    cut = split_by_characters("abcdefghij", SplitConfig(val=0.2, test=0.0, seed=0))
    assert cut == {"train": "abcdefgh", "val": "ij", "test": ""}
