"""Super-resolution without torch: the low-res image a model is trained on and the one a user gives.

    lowres = downsample(levels, factor=2, levels=17)                  # (N, H, W) -> (N, H/2, W/2) grey levels
    lowres = downsample_images(rgb, factor=2, n_levels=16)            # (N, H, W, 3) -> (N, H/2, W/2, 3)
    lowres = read_upscale_input(png, (1, 8, 8), factor=2, levels=17)  # a user's 4x4 image, (1, 4, 4)
    lowres = upscale_levels(rows, (1, 8, 8), factor=2, levels=17)     # 4 rows of 4 grey levels, (1, 4, 4)

A training image's low-res version is the mean of each factor x factor block, rounded to the
data's grey levels: what a user's small PNG becomes when the data pipeline reads it
(components.data.quantise_grey), so training and `genflow sample --upscale` see the same kind of
input. The network upsamples it itself (components/models/srunet.py); the denoising loop is
diffusion.sample_loop with the low-res image bound into the noise prediction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from components.sampling.requests import SamplingRequestError

UPSCALE_FLAG = "--upscale"


class SuperResInputError(SamplingRequestError):
    """A super-resolution input that cannot be honoured (size, channels, file); the message names it."""


def check_factor(image_size: int, factor: int, where: str = "condition.factor") -> int:
    """The low-res size image_size / factor; one line when factor is below 2 or does not divide image_size."""
    if factor < 2:
        raise SuperResInputError(f"{where}: must be at least 2 (the low-res image is image_size / factor "
                                 f"pixels a side), got {factor}")
    if image_size % factor != 0:
        raise SuperResInputError(f"{where}: image_size {image_size} is not divisible by {factor}, so there is no "
                                 f"{factor}x smaller image; use an image_size divisible by {factor}")
    return image_size // factor


def downsample(levels: np.ndarray, factor: int, n_levels: int) -> np.ndarray:
    """Grey levels (..., H, W) -> (..., H/f, W/f): each f x f block's mean, rounded to a grey level (uint8)."""
    levels = np.asarray(levels)
    *lead, H, W = levels.shape
    check_factor(H, factor, "downsample: height")
    check_factor(W, factor, "downsample: width")
    blocks = levels.astype(np.float64).reshape(*lead, H // factor, factor, W // factor, factor)
    return np.clip(np.rint(blocks.mean(axis=(-3, -1))), 0, n_levels - 1).astype(np.uint8)


def downsample_images(images: np.ndarray, factor: int, n_levels: int) -> np.ndarray:
    """Images (N, H, W) grey or (N, H, W, C) colour -> (N, H/f, W/f[, C]): `downsample` per channel."""
    images = np.asarray(images)
    if images.ndim == 4:   # channels last: the blocks are over H and W of every channel
        return np.ascontiguousarray(np.moveaxis(downsample(np.moveaxis(images, -1, 1), factor, n_levels), 1, -1))
    return downsample(images, factor, n_levels)


def read_upscale_input(source: Union[Path, bytes], shape: tuple[int, int, int], factor: int, levels: int,
                       resize: bool = False, model: str = "this model", flag: str = UPSCALE_FLAG,
                       resize_flag: Optional[str] = "--resize") -> np.ndarray:
    """A low-res image (a file, or the bytes of one: a PNG sent to `genflow serve`) as grey levels
    (C, H/f, W/f) uint8 for a model of output `shape` (C, H, W).

    Refused in one line: a file that is not an image, another channel count, another size than
    1/factor of the model's (unless resize: then centre-cropped and resized like an imagefolder image;
    resize_flag None: no such option, as over HTTP).
    """
    from components.data import quantise_grey, square_resize
    from components.sampling.inpaint import input_name, open_with_channels

    channels, height, width = shape
    h, w = check_factor(height, factor), check_factor(width, factor)
    if not isinstance(source, (bytes, bytearray)):
        source = Path(source)
    im = open_with_channels(source, flag, channels, SuperResInputError)
    if im.size != (w, h):
        if not resize:
            raise SuperResInputError(f"{input_name(source, flag)}: {im.size[0]}x{im.size[1]} pixels; {model} upscales "
                                     f"{w}x{h} images to {width}x{height} (1/{factor} of its size); give a "
                                     f"{w}x{h} image" + (f" or add {resize_flag}" if resize_flag else ""))
        im = square_resize(im, w)
    pixels = quantise_grey(im.convert("L" if channels == 1 else "RGB"), levels)      # (h, w) or (h, w, C)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def upscale_levels(rows: Sequence, shape: tuple[int, int, int], factor: int, levels: int, model: str = "this model",
                   flag: str = UPSCALE_FLAG) -> np.ndarray:
    """A low-res image given as H/f rows of W/f grey levels 0..levels-1 (a one-channel model) as
    (1, H/f, W/f) uint8; another size, shape or value is refused in one line naming `flag`."""
    channels, height, width = shape
    h, w = check_factor(height, factor), check_factor(width, factor)
    if channels != 1:
        raise SuperResInputError(f"{flag}: grey levels as a list need a one-channel model; {model} takes "
                                 f"{channels} channels: send a PNG")
    try:
        a = np.asarray(rows, dtype=np.int64)
    except (ValueError, TypeError):
        a = None
    if a is None or a.ndim != 2:
        raise SuperResInputError(f"{flag}: expected {h} rows of {w} integers (grey levels 0..{levels - 1})")
    if a.shape != (h, w):
        raise SuperResInputError(f"{flag}: {a.shape[1]}x{a.shape[0]} values; {model} upscales {w}x{h} images to "
                                 f"{width}x{height} (1/{factor} of its size); give {h} rows of {w}")
    if a.min() < 0 or a.max() > levels - 1:
        raise SuperResInputError(f"{flag}: values must be in 0..{levels - 1} (the model's grey levels), got "
                                 f"{int(a.min() if a.min() < 0 else a.max())}")
    return a.astype(np.uint8)[None]
