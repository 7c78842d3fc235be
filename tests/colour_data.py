"""A small prepared colour dataset for the colour tests of the image models: (N, 16, 16, 3) images.

    root = make_colour_dataset(tmp_path, "colours")                 # 3 classes x 40 images, 16 levels
    root = make_colour_dataset(tmp_path, "blobs", labelled=False)   # one class, manifest "labelled": false
    root = make_colour_dataset(tmp_path, "colour-captions", captions=True)   # + captions ({split}.jsonl)

Each class is a distinct colour and shape on a dark background (red square, green disc, blue bar),
jittered in position and brightness per image, so a classifier has signal. They are written as
PNGs and ingested and prepared by the data layer (components/data.py), which gives x uint8
(N, 16, 16, 3) in 0..15 and a manifest with "channels": 3 ("labelled": false without class folders).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE, LEVELS = 16, 16
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.2), "blue": (0.15, 0.2, 1.0)}
CAPTION_WORDS = {"red": "a red square", "green": "a green disc", "blue": "a blue bar"}


def colour_images(per_class: int = 40, size: int = SIZE, levels: int = LEVELS, classes=tuple(COLOURS),
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, size, size, 3) uint8 in 0..levels-1, y (N,) int64): per_class images of each class."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    xs, ys = [], []
    for k, name in enumerate(classes):
        for _ in range(per_class):
            cy, cx = rng.integers(size // 4, size - size // 4, 2)
            r = size // 4
            if k % 3 == 0:
                shape = (abs(rows - cy) <= r // 1.5) & (abs(cols - cx) <= r // 1.5)
            elif k % 3 == 1:
                shape = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
            else:
                shape = (abs(rows - cy) <= 1) & (abs(cols - cx) <= r + 2)
            colour = np.array(COLOURS[name]) * rng.uniform(0.7, 1.0)
            img = np.full((size, size, 3), 0.05) + rng.uniform(0, 0.05, (size, size, 3))
            img[shape] = colour
            xs.append(np.rint(np.clip(img, 0, 1) * (levels - 1)).astype(np.uint8))
            ys.append(k)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def make_colour_dataset(root: Path, name: str = "colours", *, per_class: int = 40, labelled: bool = True,
                        captions: bool = False, channels: int = 3, seed: int = 0) -> Path:
    """PNGs (RGB, or grey for channels=1: the channels' mean) in root/tmp/<name>/<class>/ (straight in
    root/tmp/<name>/ when not labelled; a metadata.jsonl beside them for captions), ingested and
    prepared by the data layer as imagefolder:<folder> with image_size 16, levels 16; returns root."""
    from PIL import Image

    from components import data
    from components.config import DatasetConfig

    root = Path(root)
    classes = tuple(COLOURS) if labelled else ("red",)
    x, y = colour_images(per_class, classes=classes, seed=seed)
    if channels == 1:
        x = np.rint(x.mean(axis=-1)).astype(np.uint8)
    folder = root / "tmp" / name
    meta = []
    for i, (img, label) in enumerate(zip(x, y)):
        rel = f"{classes[label]}/img_{i}.png" if labelled else f"img_{i}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img * (255 / (LEVELS - 1))).astype(np.uint8)).save(folder / rel)
        word = CAPTION_WORDS[classes[label]]
        meta += [{"file_name": rel, "text": t} for t in (word, f"{word}, bright", f"{word} on black")]
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta), encoding="utf-8")
    cfg = DatasetConfig(source=f"imagefolder:{folder}", kind="captions" if captions else "image", image_size=SIZE,
                        levels=LEVELS, channels=channels)
    data.ingest(name, cfg, root)
    data.prepare(name, cfg, root)
    return root
