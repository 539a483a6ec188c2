"""The dataset: found (a path, `$FISH_DATASET`, `data/`, Kaggle's mount or kagglehub's cache, a
kagglehub download, or the mini fish set) and loaded as fastai DataLoaders.

What a folder holds is scanned once (`layout.scan_layout`) and passed down; the images are read
as `images` reads them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import GrandparentSplitter, RandomSplitter, parent_label
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.data import ImageBlock, MaskBlock
from fastcore.basics import noop

from ..fish_layout import ENV_VAR, HOW_TO_GET, KAGGLE_HANDLE
from ..images import RGBImage, fish_mask
from .layout import Layout, checked_image_files, scan_layout, validate_layout
from .mini_fish import make_mini_fish

KAGGLE_INPUT = Path("/kaggle/input/a-large-scale-fish-dataset")  # in a Kaggle notebook


def project_dir(package: Path | None = None) -> Path:
    """Where `data/` and `runs/` go: the clone the package runs from (editable install), else
    the current folder, never inside site-packages. `package`: this package's folder."""
    repo = (package or Path(__file__).resolve().parents[1]).parent  # gradcam_tut/tool/data.py
    return repo if (repo / "pyproject.toml").is_file() else Path.cwd()


PROJECT_DIR = project_dir()
DATA_DIR = PROJECT_DIR / "data"


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
        where = path
    elif (DATA_DIR / "Fish_Dataset").is_dir():
        where = DATA_DIR / "Fish_Dataset"
    elif kaggle := _kaggle_copy():
        where = kaggle
    elif download and _kaggle_credentials() and importlib.util.find_spec("kagglehub"):
        import kagglehub

        where = kagglehub.dataset_download(KAGGLE_HANDLE)
    elif allow_mini:
        return make_mini_fish(DATA_DIR / "mini_fish")
    else:
        raise FileNotFoundError(f"no Fish Dataset found. {HOW_TO_GET}")
    layout = scan_layout(where)
    validate_layout(layout, check_images=False)  # the images: when they are loaded
    return layout.root


def fish_dataloaders(path: str | Path | Layout, size: int = 224, bs: int = 64, seed: int = 42,
                     valid_pct: float = 0.2, max_per_class: int | None = None,
                     with_masks: bool = False, batch_tfms=None, damaged: str = "raise",
                     **kwargs) -> DataLoaders:
    """fastai DataLoaders of (image, class), or (image, class, mask) with `with_masks`, for the
    Fish Dataset or your own folder of class folders (a path, scanned once, or its `Layout`).

    The layout and every image and mask are checked first (`validate_layout`,
    `checked_image_files` with `damaged`; cached), so a bad file stops us here, not mid-epoch.
    A `DataBlock(ImageBlock(RGBImage), CategoryBlock)` over those images (masks excluded),
    labelled by `parent_label`, split by `RandomSplitter(valid_pct, seed)` (by
    `GrandparentSplitter` when the folder has `train/` and `valid/`), `Resize(size)` and
    fastai's `aug_transforms` unless `batch_tfms` is given. With `with_masks` (Fish Dataset
    only) each image's mask goes through the same transforms (the first item is the only input).
    `kwargs` go to `DataBlock.dataloaders` (num_workers, device, ...). Without a CUDA GPU
    the images load in the main process (num_workers=0): worker processes would compete with
    the training for the same CPU cores.
    """
    kwargs.setdefault("num_workers", None if torch.cuda.is_available() else 0)
    layout = scan_layout(path)  # once: the checks and the split below read this value
    validate_layout(layout, check_images=False)
    files = checked_image_files(layout, max_per_class, damaged)
    blocks: tuple = (ImageBlock(RGBImage), CategoryBlock)
    getters = None
    if with_masks:
        if not layout.masks:
            raise ValueError(f"with_masks=True needs the Fish Dataset layout (<Class>/<Class> GT/"
                             f" masks); {layout.root} has no masks")
        blocks = (*blocks, MaskBlock(codes=["background", "fish"]))
        getters = [noop, parent_label, fish_mask]
    block = DataBlock(
        blocks=blocks, getters=getters, n_inp=1,
        get_y=None if with_masks else parent_label,
        splitter=(GrandparentSplitter() if layout.kind == "train_valid"
                  else RandomSplitter(valid_pct, seed=seed)),
        item_tfms=Resize(size, method="squish"),  # the whole fish stays in view
        batch_tfms=aug_transforms() if batch_tfms is None else batch_tfms)
    return block.dataloaders(files, bs=bs, **kwargs)
