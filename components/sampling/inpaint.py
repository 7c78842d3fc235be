"""The inputs of inpainting: an image and a mask file, read as the data pipeline reads images.

    levels, keep = read_inpaint_inputs(image_png, mask_png, (1, 8, 8), levels=17)

The image becomes grey levels 0..levels-1 exactly as components/data.py quantises a training
image; the mask is white where the image is regenerated, black where it is kept. A wrong size
is refused with the size expected, unless `resize` asks for the data pipeline's centre crop
and resize. The sampling itself is `diffusion.inpaint_loop`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from components.data import quantise_grey, square_resize
from components.sampling.diffusion import InpaintInputError, check_inpaint
from components.sampling.requests import FLAGS

MODE_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}


def open_image(path: Path, flag: str, error: type[Exception] = InpaintInputError):
    """The PIL image at `path` (EXIF orientation applied); `error` in one line naming `flag` and the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise error(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise error(f"{flag} {path}: not an image PIL can read") from None
    except Exception as e:  # truncated or corrupt files
        raise error(f"{flag} {path}: cannot be read ({str(e).splitlines()[0]})") from None


def open_with_channels(path: Path, flag: str, channels: int, error: type[Exception] = InpaintInputError):
    """open_image, refused in one line unless it has `channels` channels (a palette: its colours decide)."""
    im = open_image(path, flag, error)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    have = MODE_CHANNELS.get(im.mode, len(im.getbands()))
    if have != channels:
        want = "1 (grayscale)" if channels == 1 else str(channels)
        raise error(f"{flag} {path}: {have} channels ({im.mode}), the model takes {want}; convert the image")
    return im


def read_inpaint_inputs(image_path: Path, mask_path: Path, shape: tuple[int, int, int], levels: int,
                        resize: bool = False, names: Mapping[str, str] = FLAGS) -> tuple[np.ndarray, np.ndarray]:
    """(grey levels (C, H, W) uint8 in 0..levels-1, keep (C, H, W) bool) for a model of `shape` (C, H, W).

    Refused, each in one line: an image of another channel count, an image of another size
    (unless resize), a mask of another size than the image, a mask with nothing to fill.
    """
    from PIL import Image

    channels, height, width = shape
    im = open_with_channels(image_path, names["image"], channels)
    mask = open_image(mask_path, names["mask"])
    if mask.size != im.size:
        raise InpaintInputError(f"{names['mask']} {mask_path}: {mask.size[0]}x{mask.size[1]} pixels, the image is "
                                f"{im.size[0]}x{im.size[1]}; give a mask of the image's size")
    if im.size != (width, height):
        if not resize:
            raise InpaintInputError(f"{names['image']} {image_path}: {im.size[0]}x{im.size[1]} pixels, the model "
                                    f"takes {width}x{height}; give a {width}x{height} image or add --resize")
        im = square_resize(im, width)
        mask = square_resize(mask.convert("L"), width, Image.Resampling.BOX)
    pixels = quantise_grey(im.convert("L" if channels == 1 else "RGB"), levels)           # (H, W) or (H, W, C)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    regenerate = np.asarray(mask.convert("L"), dtype=np.uint8) >= 128                      # (H, W) white
    keep = np.broadcast_to(~regenerate, pixels.shape).copy()
    check_inpaint(pixels.shape, keep, names)
    return pixels, keep
