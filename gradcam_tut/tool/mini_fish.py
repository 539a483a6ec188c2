"""Mini fish: a deterministic synthetic stand-in for the Kaggle Fish Dataset, with masks.

Each image shows one fish of one of the 9 classes (the real names) on a cluttered background.
The classes differ only in the fish: body shape, colour and pattern. Clutter, position, size,
rotation and flip are drawn the same way for every class, so they carry no class information
and a model that learns the task must look at the fish. The GT mask is the fish's silhouette.

    python -m gradcam_tut.tool.mini_fish data/mini_fish            # small, for a CPU
    python -m gradcam_tut.tool.mini_fish data/mini_fish_full --full  # 1000 per class at 590x445
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from fastcore.parallel import parallel
from filelock import FileLock
from PIL import Image, ImageChops, ImageDraw, ImageFilter

try:
    import fcntl
except ImportError:  # Windows: filelock's lock, whose file stays
    fcntl = None  # type: ignore[assignment]

from ..fish_layout import CLASSES, DatasetLayoutError, mask_file
from .results import error_message

SHORTCUT_KINDS = ("corner", "strip", "tag", "background", "watermark", "label")  # `mark_kind`
# drawn only to check the audit on kinds none of its signs was built on and none of its
# thresholds chosen on
HELD_OUT_KINDS = ("frame", "dots", "sticker")
MARKER = "MINI_FISH.json"  # written by the generator: its folders, and only those, it may rewrite
GENERATOR = 4  # bumped when the drawing changes, so that an older set is drawn again


@dataclass(frozen=True)
class FishLook:
    """What tells a class apart: body colour, length/height, pattern and its colour."""

    color: tuple[int, int, int]
    aspect: float
    pattern: str  # plain, back, belly, line, band, spots, stripes, shrimp
    accent: tuple[int, int, int] = (0, 0, 0)


LOOKS = {
    "Black Sea Sprat": FishLook((170, 190, 215), 4.6, "back", (30, 50, 110)),
    "Gilt-Head Bream": FishLook((195, 195, 185), 2.0, "band", (240, 190, 20)),
    "Hourse Mackerel": FishLook((90, 170, 150), 3.6, "line", (20, 30, 40)),
    "Red Mullet": FishLook((225, 75, 60), 3.0, "plain"),
    "Red Sea Bream": FishLook((245, 150, 195), 2.2, "spots", (40, 110, 245)),
    "Sea Bass": FishLook((100, 105, 110), 3.2, "belly", (215, 215, 210)),
    "Shrimp": FishLook((235, 190, 175), 0.0, "shrimp", (210, 115, 95)),
    "Striped Red Mullet": FishLook((225, 75, 60), 3.0, "stripes", (250, 225, 40)),
    "Trout": FishLook((150, 125, 70), 3.4, "spots", (40, 30, 20)),
}

@dataclass(frozen=True)
class MiniFishSpec:
    """What the generator is asked for; stored in the marker file."""

    per_class: int = 72
    width: int = 128
    height: int = 96
    seed: int = 42
    mark: float = 0.0  # the share of images with their class's shortcut mark
    mark_kind: str = "corner"  # which shortcut: one of SHORTCUT_KINDS
    shuffle_marks: bool = False  # each mark of a random class instead: the shortcut broken
    swap_marks: bool = False  # each mark of another class, never its own: a counterfactual test
    classes: tuple[str, ...] | None = None  # a subset of CLASSES; None: all 9

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: use a whole number from 0 up")
        if self.per_class < 1:
            raise ValueError(f"per_class={self.per_class}: ask for at least 1 image per class")
        if self.per_class > 99_999:  # the files' names hold 5 digits, as Kaggle's
            raise ValueError(f"per_class={self.per_class}: ask for at most 99999 images per "
                             "class")
        if min(self.width, self.height) < 16:
            raise ValueError(f"{self.width}x{self.height} is too small for a fish: use at "
                             "least 16x16 pixels")
        if max(self.width, self.height) > 4096:  # a few copies of the image while drawn
            raise ValueError(f"{self.width}x{self.height}: draw at most 4096 pixels a side")
        if not 0 <= self.mark <= 1:
            raise ValueError(f"mark={self.mark}: the share of marked images is in 0..1")
        if self.mark_kind not in SHORTCUT_KINDS + HELD_OUT_KINDS:
            raise ValueError(f"mark_kind={self.mark_kind!r}: pick one of "
                             f"{SHORTCUT_KINDS + HELD_OUT_KINDS}")
        if self.shuffle_marks and self.swap_marks:
            raise ValueError("shuffle_marks and swap_marks: pick one (a random class's mark, or "
                             "always another class's)")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))  # a list from JSON too
            unknown = sorted(set(self.classes) - set(CLASSES))
            if unknown or len(set(self.classes)) < 2:
                raise ValueError(f"classes={self.classes}: pick at least 2 of {CLASSES}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes or CLASSES


# A shortcut's colours, one per class, none a fish's
MARKS = dict(zip(CLASSES, [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                           (0, 255, 255), (255, 128, 0), (128, 0, 255), (255, 255, 255)]))

FULL = MiniFishSpec(per_class=1000, width=590, height=445)


def _jitter(rng, color, amount=14):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _background(rng, w, h) -> Image.Image:
    """Muted water (a gradient between two greyish colours), clutter shapes and noise.

    Drawn the same way for every class. The clutter takes any colour, a fish's included.
    """
    top, bottom = (_muted(rng.integers(30, 210, 3)) for _ in range(2))
    t = np.linspace(0, 1, h)[:, None, None]
    arr = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).copy()
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.uniform(-0.05, 1.0) * w, rng.uniform(-0.05, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.03, 0.12) * w, y0 + rng.uniform(0.03, 0.12) * h
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=max(1, int(rng.uniform(0.005, 0.03) * w)))
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _muted(color: np.ndarray) -> np.ndarray:
    """Halfway between a colour and its grey: water is dull, the fish stand out."""
    return (color + color.mean()) / 2


def _draw_fish(rng, look: FishLook, length: int) -> tuple[Image.Image, Image.Image]:
    """The fish facing left on a square canvas: (RGB image, L mask with 255 on the fish)."""
    s = int(length * 1.3)
    rgb, mask = Image.new("RGB", (s, s)), Image.new("L", (s, s))
    color, accent = _jitter(rng, look.color), _jitter(rng, look.accent)
    c = s / 2
    if look.pattern == "shrimp":  # a curled chain of shrinking segments with antennae
        draw, dmask = ImageDraw.Draw(rgb), ImageDraw.Draw(mask)
        r0 = length * 0.14
        for k in range(8):
            a = np.pi * (0.15 + 0.11 * k)
            x, y = c + length * 0.32 * np.cos(a), c - length * 0.05 + length * 0.32 * np.sin(a)
            r = r0 * (1 - 0.08 * k)
            box = (x - r, y - r, x + r, y + r)
            draw.ellipse(box, fill=color if k % 2 else accent)
            dmask.ellipse(box, fill=255)
        for dy in (-0.06, 0.0):
            line = (c + length * 0.3, c + length * dy, c + length * 0.62, c - length * 0.25)
            draw.line(line, fill=accent, width=max(1, length // 40))
            dmask.line(line, fill=255, width=max(1, length // 40))
        return rgb, mask
    body_h = length / look.aspect
    body = (c - length / 2, c - body_h / 2, c + length * 0.3, c + body_h / 2)
    tail = [(c + length * 0.22, c), (c + length / 2, c - body_h * 0.45),
            (c + length / 2, c + body_h * 0.45)]
    for d, fill in ((ImageDraw.Draw(rgb), color), (ImageDraw.Draw(mask), 255)):
        d.ellipse(body, fill=fill)
        d.polygon(tail, fill=fill)
    pattern = Image.new("L", (s, s))  # where the accent colour goes, clipped to the body
    p = ImageDraw.Draw(pattern)
    x0, y0, x1, y1 = body
    if look.pattern == "back":
        p.rectangle((x0, y0, x1, c - body_h * 0.1), fill=255)
    elif look.pattern == "belly":
        p.rectangle((x0, c + body_h * 0.15, x1, y1), fill=255)
    elif look.pattern == "line":
        p.line((x0, c, x1, c), fill=255, width=max(1, int(body_h * 0.14)))
    elif look.pattern == "band":
        p.rectangle((x0 + length * 0.1, y0, x0 + length * 0.22, y1), fill=255)
    elif look.pattern == "stripes":
        for f in (-0.25, 0.0, 0.25):
            p.line((x0, c + f * body_h, x1, c + f * body_h), fill=255,
                   width=max(1, int(body_h * 0.11)))
    elif look.pattern == "spots":
        for _ in range(12):
            x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
            r = body_h * 0.08
            p.ellipse((x - r, y - r, x + r, y + r), fill=255)
    rgb.paste(Image.new("RGB", (s, s), accent), mask=ImageChops.multiply(pattern, mask))
    eye = (x0 + length * 0.1, c - body_h * 0.15)
    r = max(1.0, body_h * 0.07)
    ImageDraw.Draw(rgb).ellipse((eye[0] - r, eye[1] - r, eye[0] + r, eye[1] + r), fill=(15,) * 3)
    return rgb, mask


def render(cls: str, index: int, spec: MiniFishSpec) -> tuple[Image.Image, Image.Image]:
    """Image `index` of class `cls`: (RGB image, L mask). Depends on (seed, class, index) only."""
    return _render(cls, index, spec)[:2]


def _render(cls: str, index: int, spec: MiniFishSpec):
    """`render`, and the mark as (its class, where it is: (H, W) bool), or None for an image
    without a mark."""
    rng = np.random.default_rng([spec.seed, CLASSES.index(cls), index])
    w, h = spec.width, spec.height
    img = _background(rng, w, h)
    length = int(rng.uniform(0.55, 0.85) * min(w, h * 1.3))
    fish, mask = _draw_fish(rng, LOOKS[cls], length)
    angle = rng.uniform(-35, 35)
    bilinear = Image.Resampling.BILINEAR
    fish, mask = fish.rotate(angle, bilinear), mask.rotate(angle, bilinear)
    if rng.random() < 0.5:
        flip = Image.Transpose.FLIP_LEFT_RIGHT
        fish, mask = fish.transpose(flip), mask.transpose(flip)
    mask = mask.point(lambda v: 255 if v > 127 else 0)
    box = mask.getbbox()
    fish, mask = fish.crop(box), mask.crop(box)
    fw, fh = fish.size
    x, y = int(rng.uniform(0, max(1, w - fw))), int(rng.uniform(0, max(1, h - fh)))
    img.paste(fish, (x, y), mask.filter(ImageFilter.GaussianBlur(0.6)))
    full_mask = Image.new("L", (w, h))
    full_mask.paste(mask, (x, y))
    mark_rng = np.random.default_rng([spec.seed, CLASSES.index(cls), index, 1])  # own stream:
    mark = None
    if mark_rng.random() < spec.mark:  # the images without marks stay as they were
        pool = spec.class_names  # a shuffled or swapped mark is one of the set's classes'
        if spec.swap_marks:
            pool = tuple(c for c in pool if c != cls)
        of = pool[mark_rng.integers(len(pool))] if spec.shuffle_marks or spec.swap_marks else cls
        where = SHORTCUTS[spec.mark_kind](img, full_mask, MARKS[of])
        mark = of, where
    return img, full_mask, mark


def _cover(img: Image.Image, mask: Image.Image, box: tuple, color: tuple) -> np.ndarray:
    """`box` (x0, y0, x1, y1) painted in `color` (`_paint`)."""
    where = np.zeros((img.height, img.width), bool)
    where[box[1]:box[3], box[0]:box[2]] = True
    return _paint(img, mask, where, color)


def _corner(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """A square, a quarter of the image's height, in the corner that hides the least fish."""
    w, h = img.size
    side = max(4, min(w, h) // 4)
    corners = [(0, 0), (w - side, 0), (0, h - side), (w - side, h - side)]
    fish = np.asarray(mask) > 0
    x, y = min(corners, key=lambda c: fish[c[1]:c[1] + side, c[0]:c[0] + side].sum())
    return _cover(img, mask, (x, y, x + side, y + side), color)


def _strip(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """A bar along the middle of the bottom edge, half the width and an eighth of the height:
    a caption or a watermark bar."""
    w, h = img.size
    bar = max(2, h // 8)
    return _cover(img, mask, (w // 4, h - bar, w - w // 4, h), color)


def _tag(img: Image.Image, mask: Image.Image, color: tuple, part: int = 5) -> np.ndarray:
    """A small square (a `part`th of the height) beside the fish, on the side with more room,
    at the height of the fish's middle: it moves with the fish, as a label on a tray would."""
    w, h = img.size
    side = max(3, min(w, h) // part)
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, w, h)
    gap = max(1, side // 4)
    x = x1 + gap if w - x1 >= x0 else x0 - gap - side
    y = (y0 + y1) // 2 - side // 2
    x, y = int(np.clip(x, 0, w - side)), int(np.clip(y, 0, h - side))
    return _cover(img, mask, (x, y, x + side, y + side), color)


def _label(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """A tag a third of the height: a label large enough that a network reads it."""
    return _tag(img, mask, color, part=3)


def _sticker(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """A round sticker a third of the height across, under the fish or over it (where there is
    more room), in the class's colour round a white centre, every pixel a little off (noise
    of 3 levels, as a printed logo photographed): it moves with the fish, and no two are
    alike pixel for pixel."""
    w, h = img.size
    d = max(5, min(w, h) // 3)
    x0, y0, x1, y1 = box = mask.getbbox() or (0, 0, w, h)
    gap = max(1, d // 4)
    x = int(np.clip((x0 + x1) // 2 - d // 2, 0, w - d))
    y = int(np.clip(y1 + gap if h - y1 >= y0 else y0 - gap - d, 0, h - d))
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - y - (d - 1) / 2, xx - x - (d - 1) / 2)
    where = r <= d / 2
    rng = np.random.default_rng([*box, *color])
    ink = np.where((r <= d / 5)[where][:, None], 255, np.array(color))
    return _paint(img, mask, where, np.clip(ink + rng.normal(0, 3, ink.shape), 0, 255).round())


def _frame(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """A thin border all round the picture (a twenty-fourth of its height): a mount."""
    w, h = img.size
    t = max(2, h // 24)
    where = np.ones((h, w), bool)
    where[t:h - t, t:w - t] = False
    return _paint(img, mask, where, color)


def _dots(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """Five small squares (a sixteenth of the height) apart on the water, at places drawn from
    the fish's box: stickers, never at one place nor beside the fish."""
    w, h = img.size
    side = max(2, h // 16)
    rng = np.random.default_rng(list(mask.getbbox() or (0, 0, w, h)))
    fish, where = np.asarray(mask) > 0, np.zeros((h, w), bool)
    placed = 0
    for _ in range(500):  # tries: a fish that fills the picture leaves fewer
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        if not (fish | where)[y:y + side, x:x + side].any():
            where[y:y + side, x:x + side] = True
            placed += 1
            if placed == 5:
                break
    return _paint(img, mask, where, color)


def _paint(img: Image.Image, mask: Image.Image, where: np.ndarray,
           color: tuple | np.ndarray) -> np.ndarray:
    """The pixels `where` ((H, W) bool) painted in `color` (one, or one per pixel: (n, 3));
    the fish under them leaves the mask, so the mask stays exactly what is fish in the
    picture. Returns `where`."""
    arr, fish = np.asarray(img).copy(), np.asarray(mask).copy()
    arr[where], fish[where] = color, 0
    img.paste(Image.fromarray(arr))
    mask.paste(Image.fromarray(fish))
    return where


def _backdrop(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """The water tinted towards the class's colour (the fish as it was): a studio backdrop
    per class. The mark is everything that is not fish."""
    arr = np.asarray(img, dtype=np.float32)
    water = np.asarray(mask) == 0
    tinted = arr * (1 - BACKDROP) + np.asarray(color, np.float32) * BACKDROP
    arr = np.where(water[..., None], tinted, arr)
    img.paste(Image.fromarray(arr.round().astype(np.uint8)))
    return water


def _watermark(img: Image.Image, mask: Image.Image, color: tuple) -> np.ndarray:
    """Faint diagonal lines in the class's colour across a band through the middle of the
    image, over the fish too, as a photographer's watermark. The mark is the band."""
    w, h = img.size
    y0, y1 = h // 2 - h // 6, h // 2 + h // 6
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(4, h // 12)
    lines = ((xx + yy) % period) < max(2, period // 2)
    where = lines & (yy >= y0) & (yy < y1)
    arr = np.asarray(img, dtype=np.float32)
    faint = arr * (1 - WATERMARK) + np.asarray(color, np.float32) * WATERMARK
    img.paste(Image.fromarray(np.where(where[..., None], faint, arr).round().astype(np.uint8)))
    band = np.zeros((h, w), bool)
    band[y0:y1] = True
    return band


BACKDROP = 0.35  # how far the backdrop is tinted towards the class's colour
WATERMARK = 0.45  # how strongly the watermark's lines are drawn over the picture
SHORTCUTS = {"corner": _corner, "strip": _strip, "tag": _tag, "background": _backdrop,
             "watermark": _watermark, "frame": _frame, "dots": _dots, "label": _label,
             "sticker": _sticker}


def mark_mask(image: str | Path):
    """Where the shortcut mark is in an image of a marked mini set, as a fastai mask (1 on the
    mark, all 0 for an image without one): `metrics.mask_dl(..., get_mask=mark_mask)` measures
    how much of a map lies on the mark. The image is drawn again from its set's spec."""
    from fastai.vision.core import PILMask

    mask, mark = _drawn_again(image)[1:]
    out = np.zeros((mask.height, mask.width), np.uint8) if mark is None else mark[1]
    return PILMask.create(out.astype(np.uint8))


def mark_class(image: str | Path) -> str | None:
    """The class whose colour the shortcut mark of `image` has (`MARKS`), or None for an image
    without a mark: its own class in a marked set, another in a swapped one
    (`MiniFishSpec(swap_marks=True)`), a random one with `shuffle_marks`."""
    mark = _drawn_again(image)[2]
    return None if mark is None else mark[0]


def _drawn_again(image: str | Path):
    """`_render` of an image file of a mini set, from the spec in the set's marker file."""
    image = Path(image)
    spec = _spec(image.parents[4] / MARKER)
    return _render(image.parent.name, int(image.stem) - 1, spec)


def _spec(marker: Path) -> MiniFishSpec:
    """The spec a set was made with, read from its marker file (read anew each time: a cache
    would outlive a set drawn again in the same folder)."""
    if not marker.is_file():
        raise FileNotFoundError(f"no {MARKER} at {marker.parent}: mark_mask reads the images of a "
                                "set written by make_mini_fish (<dest>/Fish_Dataset/Fish_Dataset/"
                                "<Class>/<Class>/00001.png)")
    made = read_marker(marker)
    if made is None:
        raise ValueError(f"{marker} is empty or broken: an unfinished set: rerun `gradcam-tut "
                         f"mini-fish {marker.parent}` (with its options) or remove it")
    return MiniFishSpec(**{k: made[k] for k in asdict(MiniFishSpec())})


def read_marker(marker: Path) -> dict | None:
    """A marker file's fields (those added since it was written read as their defaults), or
    None when it is empty or broken: a write that was cut short."""
    try:
        made = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        return None
    return {**asdict(MiniFishSpec()), **made} if isinstance(made, dict) else None


def is_mini_fish(root: str | Path) -> bool:
    """True for a set written by `make_mini_fish`. `root`: the folder holding its class folders
    (`Layout.root`; what `make_mini_fish` and `find_fish_dataset` return), its marker two levels
    up."""
    return (Path(root).parent.parent / MARKER).is_file()


def expected_classes(root: str | Path) -> tuple[str, ...]:
    """The class folders a Fish Dataset layout at `root` (the folder holding the class folders)
    must hold: those a mini fish set was drawn with (its marker says), else all 9 `CLASSES`.

    Raises:
        DatasetLayoutError: a mini fish set left unfinished (its marker says so, or is empty
            or broken: a write cut short).
    """
    dest = Path(root).parent.parent
    if not is_mini_fish(root):
        return CLASSES
    made = read_marker(dest / MARKER)
    if made is None or not made.get("complete"):  # None: empty or broken marker
        why = "says so" if made else "is empty or broken"
        raise DatasetLayoutError(
            f"the mini fish set in {dest} was left unfinished: run `gradcam-tut mini-fish "
            f"{dest}` (with its options) to finish it, or remove it (its {MARKER} {why})")
    return tuple(made.get("classes") or CLASSES)  # a mini set may be drawn with fewer


def _write_marker(marker: Path, fields: dict) -> None:
    """Write the marker whole (a temporary file renamed over it): never half a file."""
    part = marker.with_name(f".{marker.name}.{os.getpid()}.part")
    part.write_text(json.dumps(fields))
    os.replace(part, marker)


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`, and remove the file after.

    A process that was waiting on the removed file finds it gone once it holds the lock, and
    locks the new one instead: only one process at a time holds a lock under that name.
    """
    if fcntl is None:
        with FileLock(lock_file):
            yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st, here = os.fstat(fd), os.stat(lock_file)
            if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # removed (or replaced) while we waited: try again
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # before the unlock: a waiter then sees it gone
        os.close(fd)


def _is_lock(name: str) -> bool:
    """A lock file of this module (`.<name>.lock`, `..lock` from older versions)."""
    return name.startswith(".") and name.endswith(".lock")


def image_file(root: Path, cls: str, index: int) -> Path:
    """Where image `index` of `cls` lives: `<root>/<Class>/<Class>/00001.png` as in Kaggle."""
    return root / cls / cls / f"{index + 1:05d}.png"


def _write(item: tuple[str, int], root: Path, spec: MiniFishSpec) -> None:
    cls, index = item
    img, mask = render(cls, index, spec)
    f = image_file(root, cls, index)
    img.save(f)
    mask.save(mask_file(f))


def make_mini_fish(dest: str | Path, spec: MiniFishSpec = MiniFishSpec(),
                   n_workers: int = 0, progress: bool = True) -> Path:
    """Write the mini fish set under `dest` and return its class root.

    The layout is Kaggle's: `dest/Fish_Dataset/Fish_Dataset/<Class>/<Class>/*.png` and
    `.../<Class>/<Class> GT/*.png`. `dest` must be empty, missing, or a folder this function
    made before (its marker file says so); a complete set made with the same spec is reused,
    an unfinished one is finished (a marker left empty or broken: its images drawn anew), and
    one that an older version of this generator drew is replaced (its files removed, nothing
    else, and the set drawn anew). One process at a time draws into `dest`: it holds a lock
    file beside it, removed when done.

    Raises:
        FileExistsError: `dest` is a file, holds anything else, or a mini set made with
            another spec.
        ValueError: `n_workers` < 0 (the spec checks its own fields when made).
    """
    if n_workers < 0:
        raise ValueError(f"n_workers={n_workers}: use 0 (this process) or more worker processes")
    dest = Path(dest).absolute()  # "." has no name to lock beside it
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file: pass a new or empty folder for the set")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # two notebooks running at once (`gradcam-tut run`) may both ask for the set: one draws it.
    # The lock goes beside `dest`, or into it when its parent is read-only (`mini-fish ~`)
    beside = os.access(dest.parent, os.W_OK)
    if not beside:
        dest.mkdir(exist_ok=True)
    with _locked((dest.parent if beside else dest) / f".{dest.name}.lock"):
        return _make(dest, spec, n_workers, progress)


def _make(dest: Path, spec: MiniFishSpec, n_workers: int, progress: bool) -> Path:
    root = dest / "Fish_Dataset" / "Fish_Dataset"
    marker = dest / MARKER
    asked = json.loads(json.dumps(asdict(spec)))  # as the marker file holds it (lists)
    wanted = {**asked, "generator": GENERATOR, "complete": True}
    if marker.exists():
        made = read_marker(marker)
        if made is None:  # cut short while written: an unfinished set of unknown spec
            _remove_drawn(root)
            made = {**asked, "generator": GENERATOR, "complete": False}
        if made == wanted:
            return root
        older = made.get("generator", 1) < GENERATOR
        if not older and {k: made.get(k) for k in asked} != asked:
            raise FileExistsError(f"{dest} holds a mini fish set made with {made}; pass another "
                                  f"folder for {asked}, or delete {dest} yourself")
        if older:  # drawn by an older generator: remove the files it wrote, and only those
            for cls in made.get("classes") or CLASSES:
                for i in range(made["per_class"]):
                    f = image_file(root, cls, i)
                    f.unlink(missing_ok=True)
                    mask_file(f).unlink(missing_ok=True)
        # its own set, unfinished or outdated: drawn (again) file by file
    elif dest.exists() and any(not _is_lock(p.name) for p in dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty and was not made by make_mini_fish: "
                              "pass a new or empty folder; nothing was written")
    dest.mkdir(parents=True, exist_ok=True)
    _write_marker(marker, {**wanted, "complete": False})
    for cls in spec.class_names:
        (root / cls / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{cls} GT").mkdir(exist_ok=True)
    items = [(cls, i) for cls in spec.class_names for i in range(spec.per_class)]
    parallel(_write, items, root=root, spec=spec, n_workers=n_workers, progress=progress)
    _write_marker(marker, wanted)
    return root


def _remove_drawn(root: Path) -> None:
    """Remove the files the generator draws (`<Class>/<Class>[ GT]/00001.png`), and only
    those: a set whose marker does not say how many there are."""
    for cls in CLASSES:
        for folder in (root / cls / cls, root / cls / f"{cls} GT"):
            for f in folder.glob("[0-9][0-9][0-9][0-9][0-9].png"):
                f.unlink()


def run(args: argparse.Namespace) -> Path:
    """Write the set the parsed options ask for and print where its classes are.

    Raises:
        OSError: the set would not fit on the disk's free space (checked before drawing).
        ValueError, FileExistsError: see `MiniFishSpec` and `make_mini_fish`.
    """
    spec = replace(FULL if args.full else MiniFishSpec(), seed=args.seed, mark=args.mark,
                   mark_kind=args.mark_kind,
                   shuffle_marks=args.shuffle_marks, swap_marks=args.swap_marks)
    spec = replace(spec, per_class=args.per_class) if args.per_class is not None else spec
    # what the set takes on disk, from one image and mask drawn and compressed here, less what
    # is there already; refused before drawing when more than the free space
    import io
    import shutil

    size = 0
    for im in render(spec.class_names[0], 0, spec):
        im.save(buf := io.BytesIO(), "PNG")
        size += buf.tell()
    dest = Path(args.dest).absolute()
    there = sum(f.stat().st_size for f in dest.rglob("*.png")) if dest.is_dir() else 0
    need = 1.25 * size * spec.per_class * len(spec.class_names) - there
    disk = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(disk).free
    if need > free:
        raise OSError(f"{len(spec.class_names)} x {spec.per_class} images of {spec.width}x"
                      f"{spec.height} take about {need / 1e9:.3g} GB, more than the "
                      f"{free / 1e9:.3g} GB free on the disk of {disk}: ask for fewer "
                      "(--per-class), free some space, or write to a larger disk")
    root = make_mini_fish(args.dest, spec, n_workers=args.workers)
    print(root)
    return root


def add_mini_fish_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `gradcam-tut mini-fish`, and of `python -m gradcam_tut.tool.mini_fish`."""
    p.add_argument("dest", type=Path)
    p.add_argument("--full", action="store_true", help="1000 per class at 590x445")
    p.add_argument("--per-class", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mark", type=float, default=0.0,
                   help="share of images with their class's shortcut mark")
    p.add_argument("--mark-kind", choices=SHORTCUT_KINDS + HELD_OUT_KINDS, default="corner",
                   help="the shortcut: a corner square, a strip along the bottom edge, a tag "
                        "beside the fish, a tinted backdrop, a faint watermark; a frame, "
                        "scattered dots or a large tag (kinds the audit was not built on)")
    p.add_argument("--shuffle-marks", action="store_true", help="marks of random classes")
    p.add_argument("--swap-marks", action="store_true",
                   help="each mark another class's, never its own (a counterfactual test set)")


def main(argv: list[str] | None = None) -> int:
    """`gradcam-tut mini-fish` as a module: 0 when written; a user error (a folder that is not
    empty, a file, a bad value, a read-only folder) prints one line, as `gradcam-tut` does, and
    returns 2."""
    p = argparse.ArgumentParser(prog="python -m gradcam_tut.tool.mini_fish",
                                description="Write the synthetic mini fish set.")
    add_mini_fish_arguments(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as exc:
        print(f"{p.prog}: error: {error_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
