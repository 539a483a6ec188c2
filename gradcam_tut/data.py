"""The Kaggle "A Large Scale Fish Dataset" layout, or any folder of class folders: find it,
check it, list its images, load it.

    Fish_Dataset/Fish_Dataset/<Class>/<Class>/00001.png       the images
    Fish_Dataset/Fish_Dataset/<Class>/<Class> GT/00001.png    their masks (white fish on black)

`get_image_files` on that tree also returns the masks, and `parent_label` then makes 18 labels
out of 9 classes: the source article trained on both. Here images and masks are kept apart.

Your own data: any folder in fastai's `parent_label` layout, `<root>/<class>/<image>`, or with
`<root>/train/<class>/...` and `<root>/valid/<class>/...` for a fixed split; no masks.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import (
    GrandparentSplitter,
    RandomSplitter,
    get_image_files,
    parent_label,
)
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImage, PILMask, load_image
from fastai.vision.data import ImageBlock, MaskBlock
from fastcore.basics import noop
from fastcore.foundation import L
from fastprogress.fastprogress import progress_bar
from PIL import Image

CLASSES = ("Black Sea Sprat", "Gilt-Head Bream", "Hourse Mackerel", "Red Mullet",
           "Red Sea Bream", "Sea Bass", "Shrimp", "Striped Red Mullet", "Trout")
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
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "gradcam_tut"
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


def mask_file(image_file: str | Path) -> Path:
    """The GT mask of an image: `<Class>/<Class>/x.png` -> `<Class>/<Class> GT/x.png`."""
    f = Path(image_file)
    return f.parent.parent / f"{f.parent.name} GT" / f.name


def class_folders(root: Path) -> list[str]:
    """The names of the folders in `root`, sorted; hidden ones (`.ipynb_checkpoints`) skipped."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


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
    """The images to train on, sorted: `fish_image_files` for the Fish Dataset, else every
    image under each class folder (of `train/` and `valid/` when there are both)."""
    if is_fish_layout(path):
        return fish_image_files(path, max_per_class)
    files = L()
    for split in _splits(dataset_root(path)):
        for cls in class_folders(split):
            files += sorted(get_image_files(split / cls))[:max_per_class]
    return files


