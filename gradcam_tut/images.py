"""Images as this package reads them: decoded as a viewer shows them (EXIF orientation, 16- and
32-bit grey scaled to 8 bits), and fastai's image and mask types made that way. (The check that
every file of a folder decodes is the tool's: `tool/decode_check.py`.)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from fastai.vision.core import PILImage, PILMask
from PIL import ExifTags, Image, ImageOps

from .fish_layout import mask_file

INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
BACKGROUND = (255, 255, 255)  # under transparent pixels, as a viewer shows them
BUDGET_VAR = "GRADCAM_TUT_MAX_MEGAPIXELS"  # the largest image decoded, in millions of pixels
DEFAULT_BUDGET = 64  # an 8000 x 8000 photo; a 16-bit scan of that size takes about 2 GB


class ImageTooLarge(ValueError):
    """An image whose decoded pixels would exceed the memory budget."""


def pixel_budget() -> float:
    """The most megapixels an image may have: $GRADCAM_TUT_MAX_MEGAPIXELS, default 64.

    Raises:
        ValueError: the variable is not a positive number.
    """
    text = os.environ.get(BUDGET_VAR, str(DEFAULT_BUDGET))
    try:
        budget = float(text)
    except ValueError:
        budget = 0.0
    if not budget > 0:
        raise ValueError(f"{BUDGET_VAR}={text!r}: set it to a positive number of megapixels")
    return budget


def check_pixels(im: Image.Image, name) -> None:
    """Refuse an image, from its header, before its pixels are decoded, when it has more
    pixels than `pixel_budget()` (a small file can decode to gigabytes).

    Raises:
        ImageTooLarge: naming the image, its size, the budget and how to raise it.
    """
    w, h = im.size
    budget = pixel_budget()
    if w * h > budget * 1e6:
        raise ImageTooLarge(f"{name} is {w}x{h}, {w * h / 1e6:.0f} megapixels, over the budget "
                            f"of {budget:g} megapixels that keeps decoding within memory: "
                            f"shrink it, or raise the budget with {BUDGET_VAR}=<megapixels>")


def shown_size(image: str | Path | Image.Image) -> tuple[int, int]:
    """(width, height) of an image as a viewer shows it (turned by its EXIF orientation),
    read from the file's header."""
    if not isinstance(image, Image.Image):
        with Image.open(image) as im:
            return shown_size(im)
    w, h = image.size
    turned = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (h, w) if turned else (w, h)


def _opened(fn: str | os.PathLike | Image.Image) -> Image.Image:
    """The picture as a viewer shows it, loaded: turned by its EXIF orientation."""
    if isinstance(fn, Image.Image):
        return ImageOps.exif_transpose(fn)  # a copy, turned or not
    with Image.open(fn) as im:
        check_pixels(im, fn)  # from the header, before the pixels are decoded
        return ImageOps.exif_transpose(im)


def _to_8_bits(im: Image.Image, name) -> Image.Image:
    """A grey image of 16 or 32 bits ("I;16", "I", "F") as 8-bit grey ("L").

    16-bit integers are divided by 257 (65535 -> 255); 32-bit integers by the depth their
    values fit (0..255: 8-bit values stored in 32 bits, kept; 0..65535: divided by 257);
    floats in 0..1 are multiplied by 255. Anything else (negative values, integers above
    65535, floats outside 0..1) is scaled from its minimum to its maximum, with a warning.
    """
    a = np.asarray(im, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if im.mode in INT16_MODES or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif not (im.mode == "I" and lo >= 0 and hi <= 255):
        fits = "0..1" if im.mode == "F" else "16 bits (0..65535)"
        warnings.warn(f"{name}: its {im.mode} values {lo:g}..{hi:g} do not fit {fits}: "
                      "scaled from their minimum to their maximum; save it as 8 or 16 bits "
                      "to be sure of its brightness", stacklevel=3)
        a = (a - lo) / (hi - lo) * 255 if hi > lo else a * 0
    return Image.fromarray(a.clip(0, 255).round().astype(np.uint8))


def load_rgb(fn: str | os.PathLike | Image.Image) -> Image.Image:
    """An image file (or PIL image) as 8-bit RGB, as a viewer shows it.

    Turned by its EXIF orientation (`ImageOps.exif_transpose`), 16- and 32-bit grey scaled
    to 8 bits by their bit depth or range (`_to_8_bits`): PIL's `convert("RGB")`, which
    fastai's `PILImage` uses, clips them, so a 16-bit scan turns white and a float image of
    0..1 black. Transparent pixels are laid over `BACKGROUND` (white), as a viewer shows
    them: `convert("RGB")` drops the alpha and shows the colours hidden under it.

    Raises:
        ImageTooLarge: more pixels than `pixel_budget()`.
    """
    im = _opened(fn)
    if im.mode in (*INT16_MODES, "I", "F"):
        im = _to_8_bits(im, getattr(fn, "filename", "") or fn)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND), im.convert("RGBA"))
    return im.convert("RGB")


class RGBImage(PILImage):
    """fastai's `PILImage`, made from a file or PIL image with `load_rgb` (EXIF orientation
    applied, 16- and 32-bit grey scaled)."""

    @classmethod
    def create(cls, fn: Path | str | torch.Tensor | np.ndarray | bytes | Image.Image, **kwargs):
        # the annotation tells fastai's `test_dl` which items enter here (as PILImage's does)
        if isinstance(fn, (str, os.PathLike, Image.Image)):
            return cls(load_rgb(fn))
        return super().create(fn, **kwargs)


def pair_message(image: Path, mask: Path, image_size: tuple, mask_size: tuple) -> str:
    """One line naming an image and a mask of different sizes, and the fix."""
    def wxh(size):
        return "x".join(map(str, size)) or "?"
    return (f"the mask {mask} is {wxh(mask_size)} pixels but its image {image} is "
            f"{wxh(image_size)}: save the mask at its image's size")


def fish_mask(image_file: Path) -> PILMask:
    """The image's GT mask as a fastai mask: 0 background, 1 fish.

    Any value above 0 is fish, so masks saved as 0/1 and as 0/255 read alike; the mask is
    turned by its EXIF orientation, as its image is.

    Raises:
        ValueError: the mask's size is not its image's; the message names both files.
    """
    image_file = Path(image_file)
    mask = _opened(mask_file(image_file))
    if mask.mode not in ("1", "L", "P", "I", "F", *INT16_MODES):  # P: palette indices
        mask = mask.convert("L")
    if mask.size != shown_size(image_file):
        raise ValueError(pair_message(image_file, mask_file(image_file),
                                      shown_size(image_file), mask.size))
    return PILMask.create((np.asarray(mask) > 0).astype(np.uint8))
