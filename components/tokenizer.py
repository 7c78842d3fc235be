"""Character tokenizer: one id per character of the training split, plus one unknown id.

The vocabulary is a string of the distinct characters of the train split, sorted; it is
saved in the model's checkpoint config (``config["vocab"]``) so that a model always
decodes with the vocabulary it was trained on. Characters outside it map to ``unk_id``
(the last id) and are counted, so a report can say how much of a test split was unknown.

    tok = CharTokenizer.from_text(train_text)
    ids = tok.encode("Return the")          # np.ndarray int64
    tok.decode(ids) == "Return the"
    tok.unknown_chars("naïve")              # {'ï': 1} when 'ï' was not in the train split

Prompts of a text encoder (captions of images) have their own: ``PromptTokenizer`` refuses what
it cannot encode instead of mapping it to ``unk_id``, and gives every prompt a start id, so the
empty prompt is a sequence of its own (the null condition of classifier-free guidance):

    tok = PromptTokenizer(manifest["vocab"], context=65)
    ids, mask = tok.batch(["a thick seven", ""])    # (2, 14) int64 and bool; row 1 is the null prompt
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from components.errors import DataError, ModelError

UNK_CHAR = "\ufffd"  # what an unknown id decodes to (the Unicode replacement character)


class UnknownCharactersError(ModelError):
    """Text holds characters the model never saw in training (strict encoding)."""


class PromptError(ModelError):
    """A prompt the text encoder cannot take: empty where one is required, or longer than its context."""


class CharTokenizer:
    def __init__(self, vocab: str):
        if not vocab:
            raise DataError("vocab: empty; build it from a non-empty train split")
        if len(set(vocab)) != len(vocab):
            raise DataError("vocab: characters must be distinct")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        self.unk_id = len(vocab)
        self._itos = np.array(list(vocab) + [UNK_CHAR], dtype=object)
        # Fast path for encoding: a lookup table over code points (dense up to the largest one).
        top = max(map(ord, vocab))
        self._table = np.full(top + 2, self.unk_id, dtype=np.int64)
        for ch, i in self.stoi.items():
            self._table[ord(ch)] = i

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of ids, including the unknown id."""
        return len(self.vocab) + 1

    def unknown_chars(self, text: str) -> dict[str, int]:
        """Characters of ``text`` outside the vocabulary, with their counts (most common first)."""
        return dict(Counter(ch for ch in text if ch not in self.stoi).most_common())

    def encode(self, text: str, *, strict: bool = False) -> np.ndarray:
        """Ids (int64, one per character). Unknown characters become ``unk_id``;
        with ``strict=True`` they raise UnknownCharactersError naming them instead."""
        if strict:
            unknown = self.unknown_chars(text)
            if unknown:
                shown = ", ".join(repr(c) for c in list(unknown)[:10])
                raise UnknownCharactersError(
                    f"text: {sum(unknown.values())} character(s) outside the model's vocabulary: {shown}; "
                    "remove or replace them")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)  # (N,) code points
        ids = np.full(codes.shape, self.unk_id, dtype=np.int64)
        inside = codes < len(self._table)
        ids[inside] = self._table[codes[inside]]
        return ids

    def decode(self, ids) -> str:
        """Text for a sequence of ids (list, numpy array or 1-D tensor); unk_id becomes U+FFFD."""
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > self.unk_id):
            raise ModelError(f"ids: values must be in 0..{self.unk_id}, got {ids.min()}..{ids.max()}")
        return "".join(self._itos[ids])


