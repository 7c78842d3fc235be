"""A small synthetic colour (RGB) image dataset for the tests of the colour paths.

    root = colour_images(tmp, "shapes-rgb")                          # kind image, 3 classes
    root = colour_images(tmp, "shapes-rgb1", labelled=False)         # unlabelled: one class
    root = colour_images(tmp, "shapes-cap", kind="captions")          # captioned: "a red square", ...

Each class is a distinct colour and shape on a dark background (red square top left, green disc in
the middle, blue bar at the bottom), shifted by up to a pixel and with +-1 level of noise, so the
images differ and a model has something to learn. Images are 8x8x3 on `levels` levels per channel.

When the data layer reads colour image folders (DatasetConfig has `channels`), the images are
written as 16x16 PNGs into <root>/tmp/<name>/<class>/ and ingested and prepared by it
(source imagefolder:<folder>, channels 3); before that the prepared split files and manifest are
written directly, in the layout components.data.load_images and load_manifest read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASSES = ("blue", "green", "red")            # sorted, as an image folder's class folders are
SHAPES = {"red": "square", "green": "disc", "blue": "bar"}
SPLIT_SHARES = (0.7, 0.15, 0.15)


def colour_arrays(per_class: int = 40, size: int = 8, levels: int = 16, seed: int = 0,
                  classes: tuple[str, ...] = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, size, size, 3) uint8 in 0..levels-1, y (N,) int64)."""
    rng = np.random.default_rng(seed)
    top = levels - 1
    colour = {"red": (top, 2, 2), "green": (2, top, 3), "blue": (2, 3, top)}
    rows, cols = np.mgrid[:size, :size]
    xs, ys = [], []
    for c, name in enumerate(classes):
        for _ in range(per_class):
            dy, dx = rng.integers(0, 2, 2)
            if SHAPES[name] == "square":
                shape = (rows >= 1 + dy) & (rows < 4 + dy) & (cols >= 1 + dx) & (cols < 4 + dx)
            elif SHAPES[name] == "disc":
                shape = (rows - size / 2 + 0.5 - dy) ** 2 + (cols - size / 2 + 0.5 - dx) ** 2 <= (size / 4) ** 2
            else:
                shape = (rows >= size - 3 + dy - 1) & (rows < size - 1 + dy - 1)
            img = np.where(shape[..., None], np.array(colour[name]), np.array((1, 1, 2)))
            img = np.clip(img + rng.integers(-1, 2, img.shape), 0, top)
            xs.append(img.astype(np.uint8))
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def captions_of(name: str) -> list[str]:
    return [f"a {name} {SHAPES[name]}", f"{SHAPES[name]} in {name}"]


def _data_layer_reads_colour() -> bool:
    from components.config import DatasetConfig

    return "channels" in DatasetConfig.__dataclass_fields__


def colour_images(root: Path, name: str, *, kind: str = "image", labelled: bool = True, levels: int = 16,
                  per_class: int = 40) -> Path:
    """A prepared colour dataset `name` under root (see the module docstring); returns root."""
    root = Path(root)
    if (root / "data" / "prepared" / name / "manifest.json").exists():
        return root
    classes = CLASSES if labelled else ("red",)
    x, y = colour_arrays(per_class, 8, levels, classes=classes)
    if labelled and _data_layer_reads_colour():
        return _through_the_data_layer(root, name, kind, x, y, classes, levels)
    return _prepared_directly(root, name, kind, x, y, classes, levels, labelled)


def _through_the_data_layer(root, name, kind, x, y, classes, levels) -> Path:
    from PIL import Image

    from components import data
    from components.config import DatasetConfig

    folder = root / "tmp" / name
    meta = []
    for i, (img, c) in enumerate(zip(x, y)):
        rgb = (img.astype(np.float64) * (255.0 / (levels - 1))).round().astype(np.uint8)
        rgb = rgb.repeat(2, axis=0).repeat(2, axis=1)                     # 16x16: resized back to 8x8
        path = folder / classes[c] / f"img_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        meta.append({"file_name": f"{classes[c]}/img_{i}.png", "text": captions_of(classes[c])[i % 2]})
    if kind == "captions":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    cfg = DatasetConfig(source=f"imagefolder:{folder}", kind=kind, image_size=8, levels=levels, channels=3)
    data.ingest(name, cfg, root)
    data.prepare(name, cfg, root)
    return root


def _prepared_directly(root, name, kind, x, y, classes, levels, labelled) -> Path:
    rng = np.random.default_rng(1)
    split = {"train": [], "val": [], "test": []}
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val, n_test = round(len(idx) * SPLIT_SHARES[1]), round(len(idx) * SPLIT_SHARES[2])
        split["val"] += idx[:n_val].tolist()
        split["test"] += idx[n_val:n_val + n_test].tolist()
        split["train"] += idx[n_val + n_test:].tolist()
    out = root / "data" / "prepared" / name
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for s, idx in split.items():
        np.savez(out / f"{s}.npz", x=x[idx], y=y[idx])
        texts[s] = [captions_of(classes[int(y[i])]) for i in idx]
        if kind == "captions":
            lines = [json.dumps({"file": f"{s}-{k}.png", "label": int(y[i]), "texts": t})
                     for k, (i, t) in enumerate(zip(idx, texts[s]))]
            (out / f"{s}.jsonl").write_text("".join(line + "\n" for line in lines))
    manifest = {"name": name, "kind": kind, "source": f"imagefolder:tmp/{name}", "image_size": 8, "levels": levels,
                "channels": 3, "labelled": labelled, "classes": list(classes),
                "counts": {s: len(i) for s, i in split.items()}, "files": {}}
    if kind == "captions":
        all_texts = [t for ts in texts["train"] for t in ts]
        manifest.update(vocab="".join(sorted(set("".join(all_texts)))),
                        max_caption_chars=max(len(t) for s in texts.values() for ts in s for t in ts),
                        caption_thresholds=None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return root
