"""A small prepared colour dataset for the colour tests of the image models: (N, 16, 16, 3) images.

    root = make_colour_dataset(tmp_path, "colours")                 # 3 classes x 40 images, 16 levels
    root = make_colour_dataset(tmp_path, "blobs", labelled=False)   # one class, manifest "labelled": false
    root = make_colour_dataset(tmp_path, "colour-captions", captions=True)   # + captions ({split}.jsonl)

Each class is a distinct colour and shape on a dark background (red square, green disc, blue bar),
jittered in position and brightness per image, so a classifier has signal. The files are those the
data layer's `prepare` writes for an image dataset (data/prepared/<name>/{train,val,test}.npz with x
uint8 (N, H, W, C) in 0..levels-1 and y, plus manifest.json with "channels": 3).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE, LEVELS = 16, 16
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.2), "blue": (0.15, 0.2, 1.0)}
CAPTION_WORDS = {"red": "a red square", "green": "a green disc", "blue": "a blue bar"}
SPLIT_SHARES = (("train", 0.6), ("val", 0.2), ("test", 0.2))


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
    """Write data/prepared/<name>/ under root (see the module doc); returns root. channels=1: the same
    images in grey (N, H, W), the channels' mean."""
    root = Path(root)
    classes = tuple(COLOURS) if labelled else ("red",)
    x, y = colour_images(per_class, classes=classes, seed=seed)
    if channels == 1:
        x = np.rint(x.mean(axis=-1)).astype(np.uint8)
    order = np.random.default_rng(seed + 1).permutation(len(y))
    x, y = x[order], y[order]
    out = root / "data" / "prepared" / name
    out.mkdir(parents=True, exist_ok=True)
    at, counts = 0, {}
    texts_all = []
    for split, share in SPLIT_SHARES:
        n = int(round(len(y) * share)) if split != "test" else len(y) - at
        xs, ys = x[at:at + n], y[at:at + n]
        np.savez(out / f"{split}.npz", x=xs, y=ys)
        counts[split] = int(n)
        if captions:
            lines = []
            for i, label in enumerate(ys):
                word = CAPTION_WORDS[classes[label]]
                texts = [word, f"{word}, bright", f"{word} on black"]
                texts_all += texts
                lines.append(json.dumps({"file": f"{split}-{i}.png", "label": int(label), "texts": texts}))
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        at += n
    manifest = {"name": name, "kind": "captions" if captions else "image", "counts": counts,
                "image_size": SIZE, "levels": LEVELS, "channels": channels, "classes": list(classes),
                "labelled": labelled, "files": {f"{s}.npz": f"{name}-{s}-{seed}" for s, _ in SPLIT_SHARES}}
    if captions:
        manifest.update(vocab="".join(sorted(set("".join(texts_all)))),
                        max_caption_chars=max(len(t) for t in texts_all), caption_thresholds=None)
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root
