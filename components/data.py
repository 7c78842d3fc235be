"""Data sources -> data/raw/<name>/ snapshot -> data/prepared/<name>/ splits.

Sources (params.yaml ``datasets.<name>.source``):

    builtin:digits     scikit-learn's 8x8 digits: 1797 images, 10 classes, grey levels 0..16 (no network)
    builtin:pydoc      docstrings of the Python standard library's modules, classes and functions
    builtin:pydoc-pairs  one (source, target) pair per public standard-library function or method:
                       source = qualified name + signature, target = its docstring's first sentence
    builtin:digits-captions  the digits, each with captions composed from its label and properties
                       measured from its pixels (ink, slant, width; components/captions.py); kind captions
    imagefolder:PATH   one sub-folder per class (folder name = class name) holding PNG or JPEG files;
                       with kind captions: images anywhere under PATH and a metadata.jsonl
                       ({"file_name": ..., "text": ...} per line) or metadata.csv (columns file_name,
                       text) naming each image's caption (Hugging Face's imagefolder convention)
    textfile:PATH      a UTF-8 file (documents separated by blank lines; without blank lines, one
                       document) or a folder of .txt files (one document per file); see textsource
    pairs:PATH         a JSONL file ({"source": ..., "target": ...} per line, optional "group") or a
                       two-column TSV (source<TAB>target); kind pairs

Stages (every function takes the project ``root``; paths below are relative to it):

    ingest(name, cfg, root)   data/raw/<name>/       byte copy of the source files (images.npz or docs.jsonl
                                                      for builtins) + snapshot.json (its layout)
    prepare(name, cfg, root)  data/prepared/<name>/  deterministic train/val/test files + manifest.json

Prepared-data API used by the other components: ``load_manifest``, ``load_images``, ``load_text``,
``load_pairs``, ``load_captions``.
Both stages build their folder beside the target and swap it in only when complete, so a failure
leaves data/raw and data/prepared as they were.
An imagefolder is streamed: ingest copies one file at a time, decoding fills one preallocated
(N, S, S) uint8 array one file at a time (`decode_images`; everything done to one file is in
`_decode_image`), and save_npz streams each array into its zip entry; long loops print a progress line.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from components.captions import PROPERTIES, caption_records, measure
from components.config import DatasetConfig, SplitConfig
from components.errors import DataError
from components.files import replaced_dir, write_json
from components.layout import Layout
from components.progress import Progress
from components.stdlib_docs import first_sentence, harvest_pydoc, harvest_pydoc_pairs  # noqa: F401
from components.textsource import decode_text, documents_fill_splits, split_by_characters

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
DIGITS_LEVELS = 17         # scikit-learn's digits hold grey levels 0..16
MAX_ASPECT = 1.1            # imagefolder: longer side / shorter side; beyond this an image is refused
SNAPSHOT = "snapshot.json"  # written by ingest into data/raw/<name>/: how the snapshot is laid out
PAIRS_FILE = "pairs.jsonl"  # builtin:pydoc-pairs snapshot ({"group", "source", "target"} per line)
# builtin:pydoc-pairs keeps pairs up to these lengths (fixed, so the snapshot depends on the Python
# version only; ~88% of the harvest): its pair_validation bounds must be at least these
PYDOC_PAIRS_MAX_SOURCE, PYDOC_PAIRS_MAX_TARGET = 80, 96
CAPTIONS_FILE = "captions.jsonl"    # builtin:digits-captions snapshot: line i holds image i's captions
METADATA_FILES = ("metadata.jsonl", "metadata.csv")   # a captioned imagefolder's captions (one of them)


# DataError (components.errors) is the error of this module: a dataset that cannot be read or prepared.


# ---------------------------------------------------------------------------
# Paths and small file helpers
# ---------------------------------------------------------------------------

def raw_dir(name: str, root: str | Path = ".") -> Path:
    return Layout(root).raw_dir(name)


def prepared_dir(name: str, root: str | Path = ".") -> Path:
    return Layout(root).prepared_dir(name)


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_md5s(folder: Path) -> dict[str, str]:
    """{relative posix path: md5} of every file under folder, sorted by path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): file_md5(p) for p in files}


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez with fixed zip timestamps, so the same arrays always give the same bytes (DVC hashes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            # streamed into the zip entry (no in-memory copy of the array's bytes); the entry's header
            # is rewritten with its sizes at the end, so the bytes are those of writestr
            with zf.open(info, "w", force_zip64=(arr.nbytes + 4096) * 1.05 > zipfile.ZIP64_LIMIT) as entry:
                np.lib.format.write_array(entry, arr, allow_pickle=False)


def display_path(path: Path, root: str | Path) -> str:
    """Path as users see it in messages: relative to root (data/raw/shapes/circle/img_3.png)."""
    try:
        return Path(path).relative_to(Path(root)).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------

BUILTINS = {"digits": "image", "pydoc": "text", "pydoc-pairs": "pairs", "digits-captions": "captions"}
SOURCE_KINDS = {"imagefolder": "image", "textfile": "text", "pairs": "pairs"}
PAIR_SUFFIXES = {".jsonl": "jsonl", ".tsv": "tsv"}


def parse_source(name: str, cfg: DatasetConfig, root: str | Path = ".") -> tuple[str, str | Path]:
    """('builtin', 'digits') | ('imagefolder', Path) | ('textfile', Path); checks kind and existence."""
    where = f"datasets.{name}.source"
    kind, _, value = cfg.source.partition(":")
    if kind == "builtin":
        if value not in BUILTINS:
            raise DataError(f"{where}: unknown builtin {value!r}; known: "
                            + ", ".join(f"builtin:{b}" for b in BUILTINS))
        want = BUILTINS[value]
    elif kind in SOURCE_KINDS:
        if not value:
            raise DataError(f"{where}: {cfg.source} names no path; use {kind}:PATH")
        want = SOURCE_KINDS[kind]
        if kind == "imagefolder" and cfg.kind == "captions":
            want = "captions"   # the same folder convention, with a metadata file of captions
    else:
        raise DataError(f"{where}: {cfg.source!r} is not one of builtin:digits, builtin:pydoc, "
                        "builtin:pydoc-pairs, builtin:digits-captions, imagefolder:PATH, textfile:PATH, pairs:PATH")
    if cfg.kind != want:
        raise DataError(f"datasets.{name}.kind: {cfg.kind}, but {cfg.source} holds {want} data; set kind: {want}")
    if kind == "builtin":
        return kind, value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(root) / path  # relative paths are relative to the project root, as in params.yaml
    if not path.exists():
        hint = {"imagefolder": "a folder with one sub-folder per class", "textfile":
                "a UTF-8 text file or a folder of .txt files", "pairs": "a .jsonl or .tsv file"}[kind]
        raise DataError(f"{where}: {cfg.source} does not exist; point it at {hint}")
    if kind == "pairs" and (not path.is_file() or path.suffix.lower() not in PAIR_SUFFIXES):
        raise DataError(f"{where}: {cfg.source} is not a .jsonl or .tsv file; pairs:PATH needs JSONL lines "
                        '{"source": ..., "target": ...} or two tab-separated columns')
    if kind == "imagefolder" and not path.is_dir():
        raise DataError(f"{where}: {cfg.source} is a file; imagefolder needs a folder with one sub-folder per class")
    if want == "captions":
        metadata_file(name, cfg, path)   # exactly one metadata file, or one line saying what to add
    return kind, path


def metadata_file(name: str, cfg: DatasetConfig, folder: Path) -> Path:
    """The metadata.jsonl or metadata.csv at the top of a captioned imagefolder (exactly one)."""
    found = [folder / m for m in METADATA_FILES if (folder / m).is_file()]
    if not found:
        raise DataError(f"datasets.{name}.source: {cfg.source} has no metadata.jsonl or metadata.csv; add one "
                        'naming each image\'s caption: a line {"file_name": "a.png", "text": "a thick seven"} '
                        "per image (or a CSV with columns file_name,text)")
    if len(found) > 1:
        raise DataError(f"datasets.{name}.source: {cfg.source} has both metadata.jsonl and metadata.csv; keep one")
    return found[0]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits (bundled with the package, no download): images (1797, 8, 8) uint8 in 0..16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.uint8)  # (N, 8, 8); values are whole numbers 0..16
    return images, d.target.astype(np.int64), [str(c) for c in d.target_names]


