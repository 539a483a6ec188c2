"""The Kaggle "A Large Scale Fish Dataset" layout, or any folder of class folders: find it,
check it, list its images, load it.

    Fish_Dataset/Fish_Dataset/<Class>/<Class>/00001.png       the images
    Fish_Dataset/Fish_Dataset/<Class>/<Class> GT/00001.png    their masks (white fish on black)

`get_image_files` on that tree also returns the masks, and `parent_label` then makes 18 labels
out of 9 classes: the source article trained on both. Here images and masks are kept apart.

Your own data: any folder in fastai's `parent_label` layout, `<root>/<class>/<image>`, or with
`<root>/train/<class>/...` and `<root>/valid/<class>/...` for a fixed split; a `<class> GT` folder
holds masks, not a class; a folder inside a class folder is refused (its label would be unclear).

One listing (`listed_images`) serves training, `explain` and the checks: each real file once
(symlinks resolved, loops entered once), hidden and mask folders and earlier results skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import (
    GrandparentSplitter,
    RandomSplitter,
    image_extensions,
    parent_label,
)
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImage, PILMask
from fastai.vision.data import ImageBlock, MaskBlock
from fastcore.basics import noop
from fastcore.foundation import L
from fastprogress.fastprogress import progress_bar
from PIL import ExifTags, Image, ImageOps

from .fish_layout import CLASSES, mask_file
from .mini_fish import MARKER, make_mini_fish, read_marker

KAGGLE_HANDLE = "crowww/a-large-scale-fish-dataset"
KAGGLE_INPUT = Path("/kaggle/input/a-large-scale-fish-dataset")  # in a Kaggle notebook
ENV_VAR = "FISH_DATASET"


def project_dir(package: Path | None = None) -> Path:
    """Where `data/` and `runs/` go: the clone the package runs from (editable install), else
    the current folder, never inside site-packages. `package`: this package's folder."""
    repo = (package or Path(__file__).resolve().parent).parent
    return repo if (repo / "pyproject.toml").is_file() else Path.cwd()


PROJECT_DIR = project_dir()
DATA_DIR = PROJECT_DIR / "data"
HOW_TO_GET = (
    f"Download {KAGGLE_HANDLE} from Kaggle and unzip it into data/ (giving data/Fish_Dataset), "
    f"or set {ENV_VAR} to where it is, or `pip install kagglehub` with Kaggle credentials "
    "(~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) to download it; "
    "without it, the embedded mini fish set stands in (allow_mini=True)."
)


class DatasetLayoutError(ValueError):
    """The folder is not in the Fish Dataset layout; the message says what is wrong."""


