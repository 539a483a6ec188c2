"""The Kaggle "A Large Scale Fish Dataset" layout: find it, check it, list its images, load it.

    Fish_Dataset/Fish_Dataset/<Class>/<Class>/00001.png       the images
    Fish_Dataset/Fish_Dataset/<Class>/<Class> GT/00001.png    their masks (white fish on black)

`get_image_files` on that tree also returns the masks, and `parent_label` then makes 18 labels
out of 9 classes: the source article trained on both. Here images and masks are kept apart.
"""

from __future__ import annotations

import importlib.util
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import RandomSplitter, get_image_files, parent_label
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILMask
from fastai.vision.data import ImageBlock, MaskBlock
from fastcore.basics import noop
from fastcore.foundation import L
from PIL import Image, UnidentifiedImageError

CLASSES = ("Black Sea Sprat", "Gilt-Head Bream", "Hourse Mackerel", "Red Mullet",
           "Red Sea Bream", "Sea Bass", "Shrimp", "Striped Red Mullet", "Trout")
KAGGLE_HANDLE = "crowww/a-large-scale-fish-dataset"
ENV_VAR = "FISH_DATASET"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the repository's data/ folder
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
    `<Class> GT` folder with one mask per image and no other; with `check_images`, that every
    file opens as an image (reads headers only).

    Raises:
        DatasetLayoutError: what is wrong and where; FileNotFoundError: no folder at `path`.
    """
    root = dataset_root(path)
    found = set(class_folders(root))
    missing, extra = sorted(set(CLASSES) - found), sorted(found - set(CLASSES))
    if missing or extra:
        raise DatasetLayoutError(
            f"{root} should hold the 9 class folders {list(CLASSES)}; missing: {missing}, "
            f"unexpected: {extra}. Point at the Fish_Dataset folder of the Kaggle download "
            "(NA_Fish_Dataset is a separate set and not used here).")
    counts = {}
    for cls in CLASSES:
        images, masks = root / cls / cls, root / cls / f"{cls} GT"
        for d in (images, masks):
            if not d.is_dir():
                raise DatasetLayoutError(f"missing folder {d}: each class has <Class>/<Class>/ "
                                         "for images and <Class>/<Class> GT/ for masks")
        files = get_image_files(images)
        if not files:
            raise DatasetLayoutError(f"no images in {images}")
        names, mask_names = {f.name for f in files}, {f.name for f in get_image_files(masks)}
        if names != mask_names:
            unpaired = sorted(names ^ mask_names)
            raise DatasetLayoutError(
                f"{cls}: {len(unpaired)} images and masks are unpaired, e.g. {unpaired[:3]}; "
                f"every {images}/x.png needs {masks}/x.png and the other way round")
        if check_images:
            for f in [*files, *map(mask_file, files)]:
                try:
                    Image.open(f).close()
                except (UnidentifiedImageError, OSError) as exc:
                    raise DatasetLayoutError(f"cannot read {f} as an image ({exc}); "
                                             "download the dataset again") from exc
        counts[cls] = len(files)
    return counts


def _kaggle_credentials() -> bool:
    env = os.environ
    has_env = bool(env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"))
    return has_env or (Path(env.get("KAGGLE_CONFIG_DIR", "~/.kaggle")).expanduser()
                       / "kaggle.json").is_file()


def find_fish_dataset(path: str | Path | None = None, allow_mini: bool = False,
                      download: bool = True) -> Path:
    """Find the dataset and return the folder holding the class folders.

    Looks, in order: `path`; the `FISH_DATASET` environment variable; `data/Fish_Dataset`;
    a kagglehub download (when kagglehub is installed and Kaggle credentials exist); and,
    with `allow_mini`, the embedded mini fish set under `data/mini_fish` (made if missing).

    Raises:
        FileNotFoundError: nothing found; the message says how to get the dataset.
    """
    explicit = path or os.environ.get(ENV_VAR)
    if explicit:
        root = dataset_root(explicit)
    elif (DATA_DIR / "Fish_Dataset").is_dir():
        root = dataset_root(DATA_DIR / "Fish_Dataset")
    elif download and _kaggle_credentials() and importlib.util.find_spec("kagglehub"):
        import kagglehub

        root = dataset_root(kagglehub.dataset_download(KAGGLE_HANDLE))
    elif allow_mini:
        from .mini_fish import make_mini_fish

        return make_mini_fish(DATA_DIR / "mini_fish")
    else:
        raise FileNotFoundError(f"no Fish Dataset found. {HOW_TO_GET}")
    validate_layout(root)
    return root


def is_mini_fish(path: str | Path) -> bool:
    """True for a set written by `make_mini_fish` (its marker sits two levels up)."""
    from .mini_fish import MARKER

    return (dataset_root(path).parent.parent / MARKER).is_file()


def fish_mask(image_file: Path) -> PILMask:
    """The image's GT mask as a fastai mask: 0 background, 1 fish."""
    mask = np.asarray(Image.open(mask_file(image_file)).convert("L")) > 127
    return PILMask.create(mask.astype(np.uint8))


def fish_dataloaders(path: str | Path, size: int = 224, bs: int = 64, seed: int = 42,
                     valid_pct: float = 0.2, max_per_class: int | None = None,
                     with_masks: bool = False, batch_tfms=None, **kwargs) -> DataLoaders:
    """fastai DataLoaders of (image, class), or (image, class, mask) with `with_masks`.

    A `DataBlock(ImageBlock, CategoryBlock)` over `fish_image_files` (masks excluded),
    labelled by `parent_label`, split by `RandomSplitter(valid_pct, seed)`, `Resize(size)`
    and fastai's `aug_transforms` unless `batch_tfms` is given. With `with_masks` each
    image's mask goes through the same transforms (the first item is the only input).
    `kwargs` go to `DataBlock.dataloaders` (num_workers, device, ...). Without a CUDA GPU
    the images load in the main process (num_workers=0): worker processes would compete with
    the training for the same CPU cores (measured: an epoch took 20% longer with 2 workers).
    """
    kwargs.setdefault("num_workers", None if torch.cuda.is_available() else 0)
    blocks, getters = (ImageBlock, CategoryBlock), None
    if with_masks:
        blocks = (*blocks, MaskBlock(codes=["background", "fish"]))
        getters = [noop, parent_label, fish_mask]
    block = DataBlock(
        blocks=blocks, getters=getters, n_inp=1,
        get_items=partial(fish_image_files, max_per_class=max_per_class),
        get_y=None if with_masks else parent_label,
        splitter=RandomSplitter(valid_pct, seed=seed),
        item_tfms=Resize(size, method="squish"),  # the whole fish stays in view
        batch_tfms=aug_transforms() if batch_tfms is None else batch_tfms)
    return block.dataloaders(dataset_root(path), bs=bs, **kwargs)
