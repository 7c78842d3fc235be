"""The inputs of inpainting: an image and a mask file, read as the data pipeline reads images.

    levels, keep = read_inpaint_inputs(image_png, mask_png, (1, 8, 8), levels=17)

The image becomes grey levels 0..levels-1 exactly as components/data.py quantises a training
image; the mask is white where the image is regenerated, black where it is kept. A wrong size
is refused with the size expected, unless `resize` asks for the data pipeline's centre crop
and resize. The sampling itself is `diffusion.inpaint_loop`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from components.data import quantise_grey, square_resize
from components.sampling.diffusion import InpaintInputError, check_inpaint
from components.sampling.requests import FLAGS

MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}


def input_name(source: Union[Path, bytes], flag: str) -> str:
    """How a message names an input: '--inpaint digit.png' for a file, 'inpaint.image' for bytes."""
    return flag if isinstance(source, (bytes, bytearray)) else f"{flag} {source}"


def open_image(source: Union[Path, bytes], flag: str, error: type[Exception] = InpaintInputError):
    """The PIL image in `source` (a file, or the bytes of one; EXIF orientation applied); `error` in
    one line naming `flag` and the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = input_name(source, flag)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif not Path(source).is_file():
        raise error(f"{where}: no such file")
    try:
        with Image.open(source) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise error(f"{where}: not an image PIL can read") from None
    except Exception as e:  # truncated or corrupt files
        raise error(f"{where}: cannot be read ({str(e).splitlines()[0]})") from None


def open_with_channels(source: Union[Path, bytes], flag: str, channels: int,
                       error: type[Exception] = InpaintInputError):
    """open_image, refused in one line unless it has `channels` channels (a palette: its colours decide)."""
    im = open_image(source, flag, error)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    have = MODE_CHANNELS.get(im.mode, len(im.getbands()))
    if have != channels:
        want = "1 (grayscale)" if channels == 1 else str(channels)
        raise error(f"{input_name(source, flag)}: {have} channels ({im.mode}), the model takes {want}; "
                    "convert the image")
    return im


def read_inpaint_inputs(image_path: Union[Path, bytes], mask_path: Union[Path, bytes], shape: tuple[int, int, int],
                        levels: int, resize: bool = False,
                        names: Mapping[str, str] = FLAGS) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels (C, H, W) uint8 in 0..levels-1, keep (C, H, W) bool) for a model of `shape` (C, H, W).

    image_path / mask_path: image files, or the bytes of one (a PNG sent to `genflow serve`).
    Refused, each in one line: an image of another channel count, an image of another size
    (unless resize), a mask of another size than the image, a mask with nothing to fill.
    """
    from PIL import Image

    channels, height, width = shape
    im = open_with_channels(image_path, names["image"], channels)
    mask = open_image(mask_path, names["mask"])
    if mask.size != im.size:
        raise InpaintInputError(f"{input_name(mask_path, names['mask'])}: {mask.size[0]}x{mask.size[1]} pixels, the "
                                f"image is {im.size[0]}x{im.size[1]}; give a mask of the image's size")
    if im.size != (width, height):
        if not resize:
            raise InpaintInputError(f"{input_name(image_path, names['image'])}: {im.size[0]}x{im.size[1]} pixels, the "
                                    f"model takes {width}x{height}; give a {width}x{height} image or add "
                                    f"{names.get('resize', '--resize')}")
        im = square_resize(im, width)
        mask = square_resize(mask.convert("L"), width, Image.Resampling.BOX)
    pixels = quantise_grey(im.convert("L" if channels == 1 else "RGB"), levels)           # (H, W) or (H, W, C)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    regenerate = np.asarray(mask.convert("L"), dtype=np.uint8) >= 128                      # (H, W) white
    keep = np.broadcast_to(~regenerate, pixels.shape).copy()
    check_inpaint(pixels.shape, keep, names)
    return pixels, keep


def inpaint_levels(image: Sequence, mask: Sequence, shape: tuple[int, int, int], levels: int,
                   names: Mapping[str, str] = FLAGS) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels (C, H, W) uint8, keep (C, H, W) bool) from nested lists: image H rows of W grey
    levels 0..levels-1 (a one-channel model), mask H rows of W values 0 (keep) or 1 (regenerate)."""
    channels, height, width = shape
    if channels != 1:
        raise InpaintInputError(f"{names['image']}: grey levels as a list need a one-channel model; this one takes "
                                f"{channels} channels: send a PNG")
    arrays = []
    for value, name, top in ((image, names["image"], levels - 1), (mask, names["mask"], 1)):
        try:
            a = np.asarray(value, dtype=np.int64)
        except (ValueError, TypeError):
            a = None
        if a is None or a.ndim != 2:
            raise InpaintInputError(f"{name}: expected {height} rows of {width} integers")
        if a.shape != (height, width):
            raise InpaintInputError(f"{name}: {a.shape[1]}x{a.shape[0]} values, the model takes {width}x{height}; "
                                    f"give {height} rows of {width}")
        if a.min() < 0 or a.max() > top:
            raise InpaintInputError(f"{name}: values must be in 0..{top}"
                                    + (" (1: regenerate, 0: keep)" if top == 1 else " (the model's grey levels)")
                                    + f", got {int(a.min() if a.min() < 0 else a.max())}")
        arrays.append(a)
    pixels, keep = arrays[0].astype(np.uint8)[None], (arrays[1] == 0)[None]
    check_inpaint(pixels.shape, keep, names)
    return pixels, keep