def dataset_root(path: str | Path) -> Path:
    """The folder holding the class folders, from any nesting level the user points at.

    Accepts the download folder, `Fish_Dataset` or `Fish_Dataset/Fish_Dataset`.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder. {HOW_TO_GET}")
    for _ in range(2):
        if (path / "Fish_Dataset").is_dir():
            path = path / "Fish_Dataset"
    return path


# the files that mark a folder as a result of `explain` (results.MARKER is complete.json)
RESULT_FILES = frozenset({"explain.csv", "maps.npz", "complete.json", ".gradcam_tut_result"})


def _is_output(entries: list[os.DirEntry]) -> bool:
    """Whether a folder with these entries was written by this tool: an `explain` result, a
    run (its `figures/` beside `notebooks/` or `models/`) or a runs folder (`latest`)."""
    names = {e.name for e in entries}
    run = "figures" in names and bool({"notebooks", "models"} & names)
    runs = any(e.name == "latest" and e.is_symlink() for e in entries)
    return bool(names & RESULT_FILES) or run or runs


def is_output_folder(folder: str | Path) -> bool:
    """True for a folder this tool wrote (`_is_output`): never read back as input."""
    with os.scandir(folder) as it:
        return _is_output(list(it))


def _walk(root: Path) -> list[tuple[bool, str, str]]:
    """(through a link?, path as found, real path) of the image files under `root`.

    Hidden folders, `<x> GT` mask folders and output folders below `root` are skipped. Each real
    folder is entered once (a symlink loop is not followed again), and a link to a folder
    under `root` is not followed at all: that folder is listed under its own name.
    """
    top = os.path.realpath(root)
    todo, visited, found = [(str(root), top, False)], {top}, []
    while todo:
        shown, real, through = todo.pop()
        try:
            with os.scandir(shown) as it:
                entries = list(it)
        except PermissionError:
            if shown == str(root):
                raise
            continue  # an unreadable subfolder is skipped, as os.walk does
        if shown != str(root) and _is_output(entries):
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            link = e.is_symlink()  # `real` is resolved: only a link needs realpath
            sub = os.path.realpath(e.path) if link else os.path.join(real, e.name)
            if e.is_dir():
                inside = sub == top or sub.startswith(top.rstrip(os.sep) + os.sep)
                if e.name.endswith(" GT") or sub in visited or (link and inside):
                    continue
                visited.add(sub)
                todo.append((e.path, sub, through or link))
            elif os.path.splitext(e.name)[1].lower() in image_extensions and e.is_file():
                found.append((through or link, e.path, sub))
    return found


def listed_images(paths: str | Path | Sequence[str | Path]) -> L:
    """The image files named and under the folders named, each real file once, sorted within
    each folder: the one listing of training, `explain` and the checks.

    Below a folder named: symlinks are followed, each real folder and file is listed once (a
    loop is entered once; of a file reached by its own name and through a link, the own name is
    kept); hidden folders, `<x> GT` mask folders and folders this tool wrote (an `explain`
    result, a run) are skipped. A folder named is listed as it is, whatever its name.

    Args:
        paths: files and folders (a file named is listed whatever its extension), or one.

    Raises:
        FileNotFoundError: a path that does not exist.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    listed, seen = L(), set()
    for p in (Path(p).expanduser() for p in paths):
        if p.is_dir():
            found = _walk(p)
        elif p.is_file():
            found = [(False, str(p), os.path.realpath(p))]
        else:
            raise FileNotFoundError(f"no file or folder at {p}")
        mine = {}  # real path: (through a link?, the path split as Path sorts it, the path)
        for through, f, real in found:
            key = (through, f.split(os.sep), f)
            if real not in seen and (real not in mine or key < mine[real]):  # own name first
                mine[real] = key
        seen |= mine.keys()
        listed += [Path(f) for _, _, f in sorted(mine.values(), key=lambda k: k[1])]
    return listed