# ---------------------------------------------------------------------------
# Ingest: source -> data/raw/<name>/
# ---------------------------------------------------------------------------

def ingest(name: str, cfg: DatasetConfig, root: str | Path = ".") -> Path:
    """Snapshot the source into data/raw/<name>/ and return that folder.

    imagefolder and textfile sources are copied byte for byte (validation names these files);
    builtins become images.npz (images, labels, classes, levels) or docs.jsonl ({"id", "text"} per line).
    """
    kind, value = parse_source(name, cfg, root)
    target = raw_dir(name, root)
    extra: dict = {}
    with replaced_dir(target) as tmp:
        if kind == "builtin" and value == "digits":
            images, labels, classes = load_digits_arrays()
            save_npz(tmp / "images.npz", images=images, labels=labels, classes=np.array(classes),
                     levels=np.array(DIGITS_LEVELS))
            layout = "npz"
        elif kind == "builtin" and value == "pydoc":
            lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False, sort_keys=True)
                     for i, t in harvest_pydoc()]
            (tmp / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            layout = "jsonl"
        elif kind == "builtin" and value == "pydoc-pairs":
            lines = [json.dumps({"group": m, "source": s, "target": t}, ensure_ascii=False, sort_keys=True)
                     for m, s, t in harvest_pydoc_pairs()
                     if len(s) <= PYDOC_PAIRS_MAX_SOURCE and len(t) <= PYDOC_PAIRS_MAX_TARGET]
            (tmp / PAIRS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            layout = "pairs"
        elif kind == "builtin" and value == "digits-captions":
            images, labels, classes = load_digits_arrays()
            save_npz(tmp / "images.npz", images=images, labels=labels, classes=np.array(classes),
                     levels=np.array(DIGITS_LEVELS))
            records, cuts = caption_records(images, labels, DIGITS_LEVELS, seed=cfg.captions.seed,
                                            phrasings=cfg.captions.phrasings)
            lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
            (tmp / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            layout, extra = "captions-npz", {"thresholds": cuts}   # the tercile cuts the words were chosen by
        elif kind == "imagefolder" and cfg.kind == "captions":
            layout = "captions"
            _copy_captioned_folder(name, cfg, Path(value), tmp)
        elif kind == "pairs":
            layout = "pairs"
            if Path(value).name == SNAPSHOT:
                raise DataError(f"datasets.{name}.source: rename {value}; {SNAPSHOT} is reserved for the snapshot")
            shutil.copyfile(value, tmp / Path(value).name)
        elif kind == "imagefolder":
            layout = "imagefolder"
            _copy_imagefolder(name, cfg, Path(value), tmp)
        else:
            layout = _copy_textfile(name, cfg, Path(value), tmp)
        write_json(tmp / SNAPSHOT, {"layout": layout, **extra})
    return target


def _copy_imagefolder(name: str, cfg: DatasetConfig, src: Path, dst: Path) -> None:
    """Class sub-folders (one label each), or images straight in the folder: one unlabelled class."""
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    strays = sorted(p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if not class_dirs and not strays:
        raise DataError(f"datasets.{name}.source: {cfg.source} holds no images; put them in one sub-folder per "
                        f"class, e.g. {src / 'cat' / '0.png'}, or straight in the folder (one unlabelled class)")
    if not class_dirs:   # unlabelled: the images as they lie (sub-folders of none)
        _copy_files(name, lambda: (src / n for n in strays), src, dst)
        return
    if strays:
        raise DataError(f"datasets.{name}.source: {src / strays[0]} is not inside a class sub-folder; "
                        "move every image into the sub-folder named after its class")
    for class_dir in class_dirs:
        (dst / class_dir.name).mkdir()  # kept even when empty, so validation can name the empty class

    def images():   # one class folder's listing at a time, never the whole folder's
        for class_dir in class_dirs:
            yield from (f for f in sorted(class_dir.rglob("*"))
                        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))

    _copy_files(name, images, src, dst)


def _copy_files(name: str, files: Callable[[], Iterable[Path]], src: Path, dst: Path) -> None:
    """Copy each file that files() yields to the same place under dst, byte for byte, one at a time;
    files() runs twice (a count for the progress line on long copies, then the copy)."""
    progress = Progress(f"datasets.{name}: ingest copied", sum(1 for _ in files()), "files")
    for f in files():
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(f, out)
        except (PermissionError, IsADirectoryError) as e:   # other OSErrors (disk full) are not the file's fault
            raise DataError(f"datasets.{name}.source: {f} cannot be read ({e.strerror}); "
                            "make it readable or remove it from the folder") from None
        progress.step()
    progress.done()


def _copy_captioned_folder(name: str, cfg: DatasetConfig, src: Path, dst: Path) -> None:
    """The metadata file and every image under src (sub-folders kept), byte for byte."""
    meta = metadata_file(name, cfg, src)
    shutil.copyfile(meta, dst / meta.name)
    files = [f for f in sorted(src.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
             and not any(p.startswith(".") for p in f.relative_to(src).parts)]
    _copy_files(name, lambda: files, src, dst)


def _copy_textfile(name: str, cfg: DatasetConfig, src: Path, dst: Path) -> str:
    if src.is_file():
        if src.name == SNAPSHOT:
            raise DataError(f"datasets.{name}.source: rename {src}; {SNAPSHOT} is reserved for the snapshot")
        shutil.copyfile(src, dst / src.name)
        return "textfile"
    files = sorted(p for p in src.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"datasets.{name}.source: {cfg.source} holds no .txt files")
    _copy_files(name, lambda: files, src, dst)
    return "textfolder"


def snapshot_layout(name: str, root: str | Path = ".") -> str:
    """'npz' | 'jsonl' | 'imagefolder' | 'textfile' | 'textfolder' | 'pairs' (data/raw/<name>/snapshot.json)."""
    path = raw_dir(name, root) / SNAPSHOT
    if not path.exists():
        raise DataError(f"{display_path(raw_dir(name, root), root)}: no snapshot found; "
                        f"run `genflow stage ingest {name}` first")
    return json.loads(path.read_text())["layout"]


def dataset_fingerprint(name: str, root: str | Path = ".") -> str:
    """Hash of the raw snapshot's file hashes (lineage when no DVC hash is available)."""
    folder = raw_dir(name, root)
    snapshot_layout(name, root)  # refuses a missing snapshot with a clear message
    listing = "".join(f"{rel} {md5}\n" for rel, md5 in tree_md5s(folder).items())
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Reading a raw snapshot (decoded), shared by validation and prepare
# ---------------------------------------------------------------------------

@dataclass(slots=True)   # one per image of a folder: no per-object __dict__
class RawImage:
    file: str                      # as users see it: data/raw/shapes/circle/img_3.png or .../images.npz[17]
    label: int
    pixels: Optional[np.ndarray]   # (H, W) grey or (H, W, 3) RGB levels as stored (npz) or resized+quantised;
    #                                a view into RawImages.pixels, never a copy of its own
    size: Optional[tuple[int, int]]  # (width, height) of the stored image, before any resize
    error: Optional[str] = None    # why it could not be decoded
    colour: bool = False           # the file holds colour (RGB, palette, CMYK ...); grey datasets convert it


@dataclass
class RawImages:
    classes: list[str]
    class_paths: list[str]         # where each class lives, for messages
    items: list[RawImage]
    resized: bool                  # imagefolder: images are cropped to square and resized to image_size
    source_levels: int             # pixels hold 0..source_levels-1 before requantisation
    pixels: Optional[np.ndarray] = None   # (N, H, W) or (N, H, W, 3): every item's pixels (zeros where broken)
    labelled: bool = True          # False: a folder without class sub-folders, one class of every image

    @property
    def channels(self) -> int:
        return image_channels(self.pixels) if self.pixels is not None else 1


GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}   # Pillow modes without colour


def _decode_image(path: Path, image_size: int, levels: int, channels: int = 1) -> tuple:
    """Everything done to one image file: (pixels (S, S) or (S, S, 3) uint8 in 0..levels-1, (w, h), None,
    colour) or (None, size or None, error, colour). The EXIF orientation is applied first, so a rotated
    photo comes out upright and its size is the upright one. Colour files become grey with Pillow's
    ITU-R 601-2 luma (channels 1); grey files become RGB with three equal channels (channels 3)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    fmt = IMAGE_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        return None, None, f"empty file (0 bytes), not a {fmt}; replace it with the image or remove it", False
    try:
        with Image.open(path) as im:
            im.load()  # open() reads only the header; load() decodes (and finds truncation)
            colour = im.mode not in GREY_MODES
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        return None, None, f"corrupt {fmt} (cannot identify image file)", False
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError ... for broken files
        reason = str(e).replace(f" '{path}'", "").replace(str(path), "").strip() or type(e).__name__
        reason = reason.splitlines()[0]  # the message stays one line
        return None, None, f"corrupt {fmt} ({reason})", False
    return quantise_grey(square_resize(im, image_size), levels), im.size, None, colour


def square_resize(im, image_size: int, resample=None):
    """A PIL image centre-cropped to a square (a slightly oblong image is not distorted), then
    resized to image_size x image_size (LANCZOS unless `resample` says otherwise)."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    resample = Image.Resampling.LANCZOS if resample is None else resample
    return im.crop((left, top, left + side, top + side)).resize((image_size, image_size), resample)


def quantise_grey(im, levels: int) -> np.ndarray:
    """A 0..255 image (PIL or array, (H, W) or (H, W, C)) -> uint8 levels 0..levels-1 per channel, as the data
    holds them."""
    grey = np.asarray(im, dtype=np.float64)
    return np.rint(grey * (levels - 1) / 255.0).astype(np.uint8)


def file_channels(cfg: DatasetConfig, files: Iterable[Path]) -> int:
    """The channels a folder's images are decoded to: datasets.*.channels when set, else as the files
    are: 3 when colour files are at least half of them, 1 when grey ones are the majority (read from
    the file headers only; the minority is converted and counted in the manifest)."""
    if cfg.channels in (1, 3):
        return cfg.channels
    from PIL import Image

    colour = grey = 0
    for f in files:
        try:
            with Image.open(f) as im:   # the header only: no pixels are decoded
                if im.mode in GREY_MODES:
                    grey += 1
                else:
                    colour += 1
        except Exception:   # a broken file: decode_images names it
            continue
    return 3 if colour and colour >= grey else 1


def decode_images(name: str, files: list[Path], labels: list[int], cfg: DatasetConfig, root) -> RawImages:
    """Decode image files one at a time into one preallocated (N, S, S) (grey) or (N, S, S, 3) (RGB)
    uint8 array: memory is the array plus a small record per file, never a list of decoded images.
    Broken files keep their error (their rows stay zero). A progress line every few seconds on a
    long folder."""
    S, C = cfg.image_size, file_channels(cfg, files)
    pixels = np.zeros((len(files), S, S) if C == 1 else (len(files), S, S, C), dtype=np.uint8)
    items = []
    progress = Progress(f"datasets.{name}: decoded", len(files), "images")
    for i, (f, label) in enumerate(zip(files, labels)):
        px, size, error, colour = _decode_image(f, S, cfg.levels, C)
        if px is not None:
            pixels[i] = px
        items.append(RawImage(display_path(f, root), label, pixels[i] if px is not None else None, size, error, colour))
        progress.step()
    progress.done()
    return RawImages([], [], items, resized=True, source_levels=cfg.levels, pixels=pixels)


def image_files(folder: Path) -> tuple[list[Path], list[int], list[Path]]:
    """An imagefolder snapshot's image files (sorted by class folder, then path), their labels and
    the class folders (sorted; a class's label is its index). A snapshot without class folders is
    one unlabelled class: its images, label 0 each, and [] for the class folders."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return files, [0] * len(files), []
    files, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    return files, labels, class_dirs


def read_raw_images(name: str, cfg: DatasetConfig, root: str | Path = ".") -> RawImages:
    """Decode data/raw/<name>/ into one RawImage per image (broken files keep their error)."""
    folder = raw_dir(name, root)
    layout = snapshot_layout(name, root)
    if layout == "npz":
        return _read_npz_images(folder / "images.npz", name, cfg, root)
    if layout != "imagefolder":
        raise DataError(f"datasets.{name}: data/raw/{name} holds {layout} data, not images; "
                        f"run `genflow stage ingest {name}` again")
    files, labels, class_dirs = image_files(folder)
    raw = decode_images(name, files, labels, cfg, root)
    raw.classes, raw.class_paths = [d.name for d in class_dirs], [display_path(d, root) for d in class_dirs]
    if not class_dirs:   # one unlabelled class, named after the dataset
        raw.classes, raw.class_paths, raw.labelled = [name], [display_path(folder, root)], False
    return raw


def _read_npz_images(path: Path, name: str, cfg: DatasetConfig, root) -> RawImages:
    """A builtin's images.npz (images, labels, classes, levels) as RawImages."""
    where = display_path(path, root)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = np.asarray(z["images"]), np.asarray(z["labels"])
            classes = [str(c) for c in z["classes"]]
            levels = int(z["levels"]) if "levels" in z.files else cfg.levels
    except Exception as e:
        raise DataError(f"{where}: cannot read ({type(e).__name__}: {e}); "
                        f"run `genflow stage ingest {name}` again") from None
    if images.ndim != 3 or labels.shape != (len(images),):
        raise DataError(f"{where}: images must be (N, H, W) with one label each, "
                        f"got images {images.shape} and labels {labels.shape}")
    items = [RawImage(f"{where}[{i}]", int(labels[i]), images[i], (images.shape[2], images.shape[1]))
             for i in range(len(images))]
    return RawImages(classes, [where] * len(classes), items, resized=False, source_levels=levels, pixels=images)


def to_levels(pixels: np.ndarray, source_levels: int, levels: int) -> np.ndarray:
    """Pixels (any shape) as uint8 in 0..levels-1, as training will see them (requantised when
    source levels differ; NaN to 0, out-of-range values clipped)."""
    x = np.asarray(pixels, dtype=np.float64)
    if source_levels != levels:
        x = x * (levels - 1) / (source_levels - 1)
    return np.clip(np.rint(np.nan_to_num(x)), 0, levels - 1).astype(np.uint8)


def image_array(item: RawImage, raw: RawImages, levels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 in 0..levels-1 as training will see it (requantised when source levels differ)."""
    return to_levels(item.pixels, raw.source_levels, levels)


CONVERT_CHUNK = 4096   # images requantised at a time: the float64 temporaries stay a few MB


def images_at_levels(raw: RawImages, levels: int) -> np.ndarray:
    """Every image as (N, H, W[, 3]) uint8 in 0..levels-1: RawImages.pixels itself when it already is
    (no copy), else converted chunk by chunk into one new array."""
    x = raw.pixels
    if x.dtype == np.uint8 and raw.source_levels == levels:
        return x
    out = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, len(x), CONVERT_CHUNK):
        out[start:start + CONVERT_CHUNK] = to_levels(x[start:start + CONVERT_CHUNK], raw.source_levels, levels)
    return out


@dataclass
class TextUnit:
    file: str                  # data/raw/notes/a.txt, or data/raw/pydoc/docs.jsonl:12 (os.path.join)
    text: Optional[str]        # None when unreadable
    error: Optional[str] = None
    is_file: bool = True       # False for one document of docs.jsonl
    bom: bool = False          # a UTF-8 byte order mark was stripped
    crlf: int = 0              # Windows line endings turned into "\n"


@dataclass
class RawText:
    units: list[TextUnit]
    paragraphs: bool           # single text file: documents are separated by blank lines
    user_files: bool = False   # a textfile: source (its manifest says how it was split and normalised)


def decode_utf8(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, 'not valid UTF-8 (byte 0xff at line 3, offset 41); re-save ...').
    A leading BOM is stripped, CRLF becomes LF (`textsource.decode_text`)."""
    decoded = decode_text(data)
    return decoded.text, decoded.error


def read_raw_text(name: str, cfg: DatasetConfig, root: str | Path = ".") -> RawText:
    """Decode data/raw/<name>/ into text units: files, or the documents of docs.jsonl."""
    folder = raw_dir(name, root)
    layout = snapshot_layout(name, root)
    if layout == "jsonl":
        path = folder / "docs.jsonl"
        where = display_path(path, root)
        text, error = decode_utf8(path.read_bytes())
        if error:
            return RawText([TextUnit(where, None, error)], paragraphs=False)
        units = []
        for i, line in enumerate(text.splitlines(), 1):
            try:
                doc = json.loads(line)
                units.append(TextUnit(f"{where}:{i} ({doc['id']})", doc["text"], None, is_file=False))
            except (json.JSONDecodeError, KeyError, TypeError):
                units.append(TextUnit(f"{where}:{i}", None, 'not a JSON line {"id": ..., "text": ...}', is_file=False))
        return RawText(units, paragraphs=False)
    if layout not in ("textfile", "textfolder"):
        raise DataError(f"datasets.{name}: data/raw/{name} holds {layout} data, not text; "
                        f"run `genflow stage ingest {name}` again")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SNAPSHOT)
    units = []
    for f in files:
        d = decode_text(f.read_bytes())
        units.append(TextUnit(display_path(f, root), d.text, d.error, bom=d.bom, crlf=d.crlf))
    return RawText(units, paragraphs=layout == "textfile", user_files=True)


def unit_documents(unit: TextUnit, paragraphs: bool, min_doc_chars: int) -> list[str]:
    """The documents of one text unit that are at least min_doc_chars long (stripped)."""
    if not unit.text:
        return []
    pieces = re.split(r"\n\s*\n", unit.text) if paragraphs else [unit.text]
    return [d for d in (p.strip() for p in pieces) if d and len(d) >= min_doc_chars]


@dataclass
class PairRow:
    file: str                  # data/raw/docpairs/pairs.tsv:12, as users see it
    source: Optional[str]      # None when the line cannot be read
    target: Optional[str]
    group: str                 # pairs of one group share a split (builtin: the module); else the line
    error: Optional[str] = None


def read_raw_pairs(name: str, root: str | Path = ".") -> list[PairRow]:
    """One PairRow per non-blank line of the pairs snapshot (JSONL or TSV); unreadable lines keep their error."""
    folder = raw_dir(name, root)
    if snapshot_layout(name, root) != "pairs":
        raise DataError(f"datasets.{name}: data/raw/{name} does not hold pairs; "
                        f"run `genflow stage ingest {name}` again")
    path = next(p for p in sorted(folder.iterdir()) if p.name != SNAPSHOT)
    where = display_path(path, root)
    text, error = decode_utf8(path.read_bytes())
    if error:
        return [PairRow(where, None, None, where, error)]
    tsv = path.suffix.lower() == ".tsv"
    rows = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        at = f"{where}:{i}"
        if tsv:
            cols = line.split("\t")
            if len(cols) != 2:
                why = f"{len(cols)} tab-separated columns, expected 2 (source, target)"
                rows.append(PairRow(at, None, None, at, why))
            else:
                rows.append(PairRow(at, cols[0].strip(), cols[1].strip(), at))
            continue
        try:
            obj = json.loads(line)
            source, target = obj["source"], obj["target"]
            if not isinstance(source, str) or not isinstance(target, str):
                raise TypeError
            rows.append(PairRow(at, source.strip(), target.strip(), str(obj.get("group") or at)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            rows.append(PairRow(at, None, None, at, 'not a JSON line {"source": "...", "target": "..."}'))
    return rows


def pair_splits(rows: list[PairRow], split: SplitConfig) -> list[str]:
    """The split of each row: groups (modules, for the standard library) are shuffled and cut by the
    shares, so no group has pairs in two splits. Deterministic for a split seed."""
    groups = sorted({r.group for r in rows})
    idx = split_indices(len(groups), split)
    split_of = {groups[i]: s for s, ids in idx.items() for i in ids}
    return [split_of[r.group] for r in rows]


@dataclass
class CaptionLine:
    where: str                  # data/raw/mine/metadata.jsonl:12 (or data/raw/.../captions.jsonl:12), as users see it
    file_name: Optional[str]    # the image it names, relative to the folder (builtin: its index); None: unreadable
    texts: list[str]            # its captions: one per line of a user's metadata, every phrasing for the builtin
    error: Optional[str] = None
    record: Optional[dict] = None   # builtin: the measured properties and the words the captions were made from


@dataclass
class RawCaptions:
    images: RawImages           # every image of the snapshot, captioned or not
    keys: list[str]             # each image's file_name (relative posix path; builtin: its index)
    lines: list[CaptionLine]
    metadata: str               # the captions file, as users see it
    thresholds: Optional[dict] = None   # builtin: the tercile cuts its words were chosen by


def read_raw_captions(name: str, cfg: DatasetConfig, root: str | Path = ".") -> RawCaptions:
    """Decode a captions snapshot: its images (broken ones keep their error) and its caption lines
    (unreadable ones keep theirs), not yet matched: validation and prepare name what does not match."""
    folder = raw_dir(name, root)
    layout = snapshot_layout(name, root)
    if layout == "captions-npz":
        images = _read_npz_images(folder / "images.npz", name, cfg, root)
        path = folder / CAPTIONS_FILE
        snapshot = json.loads((folder / SNAPSHOT).read_text())
        return RawCaptions(images, [str(i) for i in range(len(images.items))], _read_caption_lines(path, root),
                           display_path(path, root), snapshot.get("thresholds"))
    if layout != "captions":
        raise DataError(f"datasets.{name}: data/raw/{name} holds {layout} data, not captioned images; "
                        f"run `genflow stage ingest {name}` again")
    path = next(folder / m for m in METADATA_FILES if (folder / m).is_file())
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    images = decode_images(name, files, [-1] * len(files), cfg, root)
    return RawCaptions(images, [f.relative_to(folder).as_posix() for f in files],
                       _read_metadata(path, root), display_path(path, root))


def _read_caption_lines(path: Path, root) -> list[CaptionLine]:
    """builtin:digits-captions' captions.jsonl: {"index", "texts", "label", properties, "words"} per line."""
    where = display_path(path, root)
    text, error = decode_utf8(path.read_bytes())
    if error:
        return [CaptionLine(where, None, [], error)]
    out = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            texts, index = rec["texts"], rec["index"]
            if not isinstance(index, int) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise TypeError
            out.append(CaptionLine(f"{where}:{i}", str(index), [t.strip() for t in texts], record=rec))
        except (json.JSONDecodeError, KeyError, TypeError):
            out.append(CaptionLine(f"{where}:{i}", None, [], 'not a JSON line {"index": ..., "texts": [...]}'))
    return out


def _read_metadata(path: Path, root) -> list[CaptionLine]:
    """A user's metadata.jsonl ({"file_name", "text"} per line; other keys ignored) or metadata.csv
    (a header with file_name and text; other columns ignored), one CaptionLine per row."""
    import csv
    from pathlib import PurePosixPath

    where = display_path(path, root)
    text, error = decode_utf8(path.read_bytes())
    if error:
        return [CaptionLine(where, None, [], error)]

    def line(at: str, file_name, caption) -> CaptionLine:
        if not isinstance(file_name, str) or not file_name.strip() or not isinstance(caption, str):
            return CaptionLine(at, None, [], "needs a file_name and a text (both strings)")
        return CaptionLine(at, PurePosixPath(file_name.strip()).as_posix(), [caption.strip()])

    out = []
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = [c for c in ("file_name", "text") if c not in (reader.fieldnames or [])]
        if missing:
            return [CaptionLine(f"{where}:1", None, [], f"the header has no {' or '.join(missing)} column; "
                                "the first line must name the columns, e.g. file_name,text")]
        try:
            for row in reader:
                if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                    out.append(line(f"{where}:{reader.line_num}", row.get("file_name"), row.get("text")))
        except csv.Error as e:
            out.append(CaptionLine(f"{where}:{reader.line_num}", None, [], f"not valid CSV ({e})"))
        return out
    for i, raw_line in enumerate(text.split("\n"), 1):
        if not raw_line.strip():
            continue
        try:
            obj = json.loads(raw_line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            out.append(CaptionLine(f"{where}:{i}", None, [], 'not a JSON line {"file_name": "...", "text": "..."}'))
        else:
            out.append(line(f"{where}:{i}", obj.get("file_name"), obj.get("text")))
    return out


def caption_problems(raw: RawCaptions, max_chars: int) -> list[tuple[str, str, str]]:
    """Every reason the snapshot cannot be prepared: (rule, where, one line naming file and line and
    what to do), where = the caption line (data/raw/mine/metadata.jsonl:12) or the image. The
    captions suite (components/validation.py) words its failures with these same lines."""
    problems = [("decodable", it.file, f"{it.file}: {it.error}") for it in raw.images.items if it.error]
    known = set(raw.keys)
    captioned = set()
    for ln in raw.lines:
        at = ln.where
        if ln.error:
            problems.append(("readable", at, f"{at}: {ln.error}"))
            continue
        if ln.file_name not in known:
            problems.append(("file_present", at, f"{at}: file_name {ln.file_name!r} not found in the folder; "
                                                  "fix the name or add the image"))
        captioned.add(ln.file_name)
        if not ln.texts or not all(ln.texts):
            problems.append(("not_empty", at, f"{at}: empty text for {ln.file_name!r}; write its caption "
                                               "or remove the line"))
        longest = max((len(t) for t in ln.texts), default=0)
        if longest > max_chars:
            problems.append(("length_bound", at, f"{at}: text of {longest} characters, more than "
                                                  f"caption_validation.max_chars={max_chars}; shorten it"))
    problems += [("caption_present", it.file, f"{it.file}: no caption in {raw.metadata}; add a line for it "
                                              "(or remove the image)")
                 for k, it in zip(raw.keys, raw.images.items) if k not in captioned]
    return problems


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

def split_indices(n: int, split: SplitConfig, labels: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Deterministic {train, val, test} index arrays (sorted) over n items.

    With labels the split is stratified: each class is shuffled (seeded) and cut by the shares.
    Without labels (text documents) val and test get at least one item each when their share is > 0.
    """
    rng = np.random.default_rng(split.seed)
    groups = [np.arange(n)] if labels is None else \
        [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for idx in groups:
        perm = rng.permutation(idx)
        n_test = int(np.floor(len(idx) * split.test + 0.5))
        n_val = int(np.floor(len(idx) * split.val + 0.5))
        if labels is None:
            n_test = max(n_test, 1) if split.test > 0 else 0
            n_val = max(n_val, 1) if split.val > 0 else 0
        parts["test"].append(perm[:n_test])
        parts["val"].append(perm[n_test:n_test + n_val])
        parts["train"].append(perm[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
            for s, p in parts.items()}


# ---------------------------------------------------------------------------
# Prepare: data/raw/<name>/ -> data/prepared/<name>/
# ---------------------------------------------------------------------------

def prepare(name: str, cfg: DatasetConfig, root: str | Path = ".") -> Path:
    """Write deterministic train/val/test splits and manifest.json into data/prepared/<name>/.

    Images: {split}.npz with x (N, S, S) uint8 in 0..levels-1 and y (N,) int64, stratified by class.
    Text: {split}.txt, documents joined by blank lines, split by document (no text in two splits);
    too few documents for that: split by characters (`textsource.split_by_characters`).
    """
    target = prepared_dir(name, root)
    manifest = {"name": name, "kind": cfg.kind, "source": cfg.source,
                "raw_fingerprint": dataset_fingerprint(name, root),
                "split": {"val": cfg.split.val, "test": cfg.split.test, "seed": cfg.split.seed}}
    with replaced_dir(target) as tmp:
        if cfg.kind == "image":
            manifest.update(_prepare_images(name, cfg, root, tmp))
        elif cfg.kind == "pairs":
            manifest.update(_prepare_pairs(name, cfg, root, tmp))
        elif cfg.kind == "captions":
            manifest.update(_prepare_captions(name, cfg, root, tmp))
        else:
            manifest.update(_prepare_text(name, cfg, root, tmp))
        manifest["files"] = tree_md5s(tmp)
        write_json(tmp / "manifest.json", manifest)
    return target


def _refuse(name: str, problems: list[str]) -> None:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise DataError(f"datasets.{name}: cannot prepare: {'; '.join(problems[:3])}{more}; "
                    f"run `genflow stage validate {name}` for the full report")


def _prepare_images(name: str, cfg: DatasetConfig, root, out: Path) -> dict:
    raw = read_raw_images(name, cfg, root)
    top = raw.source_levels - 1
    problems = []
    for it in raw.items:
        if it.error:
            problems.append(f"{it.file}: {it.error}")
        elif not 0 <= it.label < len(raw.classes):
            problems.append(f"{it.file}: label {it.label} is not a known class")
        elif np.isnan(np.asarray(it.pixels, dtype=np.float64)).any():
            problems.append(f"{it.file}: NaN pixel values")
        elif not raw.resized and it.pixels.shape != (cfg.image_size, cfg.image_size):
            problems.append(f"{it.file}: {it.size[0]}x{it.size[1]} pixels, expected {cfg.image_size}x{cfg.image_size}")
        elif raw.resized and (min(it.size) < cfg.image_size or max(it.size) / min(it.size) > MAX_ASPECT):
            S = cfg.image_size   # the validation suite's image_size rule, in the same words
            problems.append(f"{it.file}: {it.size[0]}x{it.size[1]} pixels, expected at least {S}x{S} and square "
                            f"within 10% (images are resized to {S}x{S})")
        elif np.min(it.pixels) < 0 or np.max(it.pixels) > top:
            problems.append(f"{it.file}: pixel values outside 0..{top}")
    if raw.resized and cfg.mixed_modes == "refuse":
        problems += mixed_mode_problems(name, raw)
    if raw.resized:   # an imagefolder's class folder without images: a class the models could never learn
        per_class = np.bincount([it.label for it in raw.items], minlength=len(raw.classes))
        problems += [f"{path}: class {c!r} has no images; add images or remove the folder"
                     for c, path, k in zip(raw.classes, raw.class_paths, per_class) if k == 0]
    if problems:
        _refuse(name, problems)
    if not raw.items:
        raise DataError(f"datasets.{name}: data/raw/{name} holds no images")
    x = images_at_levels(raw, cfg.levels)                                  # (N, S, S[, 3]) uint8, no copy
    y = np.array([it.label for it in raw.items], dtype=np.int64)          # (N,)
    idx = split_indices(len(y), cfg.split, labels=y)
    _check_nonempty(name, idx, cfg.split, "images")
    for s in SPLITS:
        save_npz(out / f"{s}.npz", x=x[idx[s]], y=y[idx[s]])
    modes = {"image_modes": colour_count(name, raw), **image_layout(raw)} if raw.resized else {}
    return {"counts": {s: int(len(idx[s])) for s in SPLITS},   # builtins: the manifest as it always was
            "image_size": cfg.image_size, "levels": cfg.levels, "classes": raw.classes, **modes,
            "class_histogram": {s: np.bincount(y[idx[s]], minlength=len(raw.classes)).tolist() for s in SPLITS}}


def image_layout(raw: RawImages) -> dict:
    """The manifest keys beyond a grey labelled folder's: "channels" when RGB, "labelled" when not;
    absent means 1 channel and labelled (so a grey folder's manifest reads as it always did)."""
    out = {}
    if raw.channels != 1:
        out["channels"] = raw.channels
    if not raw.labelled:
        out["labelled"] = False
    return out


def files_by_mode(raw: RawImages) -> tuple[list[str], list[str]]:
    """(colour files, decodable grey files) of a decoded folder, in folder order."""
    colour = [it.file for it in raw.items if it.colour]
    return colour, [it.file for it in raw.items if not it.colour and it.error is None]


def colour_count(name: str, raw: RawImages) -> dict[str, int]:
    """{"grey": files, "colour": files} of a decoded folder; the minority converted to the dataset's
    channels (colour to grey luma, or grey to three equal channels), said in one line naming the first."""
    colour, grey = files_by_mode(raw)
    if colour and raw.channels == 1:
        print(f"datasets.{name}: {len(colour)} of {len(raw.items)} images are colour (first: {colour[0]}), "
              f"converted to grey (datasets.{name}.channels: 3 keeps colour); counted in manifest.json "
              "image_modes [colour_to_grey]", flush=True)
    elif grey and colour and raw.channels == 3:
        print(f"datasets.{name}: {len(grey)} of {len(raw.items)} images are grey (first: {grey[0]}), "
              "converted to RGB with three equal channels; counted in manifest.json image_modes "
              "[grey_to_rgb]", flush=True)
    return {"grey": len(raw.items) - len(colour), "colour": len(colour)}


def mixed_mode_problems(name: str, raw: RawImages) -> list[str]:
    """datasets.*.mixed_modes: refuse: one line per file in the minority mode, when a folder mixes grey
    and colour files."""
    colour, grey = files_by_mode(raw)
    if not colour or not grey:
        return []
    odd, kind = (grey, "grey") if len(grey) <= len(colour) else (colour, "colour")
    other = "colour" if kind == "grey" else "grey"
    return [f"{f}: a {kind} image among {other} ones (datasets.{name}.mixed_modes: refuse); convert it to "
            f"{other} or set mixed_modes: convert" for f in odd]


def _prepare_text(name: str, cfg: DatasetConfig, root, out: Path) -> dict:
    raw = read_raw_text(name, cfg, root)
    problems = [f"{u.file}: {u.error}" for u in raw.units if u.error]
    if problems:
        _refuse(name, problems)
    docs, seen, short, dupes = [], set(), 0, 0
    for unit in raw.units:
        kept = unit_documents(unit, raw.paragraphs, cfg.min_doc_chars)
        short += len(unit_documents(unit, raw.paragraphs, 1)) - len(kept)
        for d in kept:
            if d in seen:  # an exact repeat would put the same text in two splits
                dupes += 1
                continue
            seen.add(d)
            docs.append(d)
    idx = split_indices(len(docs), cfg.split)
    counts = {s: int(len(idx[s])) for s in SPLITS}
    split_by = "documents"
    if raw.user_files and docs and not documents_fill_splits(counts, cfg.split):
        split_by = "characters"
        texts = split_by_characters("\n\n".join(docs), cfg.split)
        counts = {s: int(bool(texts[s])) for s in SPLITS}  # pieces of text, not whole documents
        empty = [s for s in SPLITS if not texts[s] and (s == "train" or getattr(cfg.split, s) > 0)]
        if empty:
            raise DataError(f"datasets.{name}.split: the {empty[0]} split would be empty even split by "
                            f"characters ({sum(map(len, texts.values()))} characters); add text or change the shares")
        print(f"datasets.{name}: {len(docs)} document(s), too few to split by document; split by characters "
              f"(train {len(texts['train'])}, val {len(texts['val'])}, test {len(texts['test'])})", flush=True)
    else:
        _check_nonempty(name, idx, cfg.split,
                        f"documents of at least min_doc_chars={cfg.min_doc_chars} characters")
        texts = {s: "\n\n".join(docs[i] for i in idx[s]) for s in SPLITS}
    for s in SPLITS:
        (out / f"{s}.txt").write_text(texts[s], encoding="utf-8")
    vocab = "".join(sorted(set(texts["train"])))
    # the builtin's manifest keeps its fields as they were, so its prepared data keep their DVC hash
    shape = {"split_by": split_by, "documents": len(docs),
             "normalised": {"bom_stripped": sum(u.bom for u in raw.units),
                            "crlf_files": sum(u.crlf > 0 for u in raw.units),
                            "crlf_line_ends": sum(u.crlf for u in raw.units)}} if raw.user_files else {}
    return {**shape, "counts": counts,
            "chars": {s: len(texts[s]) for s in SPLITS},
            "vocab": vocab,
            "unseen_chars": {s: "".join(sorted(set(texts[s]) - set(vocab))) for s in ("val", "test")},
            "documents_dropped": {"shorter_than_min_doc_chars": short, "duplicates": dupes}}


def _prepare_pairs(name: str, cfg: DatasetConfig, root, out: Path) -> dict:
    rows = read_raw_pairs(name, root)
    pv = cfg.pair_validation
    problems = [f"{r.file}: {r.error}" for r in rows if r.error]
    problems += [f"{r.file}: empty {side}" for r in rows if not r.error
                 for side, text in (("source", r.source), ("target", r.target)) if not text]
    problems += [f"{r.file}: {side} of {len(text)} characters, longer than pair_validation.max_{side}_chars={limit}"
                 for r in rows if not r.error for side, text, limit in
                 (("source", r.source, pv.max_source_chars), ("target", r.target, pv.max_target_chars))
                 if text and len(text) > limit]
    if problems:
        _refuse(name, problems)
    where = pair_splits(rows, cfg.split)
    parts = {s: [r for r, w in zip(rows, where) if w == s] for s in SPLITS}
    if not parts["train"] or (cfg.split.test > 0 and not parts["test"]):
        raise DataError(f"datasets.{name}.split: a split would be empty ({len(rows)} pairs in "
                        f"{len({r.group for r in rows})} groups); add pairs or change the shares")
    for s in SPLITS:
        lines = [json.dumps({"source": r.source, "target": r.target}, ensure_ascii=False) for r in parts[s]]
        (out / f"{s}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    vocab = "".join(sorted(set("".join(r.source + r.target for r in parts["train"]))))
    return {"counts": {s: len(parts[s]) for s in SPLITS},
            "groups": {s: len({r.group for r in parts[s]}) for s in SPLITS},
            "vocab": vocab,
            "max_source_chars": max(len(r.source) for r in rows), "max_target_chars": max(len(r.target) for r in rows),
            "unseen_chars": {s: "".join(sorted(set("".join(r.source + r.target for r in parts[s])) - set(vocab)))
                             for s in ("val", "test")}}


def _prepare_captions(name: str, cfg: DatasetConfig, root, out: Path) -> dict:
    """{split}.npz (x, y as for images; y = -1 without classes) and {split}.jsonl: line i describes
    image i of the npz ({"file", "label", "texts", "ink", "slant", "width"} + the builtin's "words")."""
    raw = read_raw_captions(name, cfg, root)
    problems = [line for _, _, line in caption_problems(raw, cfg.caption_validation.max_chars)]
    if problems:
        _refuse(name, problems)
    if not raw.images.items:
        raise DataError(f"datasets.{name}: data/raw/{name} holds no images")
    texts: dict[str, list[str]] = {}
    words: dict[str, dict] = {}
    for ln in raw.lines:   # a file named on several lines gets every caption, in line order
        texts.setdefault(ln.file_name, []).extend(ln.texts)
        if ln.record and "words" in ln.record:
            words[ln.file_name] = ln.record["words"]
    x = images_at_levels(raw.images, cfg.levels)                                    # (N, S, S[, 3]) uint8
    y = np.array([it.label for it in raw.images.items], dtype=np.int64)                    # (N,); -1: no class
    props = measure(x, cfg.levels)   # from the pixels training sees: the values saved beside the captions
    labelled = bool(raw.images.classes)
    idx = split_indices(len(y), cfg.split, labels=y if labelled else None)
    _check_nonempty(name, idx, cfg.split, "captioned images")
    builtin = snapshot_layout(name, root) == "captions-npz"
    for s in SPLITS:
        save_npz(out / f"{s}.npz", x=x[idx[s]], y=y[idx[s]])
        lines = []
        for i in idx[s].tolist():
            key = raw.keys[i]
            rec = {"file": f"images.npz[{key}]" if builtin else key, "label": int(y[i]), "texts": texts[key],
                   **{k: float(props[k][i]) for k in PROPERTIES}}
            if key in words:
                rec["words"] = words[key]
            lines.append(json.dumps(rec, ensure_ascii=False, sort_keys=True))
        (out / f"{s}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    split_texts = {s: [t for i in idx[s].tolist() for t in texts[raw.keys[i]]] for s in SPLITS}
    vocab = "".join(sorted(set("".join(split_texts["train"]))))
    return {"counts": {s: int(len(idx[s])) for s in SPLITS},
            "captions": {s: len(split_texts[s]) for s in SPLITS},
            "image_size": cfg.image_size, "levels": cfg.levels, "classes": raw.images.classes,
            **({"channels": raw.images.channels} if raw.images.channels != 1 else {}),
            **({} if labelled else {"labelled": False}),   # a user's captions: no classes
            "vocab": vocab, "max_caption_chars": max(len(t) for ts in split_texts.values() for t in ts),
            "unseen_chars": {s: "".join(sorted(set("".join(split_texts[s])) - set(vocab))) for s in ("val", "test")},
            "caption_thresholds": raw.thresholds,
            "class_histogram": {s: np.bincount(y[idx[s]], minlength=len(raw.images.classes)).tolist()
                                for s in SPLITS} if labelled else None}


def _check_nonempty(name: str, idx: dict[str, np.ndarray], split: SplitConfig, what: str) -> None:
    total = sum(len(i) for i in idx.values())
    for s in SPLITS:
        if len(idx[s]) == 0 and (s == "train" or getattr(split, s) > 0):
            raise DataError(f"datasets.{name}.split: the {s} split would be empty ({total} {what}); "
                            "add data or change the shares")


# ---------------------------------------------------------------------------
# Prepared-data API (used by training, evaluation and export)
# ---------------------------------------------------------------------------

def load_manifest(name: str, root: str | Path = ".") -> dict:
    """manifest.json of data/prepared/<name>/ (kind, counts, files, image_size/levels/classes or vocab)."""
    path = prepared_dir(name, root) / "manifest.json"
    if not path.exists():
        raise DataError(f"{display_path(path, root)}: not found; run `genflow stage prepare {name}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def _split_path(name: str, split: str, root, suffix: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = prepared_dir(name, root) / f"{split}{suffix}"
    if not path.exists():
        raise DataError(f"{display_path(path, root)}: not found; run `genflow stage prepare {name}` first")
    return path


def load_images(name: str, split: str, root: str | Path = ".") -> tuple[np.ndarray, np.ndarray]:
    """x uint8 in 0..levels-1, (N, H, W) grey or (N, H, W, C) colour (channels last; the manifest's
    "channels"), and y (N,) int64 class indices of one split."""
    with np.load(_split_path(name, split, root, ".npz"), allow_pickle=False) as z:
        return z["x"], z["y"]


def load_text(name: str, split: str, root: str | Path = ".") -> str:
    """One split's documents joined by blank lines."""
    return _split_path(name, split, root, ".txt").read_text(encoding="utf-8")


def load_captions(name: str, split: str, root: str | Path = ".") -> list[dict]:
    """One split's caption records; record i describes image i of ``load_images(name, split)``:
    {"file", "label", "texts": [...], "ink", "slant", "width"} (+ "words" for builtin:digits-captions)."""
    lines = _split_path(name, split, root, ".jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def load_pairs(name: str, split: str, root: str | Path = ".") -> list[tuple[str, str]]:
    """One split's (source, target) pairs, in file order."""
    lines = _split_path(name, split, root, ".jsonl").read_text(encoding="utf-8").splitlines()
    return [(d["source"], d["target"]) for d in map(json.loads, lines)]


# ---------------------------------------------------------------------------
# Image layout: (N, H, W) grey or (N, H, W, C) colour, channels last, everywhere outside the networks
# ---------------------------------------------------------------------------

def image_channels(x: np.ndarray) -> int:
    """Channels of images (N, H, W) -> 1 or (N, H, W, C) -> C."""
    return 1 if x.ndim == 3 else int(x.shape[-1])


def to_nchw(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) -> (N, C, H, W): the networks' layout (a view, no copy)."""
    return x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)


def from_nchw(x: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) -> (N, H, W); (N, C, H, W) -> (N, H, W, C): back from the networks' layout."""
    return x[:, 0] if x.shape[1] == 1 else np.moveaxis(x, 1, -1)


def manifest_channels(manifest: dict) -> int:
    """The prepared images' channels (absent: 1, every dataset before colour)."""
    return int(manifest.get("channels", 1))


def manifest_labelled(manifest: dict) -> bool:
    """False for a folder without class sub-folders (one class; label metrics do not apply)."""
    return bool(manifest.get("labelled", True))
