"""Synthetic colour (RGB) images for the tests of the colour paths: arrays, PNG folders, prepared datasets.

    x, y = colour_arrays(40, size=8)                                 # (120, 8, 8, 3) uint8 in 0..15, labels
    folder = make_colour_imagefolder(tmp_path / "photos", per_class=12, size=48)   # <class>/img_<i>.png
    folder = make_colour_imagefolder(tmp_path / "flat", labelled=False)            # <class>_<i>.png, no folders
    root = make_colour_dataset(tmp_path, "colours")                  # 3 classes x 40 images, 16x16, 16 levels
    root = make_colour_dataset(tmp_path, "blobs", labelled=False)    # red only, manifest "labelled": false
    root = make_colour_dataset(tmp_path, "colour-captions", captions=True)   # + captions ({split}.jsonl)
    root = make_colour_dataset(tmp_path, "shapes-rgb", size=8)       # 8x8

Each class is a distinct colour and shape on a dark noisy background (red square, green disc, blue
bar), jittered in position and brightness per image, so a classifier has signal. A folder's PNGs are
0..255 (the `levels` levels scaled, the top level white); captions (metadata.jsonl beside them) are
CAPTION_WORDS' phrase of the class ("a red square") three ways, or what a `captions` function gives.
make_colour_dataset ingests and prepares a folder through the data layer (components/data.py), which
gives x uint8 (N, size, size, 3) in 0..levels-1 and a manifest with "channels": 3 ("labelled": false
without class folders).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

SIZE, LEVELS = 16, 16
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.2), "blue": (0.15, 0.2, 1.0)}
SHAPES = {"red": "square", "green": "disc", "blue": "bar"}
CAPTION_WORDS = {"red": "a red square", "green": "a green disc", "blue": "a blue bar"}


def colour_arrays(per_class: int = 40, size: int = SIZE, levels: int = LEVELS, classes=tuple(COLOURS),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, size, size, 3) uint8 in 0..levels-1, y (N,) int64 the index in classes): per_class images of
    each class in turn, its SHAPES shape in its COLOURS colour."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    xs, ys = [], []
    for k, name in enumerate(classes):
        for _ in range(per_class):
            cy, cx = rng.integers(size // 4, size - size // 4, 2)
            r = size // 4
            if SHAPES[name] == "square":
                shape = (abs(rows - cy) <= r // 1.5) & (abs(cols - cx) <= r // 1.5)
            elif SHAPES[name] == "disc":
                shape = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
            else:
                shape = (abs(rows - cy) <= 1) & (abs(cols - cx) <= r + 2)
            colour = np.array(COLOURS[name]) * rng.uniform(0.7, 1.0)
            img = np.full((size, size, 3), 0.05) + rng.uniform(0, 0.05, (size, size, 3))
            img[shape] = colour
            xs.append(np.rint(np.clip(img, 0, 1) * (levels - 1)).astype(np.uint8))
            ys.append(k)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def captions_of(name: str) -> list[str]:
    """The captions of one image of class `name`: its CAPTION_WORDS phrase, plain, bright and on black."""
    word = CAPTION_WORDS[name]
    return [word, f"{word}, bright", f"{word} on black"]


def make_colour_imagefolder(folder: Path, per_class: int = 30, size: int = 32, *, levels: int = 256, seed: int = 0,
                            classes: tuple[str, ...] = tuple(COLOURS), labelled: bool = True, channels: int = 3,
                            captions: Union[bool, Callable[[str], list[str]]] = False) -> Path:
    """colour_arrays(per_class, size, levels, classes, seed) as PNGs: <folder>/<class>/img_<i>.png, or
    <folder>/<class>_<i>.png when not labelled (i counts over all images). RGB, or grey for channels=1
    (the channels' mean). With captions a metadata.jsonl beside them, a line per caption: captions_of
    the class, or captions(class) when a function is given. Returns folder."""
    from PIL import Image

    folder = Path(folder)
    x, y = colour_arrays(per_class, size, levels, classes, seed)
    if channels == 1:
        x = np.rint(x.mean(axis=-1)).astype(np.uint8)
    texts_of = captions if callable(captions) else captions_of
    meta = []
    for i, (img, label) in enumerate(zip(x, y)):
        name = classes[label]
        rel = f"{name}/img_{i}.png" if labelled else f"{name}_{i}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img * (255 / (levels - 1))).astype(np.uint8)).save(folder / rel)
        if captions:
            meta += [{"file_name": rel, "text": t} for t in texts_of(name)]
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta), encoding="utf-8")
    return folder


def make_colour_dataset(root: Path, name: str = "colours", *, per_class: int = 40, size: int = SIZE,
                        levels: int = LEVELS, labelled: bool = True, captions: bool = False, channels: int = 3,
                        classes: Optional[tuple[str, ...]] = None, seed: int = 0) -> Path:
    """make_colour_imagefolder(root/tmp/<name>, ...) at `size` on `levels` levels (classes: every
    colour, or only red when not labelled), ingested and prepared by the data layer as
    imagefolder:<folder> with image_size `size`, `levels`, `channels` (kind captions with captions);
    returns root."""
    from components import data
    from components.config import DatasetConfig

    root = Path(root)
    if classes is None:
        classes = tuple(COLOURS) if labelled else ("red",)
    folder = make_colour_imagefolder(root / "tmp" / name, per_class, size, levels=levels, seed=seed,
                                     classes=classes, labelled=labelled, channels=channels, captions=captions)
    cfg = DatasetConfig(source=f"imagefolder:{folder}", kind="captions" if captions else "image", image_size=size,
                        levels=levels, channels=channels)
    data.ingest(name, cfg, root)
    data.prepare(name, cfg, root)
    return root
