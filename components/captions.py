"""Captions of digit images: properties measured from the pixels, the words for them, phrasings.

A caption says what the label cannot: how much ink a digit has, how it slants, how wide it is.
Each property is measured from the pixels alone (`measure`), cut into three buckets at the
dataset's own terciles (`tercile_thresholds`, `buckets`), and named with a word ("thin", "thick";
"left-slanted", "upright", "right-slanted"; "narrow", "wide"; the middle bucket of ink and width
is not named). `compose` writes several phrasings per image, deterministic for (seed, index):

    props = measure(images, levels=17)                 # {"ink": (N,), "slant": (N,), "width": (N,)}
    cuts = tercile_thresholds(props)                   # {"ink": [lo, hi], ...}
    compose(7, buckets(props, cuts, 7), seed=0, index=7, phrasings=3)   # image 7 of the digits:
    # ['a wide, thin, right-slanted seven', 'a handwritten seven that is thin, wide and right-slanted',
    #  'seven, right-slanted, wide']
    parse_caption("a thick, right-slanted seven")     # {"digit": 7, "ink": 2, "slant": 2, "width": None}

`measure` is the one definition of the properties: the prepared data saves its values beside each
caption, and a metric of a generated image's adherence to its prompt measures the image the same way.
Only numpy: the torch-free sampling side can import it.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROPERTIES = ("ink", "slant", "width")
# bucket 0 / 1 / 2 of each property (below the first tercile, between, above the second);
# "medium" is recorded but never written: a caption names a middle ink or width by not naming it
BUCKET_WORDS = {"ink": ("thin", "medium", "thick"),
                "slant": ("left-slanted", "upright", "right-slanted"),
                "width": ("narrow", "medium", "wide")}
UNSAID = "medium"
ADJECTIVE_ORDER = ("width", "ink", "slant")   # "a wide, thick, upright seven"
TEMPLATES = ("{a} {adjs} {digit}", "the digit {digit}, {adjs_and}", "{digit}, {adjs}",
             "a handwritten {digit} that is {adjs_and}", "{adjs} {digit}")


def measure(images: np.ndarray, levels: int) -> dict[str, np.ndarray]:
    """Properties of images (N, H, W) grey or (N, H, W, 3) RGB (the channel mean), or one (H, W) grey,
    values 0..levels-1, from their moments.

    ink    mean intensity in 0..1 (the share of the image covered by ink, weighted by darkness)
    slant  -mu11 / mu02: columns moved right per row up (> 0 leans right, < 0 leans left)
    width  2 x the ink's standard deviation along x, as a share of the image width
    An image without ink has 0 for each.
    """
    x = np.asarray(images, dtype=np.float64)
    one = x.ndim == 2
    x = x[None] if one else x                                  # (N, H, W) or (N, H, W, 3)
    if x.ndim == 4:                                            # RGB: the moments of the channel mean
        x = x.mean(axis=-1)
    x = x / float(levels - 1)
    N, H, W = x.shape
    mass = x.sum(axis=(1, 2))                                  # (N,)
    safe = np.where(mass > 0, mass, 1.0)
    rows = np.arange(H, dtype=np.float64)[None, :, None]      # y grows downwards
    cols = np.arange(W, dtype=np.float64)[None, None, :]
    cy = (x * rows).sum(axis=(1, 2)) / safe
    cx = (x * cols).sum(axis=(1, 2)) / safe
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
    mu20 = (x * dx * dx).sum(axis=(1, 2)) / safe
    mu02 = (x * dy * dy).sum(axis=(1, 2)) / safe
    mu11 = (x * dx * dy).sum(axis=(1, 2)) / safe
    out = {"ink": mass / (H * W),
           "slant": np.where(mu02 > 0, -mu11 / np.where(mu02 > 0, mu02, 1.0), 0.0),
           "width": 2.0 * np.sqrt(mu20) / W}
    out = {k: np.where(mass > 0, v, 0.0) for k, v in out.items()}
    return {k: v[0] for k, v in out.items()} if one else out


def tercile_thresholds(props: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """{property: [first tercile, second tercile]} of measured properties (the dataset's own cuts)."""
    return {k: [float(q) for q in np.quantile(np.asarray(props[k], dtype=np.float64), [1 / 3, 2 / 3])]
            for k in PROPERTIES}


def bucket(value: float, cuts: list[float]) -> int:
    """0 at or below the first cut, 2 above the second, else 1."""
    return int(value > cuts[0]) + int(value > cuts[1])


def buckets(props: dict[str, np.ndarray], cuts: dict[str, list[float]], i: Optional[int] = None) -> dict[str, int]:
    """{property: bucket} of image i of `props` (or of scalar properties when i is None)."""
    return {k: bucket(float(props[k] if i is None else props[k][i]), cuts[k]) for k in PROPERTIES}


def bucket_words(b: dict[str, int]) -> dict[str, str]:
    """{property: word} of buckets, the unsaid middle included ("medium")."""
    return {k: BUCKET_WORDS[k][b[k]] for k in PROPERTIES}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiu" else "a"   # an eight, an upright one; a one


def _adjectives(words: list[str], joiner: str) -> str:
    if joiner == "and" and len(words) > 1:
        return ", ".join(words[:-1]) + " and " + words[-1]
    return ", ".join(words)


def phrase(digit: str, words: list[str], template: str) -> str:
    """One caption: `template` (one of TEMPLATES) filled with the digit word and adjectives."""
    if not words:
        return f"{_article(digit)} {digit}" if template.startswith("{a}") else f"the digit {digit}"
    adjs = _adjectives(words, ",")
    return template.format(a=_article(adjs), adjs=adjs, adjs_and=_adjectives(words, "and"), digit=digit)


def compose(label: int, b: dict[str, int], *, seed: int, index: int, phrasings: int) -> list[str]:
    """`phrasings` captions of image `index` (label 0..9, buckets b), deterministic for (seed, index).

    The first names every said property in a fixed order ("a wide, thick, upright seven"); the
    others a random non-empty subset in a random order and template. All name the digit."""
    digit = DIGIT_WORDS[label]
    said = [BUCKET_WORDS[k][b[k]] for k in ADJECTIVE_ORDER if BUCKET_WORDS[k][b[k]] != UNSAID]
    out = [phrase(digit, said, TEMPLATES[0])]
    rng = np.random.default_rng([seed, index])
    for _ in range(phrasings - 1):
        for _attempt in range(8):   # a few draws for a phrasing not given yet (few words: repeats are fine)
            n = int(rng.integers(1, len(said) + 1)) if said else 0
            words = [said[j] for j in rng.permutation(len(said))[:n]]
            text = phrase(digit, words, TEMPLATES[int(rng.integers(len(TEMPLATES)))])
            if text not in out:
                break
        out.append(text)
    return out


_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")
_LOOKUP = {w: (k, i) for k, ws in BUCKET_WORDS.items() for i, w in enumerate(ws) if w != UNSAID}


def parse_caption(text: str) -> dict[str, Optional[int]]:
    """What a caption asks for: {"digit": 0..9, "ink": bucket, "slant": bucket, "width": bucket},
    None where it says nothing (the last word of each kind wins)."""
    out: dict[str, Optional[int]] = {"digit": None, **{k: None for k in PROPERTIES}}
    for w in _WORD.findall(text.lower()):
        if w in DIGIT_WORDS:
            out["digit"] = DIGIT_WORDS.index(w)
        elif w in _LOOKUP:
            k, i = _LOOKUP[w]
            out[k] = i
    return out


def caption_records(images: np.ndarray, labels: np.ndarray, levels: int, *, seed: int,
                    phrasings: int) -> tuple[list[dict], dict[str, list[float]]]:
    """One record per image ({"index", "label", "texts", "ink", "slant", "width", "words"}) and
    the tercile cuts they were bucketed by."""
    props = measure(images, levels)
    cuts = tercile_thresholds(props)
    records = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        b = buckets(props, cuts, i)
        records.append({"index": i, "label": int(label),
                        "texts": compose(int(label), b, seed=seed, index=i, phrasings=phrasings),
                        **{k: float(props[k][i]) for k in PROPERTIES}, "words": bucket_words(b)})
    return records, cuts
