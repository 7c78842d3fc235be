"""Text of any shape: decoding a user's text files, and splitting text too few documents to split.

    decode_text(data)                  DecodedText: UTF-8 (a leading BOM stripped, CRLF -> LF), or the
                                       one-line reason it is not UTF-8 (byte offset and what to do)
    split_by_characters(text, split)   {train, val, test}: contiguous character ranges, in order
    documents_fill_splits(counts, split)  whether a split by document leaves no wanted split empty

A `textfile:PATH` source may be a file of paragraphs separated by blank lines (one document each),
a file with no blank lines (one sentence per line, or one long book: a single document), or a
folder of .txt files (one document per file). When the documents are too few to give every split
at least one, the text is cut by characters instead, as nanoGPT does: the first 1 - val - test of
the characters train, the next val, the last test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from components.config import SplitConfig

BOM = "\ufeff"
SPLITS = ("train", "val", "test")


@dataclass
class DecodedText:
    text: Optional[str]        # None when the bytes are not UTF-8
    error: Optional[str] = None
    bom: bool = False          # a UTF-8 byte order mark was stripped
    crlf: int = 0              # Windows line endings turned into "\n"


def decode_text(data: bytes) -> DecodedText:
    """UTF-8 bytes as text with "\\n" line ends; for other encodings the reason, in one line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return DecodedText(None, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at line {line}, offset {e.start}); "
                                 "re-save the file as UTF-8")
    bom = text.startswith(BOM)
    if bom:
        text = text[1:]
    crlf = text.count("\r\n")
    return DecodedText(text.replace("\r\n", "\n") if crlf else text, None, bom, crlf)


def documents_fill_splits(counts: Mapping[str, int], split: SplitConfig) -> bool:
    """True when a split by document gives train, and val and test where their share is > 0, a document."""
    return all(counts[s] > 0 for s in SPLITS if s == "train" or getattr(split, s) > 0)


def split_by_characters(text: str, split: SplitConfig) -> dict[str, str]:
    """Contiguous ranges of text: train the first 1 - val - test of its characters, then val, then test."""
    n = len(text)
    n_train = int(n * (1.0 - split.val - split.test))
    n_val = n - n_train if split.test <= 0 else int(n * split.val)
    return {"train": text[:n_train], "val": text[n_train:n_train + n_val], "test": text[n_train + n_val:]}