def class_folders(root: Path) -> list[str]:
    """The names of the class folders in `root`, sorted: hidden folders (`.ipynb_checkpoints`),
    `<x> GT` mask folders and folders this tool wrote (`is_output_folder`) are not classes."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and not d.name.endswith(" GT") and not is_output_folder(d))


def class_images(folder: Path, max_per_class: int | None = None) -> L:
    """The images of one class folder of your own data, sorted (`listed_images`).

    Raises:
        DatasetLayoutError: the class folder holds a folder of images: its label would be
            unclear (fastai's `parent_label` would make it a class of its own).
    """
    files = listed_images(folder)
    nested = sorted({folder / f.relative_to(folder).parts[0] for f in files
                     if f.parent != folder})  # the folders right inside the class folder
    if nested:
        raise DatasetLayoutError(
            f"{nested[0]} is a folder inside the class folder {folder}: lay your images out as "
            f"<root>/<class>/<image> (move them up into {folder.name}/, or make the folder a "
            "class of its own beside it)")
    return files[:max_per_class]


def is_fish_layout(path: str | Path) -> bool:
    """True when the folder is in the Fish Dataset layout (`<Class>/<Class>` and `<Class> GT`
    folders), which has masks; False for a plain folder of class folders."""
    root = dataset_root(path)
    return any((root / c / c).is_dir() and (root / c / f"{c} GT").is_dir()
               for c in class_folders(root))


def _splits(root: Path) -> list[Path]:
    """`train/` and `valid/` when the folder has both (a fixed split), else the folder itself."""
    return [root / "train", root / "valid"] if all(
        (root / d).is_dir() for d in ("train", "valid")) else [root]


def has_train_valid(path: str | Path) -> bool:
    """Whether your own folder comes split already, into `train/` and `valid/` (fastai's
    `GrandparentSplitter` keeps that split); the Fish Dataset is split at random."""
    return not is_fish_layout(path) and len(_splits(dataset_root(path))) == 2


def image_files(path: str | Path, max_per_class: int | None = None) -> L:
    """The images to train on, sorted: `fish_image_files` for the Fish Dataset, else the
    images of each class folder (of `train/` and `valid/` when there are both; `class_images`).
    """
    if is_fish_layout(path):
        return fish_image_files(path, max_per_class)
    files = L()
    for split in _splits(dataset_root(path)):
        for cls in class_folders(split):
            files += class_images(split / cls, max_per_class)
    return files


def validate_folder(path: str | Path) -> dict[str, int]:
    """Check a folder of class folders and return the image count per class.

    Raises:
        DatasetLayoutError: fewer than 2 classes, an empty class, a folder inside a class
            folder, or `train/` and `valid/` with different classes.
    """
    root = dataset_root(path)
    splits = _splits(root)
    classes = [class_folders(split) for split in splits]
    for split, names in zip(splits, classes):
        if len(names) < 2:
            raise DatasetLayoutError(
                f"{split} holds {len(names)} class folder(s) {names}: a classifier needs at "
                f"least 2, as {split}/<class>/<image> (e.g. pets/cat/1.jpg, pets/dog/2.jpg)")
    if len(classes) == 2 and classes[0] != classes[1]:
        raise DatasetLayoutError(
            f"train/ and valid/ in {root} hold different classes: only in train "
            f"{sorted(set(classes[0]) - set(classes[1]))}, only in valid "
            f"{sorted(set(classes[1]) - set(classes[0]))}; give both the same class folders")
    counts = {}
    for split, names in zip(splits, classes):
        for cls in names:
            n = len(class_images(split / cls))
            if n == 0:
                raise DatasetLayoutError(f"no images in {split / cls}: every class needs images "
                                         "(an empty class would train a model without it)")
            counts[cls] = counts.get(cls, 0) + n
    return counts


def fish_image_files(path: str | Path, max_per_class: int | None = None) -> L:
    """The images, sorted, masks excluded: files in `<Class>/<Class>/`, none in `<Class> GT/`.

    `max_per_class` keeps the first n of each class (a quick run on the real dataset).
    """
    root = dataset_root(path)
    files = L()
    for cls in class_folders(root):
        files += listed_images(root / cls / cls)[:max_per_class]
    return files


def validate_layout(path: str | Path, check_images: bool = True) -> dict[str, int]:
    """Check the layout and return the image count per class.

    Checks: exactly the 9 class folders, each with an image folder that is not empty and a
    `<Class> GT` folder with one mask per image and no other; a mini fish set that was left
    unfinished; with `check_images`, that every image and mask decodes (`damaged_images`).

    A folder that is not in the Fish Dataset layout is checked as your own data instead
    (`validate_folder`).

    Raises:
        DatasetLayoutError: what is wrong and where; FileNotFoundError: no folder at `path`.
    """
    root = dataset_root(path)
    if not is_fish_layout(root):
        counts = validate_folder(root)
        if check_images:
            checked_image_files(root)
        return counts
    dest = root.parent.parent
    made = read_marker(dest / MARKER) if (dest / MARKER).is_file() else {}
    if made is None or (made and not made.get("complete")):  # None: empty or broken marker
        why = "says so" if made else "is empty or broken"
        raise DatasetLayoutError(
            f"the mini fish set in {dest} was left unfinished: run `gradcam-tut mini-fish "
            f"{dest}` (with its options) to finish it, or remove it (its {MARKER} {why})")
    classes = made.get("classes") or CLASSES  # a mini set may be drawn with fewer
    found = set(class_folders(root))
    missing, extra = sorted(set(classes) - found), sorted(found - set(classes))
    if missing or extra:
        raise DatasetLayoutError(
            f"{root} should hold the {len(classes)} class folders {list(classes)}; missing: "
            f"{missing}, unexpected: {extra}. Point at the Fish_Dataset folder of the Kaggle "
            "download (NA_Fish_Dataset is a separate set and not used here).")
    counts = {}
    for cls in classes:
        images, masks = root / cls / cls, root / cls / f"{cls} GT"
        for d in (images, masks):
            if not d.is_dir():
                raise DatasetLayoutError(f"missing folder {d}: each class has <Class>/<Class>/ "
                                         "for images and <Class>/<Class> GT/ for masks")
        files = listed_images(images)
        if not files:
            raise DatasetLayoutError(f"no images in {images}: every class needs images "
                                     "(an empty class would train a model without it)")
        names, mask_names = {f.name for f in files}, {f.name for f in listed_images(masks)}
        if names != mask_names:
            unpaired = sorted(names ^ mask_names)
            raise DatasetLayoutError(
                f"{cls}: {len(unpaired)} images and masks are unpaired, e.g. {unpaired[:3]}; "
                f"every {images}/x.png needs {masks}/x.png and the other way round")
        counts[cls] = len(files)
    if check_images:
        checked_image_files(root)
    return counts


def cache_dir() -> Path:
    """Where the image check keeps its answers: `$XDG_CACHE_HOME/gradcam_tut` (default
    `~/.cache/gradcam_tut`), read from the environment at each call."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gradcam_tut"


def _decode(f: str) -> tuple[str | None, tuple[int, int] | None]:
    """(None, its size as shown) when `f` decodes fully as an image, else (why not, None)."""
    try:
        with Image.open(f) as im:
            im.load()  # the pixels, not only the header: a truncated file fails here
            return None, shown_size(im)
    except Exception as exc:  # any failure to decode is a damaged file
        return f"{type(exc).__name__}: {exc}", None


def _checked(files, n_workers: int | None = None) -> dict[str, tuple]:
    """`_decode` of every file, by absolute path, on `n_workers` threads; cached in
    `cache_dir()` under the files' paths, sizes, modification and change times (a file
    rewritten in place with its size and mtime kept still has a new ctime)."""
    files = sorted(os.path.abspath(f) for f in files)
    stats = [(f, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files for st in [os.stat(f)]]
    key = hashlib.sha1(json.dumps(["v2", stats]).encode()).hexdigest()
    cached = cache_dir() / "checked" / f"{key}.json"
    if cached.is_file():
        return {f: tuple(v) for f, v in json.loads(cached.read_text()).items()}
    with ThreadPoolExecutor(n_workers or os.cpu_count()) as pool:  # PIL decodes without the GIL
        results = pool.map(_decode, files)
        if len(files) > 1000:  # the full dataset: about a minute, once
            print(f"checking that {len(files)} images decode (once: the answer is cached)")
            results = progress_bar(results, total=len(files), leave=False)
        checked = dict(zip(files, results))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps(checked))
        os.replace(part, cached)  # whole: a notebook running beside never reads half a file
    except OSError:  # a read-only home: check again next time
        pass
    return checked


def damaged_images(files, n_workers: int | None = None) -> dict[Path, str]:
    """Decode every file fully, on `n_workers` threads (default: one per core); return the
    ones that fail, with the reason (truncated, empty, not an image, too many pixels).

    The answer is cached in `cache_dir()` under the files' paths, sizes, modification and
    change times: a second check of the same files reads one small file instead of decoding
    them all, and a file changed in any way is decoded again.
    """
    return {Path(f): why for f, (why, _) in _checked(files, n_workers).items() if why}


def damaged_listing(bad: dict[Path, str]) -> str:
    """"2 damaged files" and one line per file with the reason."""
    return f"{len(bad)} damaged file{'s' * (len(bad) > 1)}" + "".join(
        f"\n  {f}: {why}" for f, why in bad.items())


def checked_image_files(path: str | Path, max_per_class: int | None = None,
                        damaged: str = "raise") -> L:
    """`image_files` after checking them: every image (and mask) must decode, and each mask
    must have its image's size.

    Args:
        damaged: "raise" lists every damaged file in one error; "skip" warns with that list
            and leaves those images (or those whose mask is damaged) out.

    Raises:
        DatasetLayoutError: damaged files, with `damaged="raise"`; masks of another size than
            their image (each pair named).
    """
    if damaged not in ("raise", "skip"):
        raise ValueError(f"damaged={damaged!r}: use 'raise' or 'skip'")
    files = image_files(path, max_per_class)
    masks = list(map(mask_file, files)) if is_fish_layout(path) else []
    checked = _checked([*files, *masks])  # by absolute path, as os.path.abspath writes it
    bad = {Path(f): why for f, (why, _) in checked.items() if why}
    if bad:
        listing = damaged_listing(bad)
        if damaged == "raise":
            raise DatasetLayoutError(
                f"{listing}\nReplace or delete "
                "them (an image with its mask), or pass damaged='skip' to leave them out")
        warnings.warn(f"leaving out {listing}", stacklevel=2)
        files = files.filter(lambda f: not checked[os.path.abspath(f)][0]
                             and not checked[os.path.abspath(mask_file(f))][0])
    size = {f: tuple(wh or ()) for f, (_, wh) in checked.items()}
    pairs = [(f, size[os.path.abspath(f)], size[os.path.abspath(mask_file(f))])
             for f in (files if masks else [])]
    unfit = [(f, a, b) for f, a, b in pairs if a != b]
    if unfit:
        raise DatasetLayoutError(
            f"{len(unfit)} mask(s) of another size than their image:" + "".join(
                f"\n  {pair_message(f, mask_file(f), a, b)}" for f, a, b in unfit))
    return files


def _kaggle_credentials() -> bool:
    env = os.environ
    has_env = bool(env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"))
    return has_env or (Path(env.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser()
                       / "kaggle.json").is_file()


def _kaggle_copy() -> Path | None:
    """The dataset where Kaggle mounts it, or kagglehub's newest cached version; else None."""
    cache = Path(os.environ.get("KAGGLEHUB_CACHE", "~/.cache/kagglehub")).expanduser()
    versions = cache / "datasets" / KAGGLE_HANDLE / "versions"
    cached = sorted(versions.glob("*/Fish_Dataset"), key=lambda p: int(p.parent.name)
                    if p.parent.name.isdigit() else -1)
    for candidate in [KAGGLE_INPUT / "Fish_Dataset", *reversed(cached)]:
        if candidate.is_dir():
            return candidate
    return None


def find_fish_dataset(path: str | Path | None = None, allow_mini: bool = False,
                      download: bool = True) -> Path:
    """Find the dataset and return the folder holding the class folders.

    Looks, in order: `path`; the `FISH_DATASET` environment variable; `data/Fish_Dataset`;
    where a Kaggle notebook mounts it (`/kaggle/input/a-large-scale-fish-dataset`) or
    kagglehub cached an earlier download (no credentials needed); a kagglehub download (when
    kagglehub is installed and Kaggle credentials exist); and, with `allow_mini`, the
    embedded mini fish set under `data/mini_fish` (made if missing).

    Raises:
        FileNotFoundError: nothing found; the message says how to get the dataset.
    """
    if path is None and os.environ.get(ENV_VAR):
        if not Path(os.environ[ENV_VAR]).expanduser().is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a folder: "
                                    f"correct it, or unset {ENV_VAR} to use the default data")
        path = os.environ[ENV_VAR]
    if path:
        root = dataset_root(path)
    elif (DATA_DIR / "Fish_Dataset").is_dir():
        root = dataset_root(DATA_DIR / "Fish_Dataset")
    elif kaggle := _kaggle_copy():
        root = dataset_root(kaggle)
    elif download and _kaggle_credentials() and importlib.util.find_spec("kagglehub"):
        import kagglehub

        root = dataset_root(kagglehub.dataset_download(KAGGLE_HANDLE))
    elif allow_mini:
        return make_mini_fish(DATA_DIR / "mini_fish")
    else:
        raise FileNotFoundError(f"no Fish Dataset found. {HOW_TO_GET}")
    validate_layout(root, check_images=False)  # the images: when they are loaded
    return root


def is_mini_fish(path: str | Path) -> bool:
    """True for a set written by `make_mini_fish` (its marker sits two levels up)."""
    return (dataset_root(path).parent.parent / MARKER).is_file()


INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


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

    Turned by its EXIF orientation (`ImageOps.exif_transpose`), and 16- and 32-bit grey
    scaled to 8 bits by their bit depth or range (`_to_8_bits`): PIL's `convert("RGB")`,
    which fastai's `PILImage` uses, clips them, so a 16-bit scan turns white and a float
    image of 0..1 black.
    """
    im = _opened(fn)
    if im.mode in (*INT16_MODES, "I", "F"):
        im = _to_8_bits(im, getattr(fn, "filename", "") or fn)
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


def fish_dataloaders(path: str | Path, size: int = 224, bs: int = 64, seed: int = 42,
                     valid_pct: float = 0.2, max_per_class: int | None = None,
                     with_masks: bool = False, batch_tfms=None, damaged: str = "raise",
                     **kwargs) -> DataLoaders:
    """fastai DataLoaders of (image, class), or (image, class, mask) with `with_masks`, for the
    Fish Dataset or your own folder of class folders.

    The layout and every image and mask are checked first (`validate_layout`,
    `checked_image_files` with `damaged`; cached), so a bad file stops us here, not mid-epoch.
    A `DataBlock(ImageBlock(RGBImage), CategoryBlock)` over those images (masks excluded),
    labelled by `parent_label`, split by `RandomSplitter(valid_pct, seed)` (by
    `GrandparentSplitter` when the folder has `train/` and `valid/`), `Resize(size)` and
    fastai's `aug_transforms` unless `batch_tfms` is given. With `with_masks` (Fish Dataset
    only) each image's mask goes through the same transforms (the first item is the only input).
    `kwargs` go to `DataBlock.dataloaders` (num_workers, device, ...). Without a CUDA GPU
    the images load in the main process (num_workers=0): worker processes would compete with
    the training for the same CPU cores (measured: an epoch took 20% longer with 2 workers).
    """
    kwargs.setdefault("num_workers", None if torch.cuda.is_available() else 0)
    validate_layout(path, check_images=False)
    files = checked_image_files(path, max_per_class, damaged)
    fish = is_fish_layout(path)
    blocks, getters = (ImageBlock(RGBImage), CategoryBlock), None
    if with_masks:
        if not fish:
            raise ValueError(f"with_masks=True needs the Fish Dataset layout (<Class>/<Class> GT/"
                             f" masks); {dataset_root(path)} has no masks")
        blocks = (*blocks, MaskBlock(codes=["background", "fish"]))
        getters = [noop, parent_label, fish_mask]
    block = DataBlock(
        blocks=blocks, getters=getters, n_inp=1,
        get_y=None if with_masks else parent_label,
        splitter=(GrandparentSplitter() if not fish and has_train_valid(path)  # fish: read once
                  else RandomSplitter(valid_pct, seed=seed)),
        item_tfms=Resize(size, method="squish"),  # the whole fish stays in view
        batch_tfms=aug_transforms() if batch_tfms is None else batch_tfms)
    return block.dataloaders(files, bs=bs, **kwargs)
