"""Imagefolder ingest, validation and prepare: streamed decoding into one array, and one line per bad input."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from colour_data import make_colour_imagefolder
from components import data
from components.config import DatasetConfig, ImageValidationConfig, SplitConfig
from components.data import DataError
from components.progress import Progress
from components.validation import DataValidationError, validate
from conftest import make_imagefolder


def image_cfg(src: Path) -> DatasetConfig:
    return DatasetConfig(source=f"imagefolder:{src}", kind="image", image_size=8, levels=17,
                         split=SplitConfig(val=0.2, test=0.2, seed=0),
                         image_validation=ImageValidationConfig(min_per_class=2))


def validation_line(name: str, cfg: DatasetConfig, root: Path) -> str:
    with pytest.raises(DataValidationError) as e:
        validate(name, cfg, root, docs=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def refused_by_prepare(name: str, cfg: DatasetConfig, root: Path) -> str:
    """prepare refuses in one line and leaves no prepared folder (nor a temporary one) behind."""
    with pytest.raises(DataError) as e:
        data.prepare(name, cfg, root)
    assert "\n" not in str(e.value)
    assert not (root / "data/prepared").exists() or not any((root / "data/prepared").iterdir())
    return str(e.value)


# ---------------------------------------------------------------------------
# streaming: one preallocated array, the same arrays as decoding file by file
# ---------------------------------------------------------------------------

def test_decoded_folder_is_one_array_and_prepare_writes_the_per_file_rule(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 7, "b": 6, "c": 5}, size=(12, 12))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (17, 16, 3), dtype=np.uint8)).save(src / "b/x.jpg")
    cfg = image_cfg(src)
    data.ingest("shapes", cfg, tmp_path)
    raw = data.read_raw_images("shapes", cfg, tmp_path)
    assert raw.pixels.shape == (19, 8, 8) and raw.pixels.dtype == np.uint8
    # every image is a view into that one array: no per-image copies are held
    assert all(np.shares_memory(it.pixels, raw.pixels) for it in raw.items)
    assert data.images_at_levels(raw, cfg.levels) is raw.pixels   # prepare takes it without a copy

    data.prepare("shapes", cfg, tmp_path)
    files = sorted(p for p in (tmp_path / "data/raw/shapes").rglob("*") if p.suffix in (".png", ".jpg"))
    expected = np.stack([data.quantise_grey(data.square_resize(ImageOps.exif_transpose(Image.open(f)).convert("L"),
                                                               8), 17) for f in files])
    labels = np.array([["a", "b", "c"].index(f.parent.name) for f in files])
    idx = data.split_indices(len(files), cfg.split, labels=labels)
    for s in data.SPLITS:
        x, y = data.load_images("shapes", s, tmp_path)
        assert np.array_equal(x, expected[idx[s]]) and np.array_equal(y, labels[idx[s]])


def test_decode_images_keeps_the_order_of_the_files_it_is_given(tmp_path):
    src = make_imagefolder(tmp_path / "src", {"a": 3})
    files = sorted((src / "a").iterdir())
    raw = data.decode_images("d", files, [0, 0, 0], image_cfg(src), tmp_path)
    again = data.decode_images("d", files[::-1], [0, 0, 0], image_cfg(src), tmp_path)
    assert np.array_equal(raw.pixels, again.pixels[::-1])


def test_progress_lines_only_for_long_loops():
    now = [0.0]
    quiet, loud = io.StringIO(), io.StringIO()
    p = Progress("datasets.d: decoded", 10, "images", every_s=5, stream=quiet, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 0.1
        p.step()
    p.done()
    assert quiet.getvalue() == ""
    p = Progress("datasets.d: decoded", 10, "images", every_s=5, stream=loud, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 2.0
        p.step()
    p.done()
    lines = loud.getvalue().splitlines()
    assert lines[0].startswith("datasets.d: decoded 3/10 images (30%), 0 images/s, about")
    assert lines[-1].startswith("datasets.d: decoded 10/10 images (100%)") and lines[-1].endswith("in 20 s")


# ---------------------------------------------------------------------------
# bad input: one line naming the file and the rule; nothing half-written
# ---------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    return make_imagefolder(tmp_path / "src", {"a": 5, "b": 5})


def test_zero_byte_image(tmp_path, folder):
    (folder / "a" / "empty.png").write_bytes(b"")
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    line = "data/raw/d/a/empty.png: empty file (0 bytes), not a PNG; replace it with the image or remove it"
    assert f"{line} [decodable]" in validation_line("d", cfg, tmp_path)
    assert line in refused_by_prepare("d", cfg, tmp_path)


def test_one_pixel_image(tmp_path, folder):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "b" / "dot.png")
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    line = "data/raw/d/b/dot.png: 1x1 pixels, expected at least 8x8 and square within 10% (images are resized to 8x8)"
    message = validation_line("d", cfg, tmp_path)
    assert f"{line} [image_size]" in message and message.count("dot.png") == 1
    assert line in refused_by_prepare("d", cfg, tmp_path)


def test_unreadable_image(tmp_path, folder):
    (folder / "a" / "scan.jpg").write_bytes(b"%PDF-1.4 not an image at all")
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    line = "data/raw/d/a/scan.jpg: corrupt JPEG (cannot identify image file)"
    assert f"{line} [decodable]" in validation_line("d", cfg, tmp_path)
    assert line in refused_by_prepare("d", cfg, tmp_path)


def test_file_the_source_does_not_let_us_read(tmp_path, folder, monkeypatch):
    cfg = image_cfg(folder)

    def denied(a, b):
        if Path(a).name == "img_2.png":
            raise PermissionError(13, "Permission denied")
        return Path(b).write_bytes(Path(a).read_bytes())

    monkeypatch.setattr(data.shutil, "copyfile", denied)
    with pytest.raises(DataError) as e:
        data.ingest("d", cfg, tmp_path)
    assert str(e.value) == (f"datasets.d.source: {folder / 'a' / 'img_2.png'} cannot be read (Permission denied); "
                            "make it readable or remove it from the folder")
    assert not any((tmp_path / "data/raw").iterdir())   # no snapshot, no temporary folder


def test_class_folder_without_images(tmp_path, folder):
    (folder / "c").mkdir()
    (folder / "c" / "readme.txt").write_text("not an image")
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    assert "data/raw/d/c: class 'c' has no images [class_present]" in validation_line("d", cfg, tmp_path)
    assert "data/raw/d/c: class 'c' has no images; add images or remove the folder" in \
        refused_by_prepare("d", cfg, tmp_path)


def test_mixed_colour_and_grey_are_converted_and_counted(tmp_path, folder, capsys):
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), rgb).save(folder / "a" / f"rgb_{i}.png")
    Image.new("P", (8, 8)).save(folder / "b" / "palette.png")
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    assert validate("d", cfg, tmp_path, docs=False)["success"]
    data.prepare("d", cfg, tmp_path)
    manifest = data.load_manifest("d", tmp_path)
    assert manifest["image_modes"] == {"grey": 10, "colour": 4}
    out = [line for line in capsys.readouterr().out.splitlines() if "[colour_to_grey]" in line]
    assert out == ["datasets.d: 4 of 14 images are colour (first: data/raw/d/a/rgb_0.png), converted to grey "
                   "(datasets.d.channels: 3 keeps colour); counted in manifest.json image_modes [colour_to_grey]"]
    x = np.concatenate([data.load_images("d", s, tmp_path)[0] for s in data.SPLITS])
    assert x.ndim == 3   # mostly grey files: one channel (channels left out: as the files are)
    assert "channels" not in manifest and "labelled" not in manifest   # a grey folder's manifest as it was
    assert json.loads((tmp_path / "data/prepared/d/manifest.json").read_text())["image_modes"]["colour"] == 4


def test_exif_rotated_photo_comes_out_upright(tmp_path, folder):
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :8] = 255                       # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6                          # orientation 6: shown turned 90 degrees clockwise
    Image.fromarray(stored).save(folder / "a" / "photo.jpg", exif=exif, quality=95)
    cfg = image_cfg(folder)
    data.ingest("d", cfg, tmp_path)
    raw = data.read_raw_images("d", cfg, tmp_path)
    photo = next(it for it in raw.items if it.file.endswith("photo.jpg"))
    assert photo.pixels[:4].mean() > 14 and photo.pixels[4:].mean() < 2   # upright: the top half is white


# ---------------------------------------------------------------------------
# colour: channels as the files are, or as params say; unlabelled folders
# ---------------------------------------------------------------------------

def colour_cfg(src: Path, **kw) -> DatasetConfig:
    return DatasetConfig(source=f"imagefolder:{src}", kind="image", image_size=16, levels=16,
                         split=SplitConfig(val=0.2, test=0.2, seed=0),
                         image_validation=ImageValidationConfig(min_per_class=2), **kw)


def test_colour_folder_keeps_three_channels_per_pixel(tmp_path):
    src = make_colour_imagefolder(tmp_path / "src", per_class=6, size=32)
    cfg = colour_cfg(src)
    data.ingest("c", cfg, tmp_path)
    assert validate("c", cfg, tmp_path, docs=False)["success"]
    data.prepare("c", cfg, tmp_path)
    manifest = data.load_manifest("c", tmp_path)
    assert manifest["channels"] == 3 and manifest["classes"] == ["blue", "green", "red"]
    assert data.manifest_channels(manifest) == 3 and data.manifest_labelled(manifest)
    x, y = data.load_images("c", "train", tmp_path)
    assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8 and x.max() <= 15
    # the same pixels as Pillow's own centre crop + LANCZOS resize + per-channel quantisation
    files = sorted(p for p in (tmp_path / "data/raw/c").rglob("*.png"))
    every = np.stack([data.quantise_grey(data.square_resize(Image.open(f).convert("RGB"), 16), 16) for f in files])
    assert np.array_equal(np.sort(every.reshape(len(every), -1), 0),
                          np.sort(np.concatenate([data.load_images("c", s, tmp_path)[0]
                                                  for s in data.SPLITS]).reshape(len(every), -1), 0))
    red = x[y == manifest["classes"].index("red")].max(axis=(1, 2)).mean(0)   # brightest value per channel
    assert red[0] > red[1] + 5 and red[0] > red[2] + 5   # the channels are R, G, B in that order


def test_channels_param_overrides_the_files(tmp_path):
    src = make_colour_imagefolder(tmp_path / "src", per_class=4, size=16)
    cfg = colour_cfg(src, channels=1)
    data.ingest("g", cfg, tmp_path)
    data.prepare("g", cfg, tmp_path)
    assert data.load_images("g", "train", tmp_path)[0].ndim == 3
    assert "channels" not in data.load_manifest("g", tmp_path)
    grey = make_imagefolder(tmp_path / "grey", {"a": 4, "b": 4})
    cfg3 = colour_cfg(grey, channels=3)
    data.ingest("r", cfg3, tmp_path)
    data.prepare("r", cfg3, tmp_path)
    x = data.load_images("r", "train", tmp_path)[0]
    assert x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 2])   # grey as three equal channels


def test_mixed_modes_refuse_names_the_minority_files(tmp_path):
    src = make_colour_imagefolder(tmp_path / "src", per_class=4, size=16)
    Image.new("L", (16, 16), 128).save(src / "red" / "grey.png")
    cfg = colour_cfg(src, mixed_modes="refuse")
    data.ingest("m", cfg, tmp_path)
    line = ("data/raw/m/red/grey.png: a grey image among colour ones (datasets.m.mixed_modes: refuse); "
            "convert it to colour or set mixed_modes: convert")
    assert f"{line} [one_mode]" in validation_line("m", cfg, tmp_path)
    assert line in refused_by_prepare("m", cfg, tmp_path)
    ok = colour_cfg(src)   # convert (the default): counted, and said
    data.prepare("m", ok, tmp_path)
    assert data.load_manifest("m", tmp_path)["image_modes"] == {"grey": 1, "colour": 12}


def test_folder_without_class_folders_is_one_unlabelled_class(tmp_path):
    src = make_colour_imagefolder(tmp_path / "src", per_class=5, size=16, labelled=False)
    cfg = colour_cfg(src)
    data.ingest("u", cfg, tmp_path)
    assert validate("u", cfg, tmp_path, docs=False)["success"]
    data.prepare("u", cfg, tmp_path)
    manifest = data.load_manifest("u", tmp_path)
    assert manifest["labelled"] is False and manifest["classes"] == ["u"]
    assert not data.manifest_labelled(manifest)
    x, y = data.load_images("u", "train", tmp_path)
    assert x.shape[1:] == (16, 16, 3) and set(y.tolist()) == {0}


def test_empty_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError) as e:
        data.ingest("e", colour_cfg(tmp_path / "src"), tmp_path)
    assert "holds no images" in str(e.value) and "\n" not in str(e.value)


def test_image_layout_helpers_round_trip():
    grey, rgb = np.zeros((2, 4, 4)), np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    assert data.image_channels(grey) == 1 and data.image_channels(rgb) == 3
    assert data.to_nchw(grey).shape == (2, 1, 4, 4) and data.to_nchw(rgb).shape == (2, 3, 4, 4)
    assert data.to_nchw(rgb)[1, 2, 3, 0] == rgb[1, 3, 0, 2]
    assert np.array_equal(data.from_nchw(data.to_nchw(rgb)), rgb)
    assert np.array_equal(data.from_nchw(data.to_nchw(grey)), grey)