def validate_folder(path: str | Path) -> dict[str, int]:
    """Check a folder of class folders and return the image count per class.

    Raises:
        DatasetLayoutError: fewer than 2 classes, an empty class, or `train/` and `valid/`
            with different classes.
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
            n = len(get_image_files(split / cls))
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
        files += sorted(get_image_files(root / cls / cls))[:max_per_class]
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
    from .mini_fish import MARKER

    root = dataset_root(path)
    if not is_fish_layout(root):
        counts = validate_folder(root)
        if check_images:
            checked_image_files(root)
        return counts
    marker = root.parent.parent / MARKER
    made = json.loads(marker.read_text()) if marker.is_file() else {}
    if marker.is_file() and not made.get("complete"):
        raise DatasetLayoutError(
            f"the mini fish set in {root.parent.parent} was left unfinished: run "
            f"`gradcam-tut mini-fish {root.parent.parent}` (with its options) to finish it")
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
        files = get_image_files(images)
        if not files:
            raise DatasetLayoutError(f"no images in {images}: every class needs images "
                                     "(an empty class would train a model without it)")
        names, mask_names = {f.name for f in files}, {f.name for f in get_image_files(masks)}
        if names != mask_names:
            unpaired = sorted(names ^ mask_names)
            raise DatasetLayoutError(
                f"{cls}: {len(unpaired)} images and masks are unpaired, e.g. {unpaired[:3]}; "
                f"every {images}/x.png needs {masks}/x.png and the other way round")
        counts[cls] = len(files)
    if check_images:
        checked_image_files(root)
    return counts


def _decode(f: Path) -> str | None:
    """None when `f` decodes fully as an image, else why not."""
    try:
        with Image.open(f) as im:
            im.load()  # the pixels, not only the header: a truncated file fails here
    except Exception as exc:  # any failure to decode is a damaged file
        return f"{type(exc).__name__}: {exc}"
    return None


def damaged_images(files, n_workers: int | None = None) -> dict[Path, str]:
    """Decode every file fully, on `n_workers` threads (default: one per core); return the
    ones that fail, with the reason (truncated, empty, not an image, too many pixels).

    The answer is cached in `CACHE_DIR` under the files' paths, sizes and modification
    times: a second check of the same files reads one small file instead of decoding them all.
    """
    files = sorted(os.path.abspath(f) for f in files)
    stats = [(f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]]
    key = hashlib.sha1(json.dumps(stats).encode()).hexdigest()
    cached = CACHE_DIR / "checked" / f"{key}.json"
    if cached.is_file():
        return {Path(f): why for f, why in json.loads(cached.read_text()).items()}
    with ThreadPoolExecutor(n_workers or os.cpu_count()) as pool:  # PIL decodes without the GIL
        reasons = pool.map(_decode, files)
        if len(files) > 1000:  # the full dataset: about a minute, once
            print(f"checking that {len(files)} images decode (once: the answer is cached)")
            reasons = progress_bar(reasons, total=len(files), leave=False)
        damaged = {Path(f): why for f, why in zip(files, reasons) if why}
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps({str(f): why for f, why in damaged.items()}))
        os.replace(part, cached)  # whole: a notebook running beside never reads half a file
    except OSError:  # a read-only home: check again next time
        pass
    return damaged


def damaged_listing(bad: dict[Path, str]) -> str:
    """"2 damaged files" and one line per file with the reason."""
    return f"{len(bad)} damaged file{'s' * (len(bad) > 1)}" + "".join(
        f"\n  {f}: {why}" for f, why in bad.items())


def checked_image_files(path: str | Path, max_per_class: int | None = None,
                        damaged: str = "raise") -> L:
    """`image_files` after checking them: every image (and mask) must decode.

    Args:
        damaged: "raise" lists every damaged file in one error; "skip" warns with that list
            and leaves those images (or those whose mask is damaged) out.

    Raises:
        DatasetLayoutError: damaged files, with `damaged="raise"`.
    """
    if damaged not in ("raise", "skip"):
        raise ValueError(f"damaged={damaged!r}: use 'raise' or 'skip'")
    files = image_files(path, max_per_class)
    masks = list(map(mask_file, files)) if is_fish_layout(path) else []
    bad = damaged_images([*files, *masks])
    if not bad:
        return files
    listing = damaged_listing(bad)
    if damaged == "raise":
        raise DatasetLayoutError(
            f"{listing}\nReplace or delete "
            "them (an image with its mask), or pass damaged='skip' to leave them out")
    warnings.warn(f"leaving out {listing}", stacklevel=2)
    return files.filter(lambda f: f.absolute() not in bad and mask_file(f).absolute() not in bad)


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
        from .mini_fish import make_mini_fish

        return make_mini_fish(DATA_DIR / "mini_fish")
    else:
        raise FileNotFoundError(f"no Fish Dataset found. {HOW_TO_GET}")
    validate_layout(root, check_images=False)  # the images: when they are loaded
    return root


def is_mini_fish(path: str | Path) -> bool:
    """True for a set written by `make_mini_fish` (its marker sits two levels up)."""
    from .mini_fish import MARKER

    return (dataset_root(path).parent.parent / MARKER).is_file()


def load_rgb(fn) -> Image.Image:
    """An image file (or PIL image) as 8-bit RGB. 16-bit grey values are scaled to 8 bits:
    PIL's `convert("RGB")`, which fastai's `PILImage` uses, clips them: a 16-bit scan turns white.
    """
    im = fn if isinstance(fn, Image.Image) else load_image(fn)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        scaled = np.asarray(im, dtype=np.float32) / 257  # 65535 -> 255
        im = Image.fromarray(scaled.clip(0, 255).round().astype(np.uint8))
    return im.convert("RGB")


class RGBImage(PILImage):
    """fastai's `PILImage`, made from a file or PIL image with `load_rgb` (16-bit scaled)."""

    @classmethod
    def create(cls, fn: Path | str | torch.Tensor | np.ndarray | bytes | Image.Image, **kwargs):
        # the annotation tells fastai's `test_dl` which items enter here (as PILImage's does)
        if isinstance(fn, (str, os.PathLike, Image.Image)):
            return cls(load_rgb(fn))
        return super().create(fn, **kwargs)


def fish_mask(image_file: Path) -> PILMask:
    """The image's GT mask as a fastai mask: 0 background, 1 fish."""
    mask = np.asarray(Image.open(mask_file(image_file)).convert("L")) > 127
    return PILMask.create(mask.astype(np.uint8))


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
