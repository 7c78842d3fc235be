"""Character tokenizer: round trip, unknown characters counted and refused in strict mode."""
import numpy as np
import pytest

from components.tokenizer import UNK_CHAR, CharTokenizer, UnknownCharactersError


def test_round_trip():
    tok = CharTokenizer.from_text("Return the value.\n\tÉtat: ok")
    text = "the value: État\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text
    assert tok.vocab == "".join(sorted(set("Return the value.\n\tÉtat: ok")))
    assert tok.vocab_size == len(tok.vocab) + 1


def test_unknown_characters_map_to_unk_and_are_counted():
    tok = CharTokenizer("abc ")
    ids = tok.encode("abz zq😀")
    assert ids.tolist() == [0, 1, tok.unk_id, 3, tok.unk_id, tok.unk_id, tok.unk_id]
    assert tok.unknown_chars("abz zq😀") == {"z": 2, "q": 1, "😀": 1}
    assert tok.decode(ids) == "ab" + UNK_CHAR + " " + UNK_CHAR * 3


def test_strict_encoding_names_the_unknown_characters():
    tok = CharTokenizer("abc")
    with pytest.raises(UnknownCharactersError, match=r"^text: 2 character\(s\).*'x'.*'y'") as e:
        tok.encode("axby", strict=True)
    assert isinstance(e.value, ValueError)
    assert tok.encode("cab", strict=True).tolist() == [2, 0, 1]


def test_bad_vocab_and_ids_are_refused():
    with pytest.raises(ValueError, match="^vocab:"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="^vocab:"):
        CharTokenizer("aa")
    with pytest.raises(ValueError, match="^ids:"):
        CharTokenizer("ab").decode([0, 3])