class PairTokenizer(CharTokenizer):
    """Characters of a pairs dataset plus three markers after the unknown id:

        0..n-1 characters, n unknown, n+1 end of target (eos), n+2 start of target (bos; the GPT's
        separator between source and target), n+3 padding (inputs only, never predicted)

    ``allowed_tokens`` (= eos_id + 1) is what a decoder may emit: characters, unknown, end.
    """

    @property
    def eos_id(self) -> int:
        return len(self.vocab) + 1

    @property
    def bos_id(self) -> int:
        return len(self.vocab) + 2

    sep_id = bos_id

    @property
    def pad_id(self) -> int:
        return len(self.vocab) + 3

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 4

    @property
    def allowed_tokens(self) -> int:
        return self.eos_id + 1

    def decode_target(self, ids) -> str:
        """Text of generated ids, up to the first end marker (markers never become text)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.decode([i for i in ids if i <= self.unk_id])


class PromptTokenizer(CharTokenizer):
    """Characters of a captions dataset plus three ids after the unknown id:

        0..n-1 characters, n unknown (never produced: unknown characters are refused),
        n+1 start (first id of every prompt; alone, the empty prompt: the null condition),
        n+2 padding (after a prompt, up to the batch's length; masked out by the encoder)

    ``context`` counts positions, the start id included: a prompt has at most context - 1 characters.
    """

    def __init__(self, vocab: str, context: int):
        super().__init__(vocab)
        if context < 1:
            raise ModelError(f"context: must be at least 1 position (the start id), got {context}")
        self.context = int(context)

    @classmethod
    def for_dataset(cls, manifest: dict, context: int, where: str = "textenc.context") -> "PromptTokenizer":
        """The tokenizer of a prepared captions dataset (its manifest's vocab) for an encoder of
        `context` positions; refused in one line when the dataset's longest caption does not fit."""
        longest = int(manifest.get("max_caption_chars") or 0)
        if "vocab" not in manifest or longest == 0:
            raise ModelError(f"datasets.{manifest.get('name')}: its manifest has no captions (kind "
                             f"{manifest.get('kind')!r}); a text encoder needs a captions dataset")
        if longest > context - 1:
            raise ModelError(f"{where}: {context} positions hold captions of up to {context - 1} characters, but "
                             f"datasets.{manifest.get('name')} has one of {longest}; raise {where} to at least "
                             f"{longest + 1} (or lower caption_validation.max_chars)")
        return cls(manifest["vocab"], context)

    @property
    def start_id(self) -> int:
        return len(self.vocab) + 1

    @property
    def pad_id(self) -> int:
        return len(self.vocab) + 2

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 3

    @property
    def max_chars(self) -> int:
        return self.context - 1

    def encode_prompt(self, text: str, *, required: bool = False) -> np.ndarray:
        """[start] + one id per character (int64). The empty prompt is [start], the null condition;
        with ``required=True`` it is refused. Unknown characters and prompts longer than
        ``max_chars`` are refused with one line (UnknownCharactersError, PromptError)."""
        if required and not text.strip():
            raise PromptError("prompt: empty; give a caption to condition on (the empty prompt is the null "
                              "condition, used only for guidance)")
        unknown = self.unknown_chars(text)
        if unknown:
            shown = ", ".join(repr(c) for c in list(unknown)[:10])
            known = self.vocab if len(self.vocab) <= 60 else self.vocab[:60] + "..."
            raise UnknownCharactersError(f"prompt: {sum(unknown.values())} character(s) the text encoder does not "
                                         f"know: {shown}; use only the characters of its captions: {known!r}")
        if len(text) > self.max_chars:
            raise PromptError(f"prompt: {len(text)} characters, longer than the text encoder's context of "
                              f"{self.max_chars}; shorten it")
        return np.concatenate([np.array([self.start_id], dtype=np.int64), self.encode(text)])

    def batch(self, prompts: list[str], length: int | None = None, *,
              required: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids (B, L) int64, mask (B, L) bool, True at real positions) of prompts padded to L: the
        longest prompt's length + 1, or ``length`` (at most ``context``) for a fixed shape."""
        rows = [self.encode_prompt(p, required=required) for p in prompts]
        longest = max((len(r) for r in rows), default=1)
        L = longest if length is None else int(length)
        if not longest <= L <= self.context:
            raise PromptError(f"length: {L}, expected {longest}..{self.context} (the longest prompt + 1 .. context)")
        ids = np.full((len(rows), L), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return ids, ids != self.pad_id


# ---------------------------------------------------------------------------
# Image tokens (the pixel GPT and the prompt-to-pixels encoder-decoder)
# ---------------------------------------------------------------------------
#
# An image of C channels (1 grey, 3 colour) is H*W*C tokens in raster order, each pixel's C values
# consecutive (R, G, B of pixel 0, then of pixel 1, ...); a token is the value 0..levels-1 itself
# (levels per channel), so a grey image's tokens are its pixels in raster order, as they always were.
# Images are (N, H, W) for C == 1 and (N, H, W, C) for C == 3 (channels last, the data's layout):
# flattening that row-major is exactly this order.

def image_token_count(image_size: int, channels: int = 1) -> int:
    """Tokens of one image: image_size^2 pixels x channels values."""
    return int(image_size) * int(image_size) * int(channels)


def image_tokens(x: np.ndarray) -> np.ndarray:
    """(N, H*W*C) int64 tokens of images x (N, H, W) or (N, H, W, C) of levels 0..levels-1."""
    x = np.asarray(x)
    if x.ndim not in (3, 4):
        raise ModelError(f"images: shape {x.shape}, expected (N, H, W) or (N, H, W, C)")
    return x.reshape(len(x), -1).astype(np.int64)


def tokens_to_images(tokens: np.ndarray, image_size: int, channels: int = 1) -> np.ndarray:
    """Images from tokens (N, H*W*C): (N, H, W) for one channel, (N, H, W, C) otherwise (same dtype)."""
    tokens = np.asarray(tokens)
    want = image_token_count(image_size, channels)
    if tokens.ndim != 2 or tokens.shape[1] != want:
        raise ModelError(f"tokens: shape {tokens.shape}, expected (N, {want}) for {image_size}x{image_size}x"
                         f"{channels} images")
    shape = (image_size, image_size) if int(channels) == 1 else (image_size, image_size, int(channels))
    return tokens.reshape(len(tokens), *shape)


def tokens_to_nchw(tokens: np.ndarray, image_size: int, channels: int = 1) -> np.ndarray:
    """Levels (N, C, H, W) from tokens (N, H*W*C): the layout the onnxruntime engines return."""
    x = tokens_to_images(tokens, image_size, channels)
    return x[:, None] if int(channels) == 1 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
