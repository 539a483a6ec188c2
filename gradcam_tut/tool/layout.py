"""A dataset folder's layout, scanned once into a value (`scan_layout` -> `Layout`), checked,
and its images listed: the Kaggle "A Large Scale Fish Dataset" layout, or any folder of class
folders.

    Fish_Dataset/Fish_Dataset/<Class>/<Class>/00001.png       the images
    Fish_Dataset/Fish_Dataset/<Class>/<Class> GT/00001.png    their masks (white fish on black)

`get_image_files` on that tree also returns the masks, and `parent_label` then makes 18 labels
out of 9 classes: the source article trained on both. Here images and masks are kept apart.

Your own data: any folder in fastai's `parent_label` layout, `<root>/<class>/<image>`, or with
`<root>/train/<class>/...` and `<root>/valid/<class>/...` for a fixed split; a `<class> GT` folder
holds masks, not a class; a folder inside a class folder is refused (its label would be unclear).

One listing (`listed_images`) serves training, `explain` and the checks: each real file once
(symlinks resolved, loops entered once), hidden and mask folders and earlier results skipped.
The functions that take a dataset folder take a `Layout` too: a path is scanned once, where it
comes in, and the value is passed down.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastai.data.transforms import image_extensions
from fastcore.foundation import L

from ..fish_layout import HOW_TO_GET, DatasetLayoutError, mask_file
from ..images import pair_message, shown_size
from .decode_check import damaged_listing, decoded
from .mini_fish import expected_classes


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
RESULT_FILES = frozenset({"explain.csv", "maps.npz", "complete.json"})


def _is_output(entries: list[os.DirEntry]) -> bool:
    """Whether a folder with these entries was written by this tool: an `explain` result, a
    run (its `figures/` beside `notebooks/` or `models/`) or a runs folder (`latest`)."""
    names = {e.name for e in entries}
    run = "figures" in names and bool({"notebooks", "models"} & names)
    runs = any(e.name == "latest" and e.is_symlink() for e in entries)
    marked = bool(names & (RESULT_FILES - {"explain.csv"}))  # a stray explain.csv is not:
    explained = "explain.csv" in names and bool({"maps.npz", "grids"} & names)  # with its maps
    return marked or explained or run or runs


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


def class_name(image: str | Path) -> str:
    """The name of the folder an image lies in, its class in the `<class>/<image>` layout:
    `Trout` for `./x.png` run from `Trout/` too (the folder's real name, not ".")."""
    return Path(os.path.abspath(image)).parent.name


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
    listed, seen = L(), set[str]()
    for p in (Path(p).expanduser() for p in paths):
        if p.is_dir():
            found = _walk(p)
        elif p.is_file():
            found = [(False, str(p), os.path.realpath(p))]
        else:
            raise FileNotFoundError(f"no file or folder at {p}")
        # real path: (through a link?, the path split as Path sorts it, the path)
        mine: dict[str, tuple[bool, list[str], str]] = {}
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


@dataclass(frozen=True)
class Layout:
    """A dataset folder as `scan_layout` found it, once: what kind of folder, its classes and
    its images (masks excluded), for the checks and the DataLoaders to share.

    Attributes:
        root: the folder holding the class folders (or `train/` and `valid/`).
        kind: "fish" (the Fish Dataset layout, with GT masks), "folders" (your
            `<root>/<class>/<image>`) or "train_valid" (yours, split already into
            `train/<class>/` and `valid/<class>/`).
        classes: the class folders' names, sorted (train's and valid's together).
        folders: each image folder (`<Class>/<Class>` in the Fish Dataset, `<class>` or
            `train|valid/<class>` in yours) and its images, sorted (`listed_images`).
    """

    root: Path
    kind: str
    classes: tuple[str, ...]
    folders: dict[Path, tuple[Path, ...]] = field(hash=False, repr=False)

    @property
    def masks(self) -> bool:
        """Whether the images have GT masks: the Fish Dataset layout; your own folder has none."""
        return self.kind == "fish"

    @property
    def splits(self) -> tuple[Path, ...]:
        """The folders the class folders are in: `train/` and `valid/`, else the root."""
        if self.kind == "train_valid":
            return self.root / "train", self.root / "valid"
        return (self.root,)

    def image_files(self, max_per_class: int | None = None) -> L:
        """The images to train on, sorted by image folder, then within it; `max_per_class`
        keeps the first n of each class folder (of `train/` and `valid/` each, when there are
        both)."""
        return L(f for files in self.folders.values() for f in files[:max_per_class])


def scan_layout(path: str | Path | Layout) -> Layout:
    """Find what a dataset folder holds, once: its kind, classes and images (`Layout`).

    The Fish Dataset layout when a class folder holds both `<Class>/<Class>` and
    `<Class> GT`; else your own class folders, of `train/` and `valid/` when there are both.
    `path` may be any nesting level of the Fish Dataset download (`dataset_root`); a `Layout`
    is returned as it is.

    Raises:
        FileNotFoundError: no folder at `path`.
        DatasetLayoutError: a folder inside one of your class folders (`class_images`).
    """
    if isinstance(path, Layout):
        return path
    root = dataset_root(path)
    classes = class_folders(root)
    if any((root / c / c).is_dir() and (root / c / f"{c} GT").is_dir() for c in classes):
        folders = [root / c / c for c in classes if (root / c / c).is_dir()]  # missing: checked
        return Layout(root, "fish", tuple(classes),
                      {d: tuple(listed_images(d)) for d in folders})
    kind = "train_valid" if all((root / d).is_dir() for d in ("train", "valid")) else "folders"
    splits = [root / "train", root / "valid"] if kind == "train_valid" else [root]
    folders = [split / c for split in splits
               for c in (classes if split == root else class_folders(split))]
    return Layout(root, kind, tuple(sorted({d.name for d in folders})),
                  {d: tuple(class_images(d)) for d in folders})


def has_train_valid(path: str | Path | Layout) -> bool:
    """Whether your own folder comes split already, into `train/` and `valid/` (fastai's
    `GrandparentSplitter` keeps that split); the Fish Dataset is split at random."""
    return scan_layout(path).kind == "train_valid"


def image_files(path: str | Path | Layout, max_per_class: int | None = None) -> L:
    """The images to train on, sorted: those of each `<Class>/<Class>` folder of the Fish
    Dataset (masks excluded), else of each class folder (of `train/` and `valid/` when there
    are both; `class_images`). `max_per_class` keeps the first n of each (a quick run)."""
    return scan_layout(path).image_files(max_per_class)


def _not_empty(folder: Path, files: Sequence[Path]) -> None:
    if not files:
        raise DatasetLayoutError(f"no images in {folder}: every class needs images "
                                 "(an empty class would train a model without it)")


def validate_folder(path: str | Path | Layout) -> dict[str, int]:
    """Check a folder of class folders and return the image count per class.

    Raises:
        DatasetLayoutError: fewer than 2 classes, an empty class, a folder inside a class
            folder, or `train/` and `valid/` with different classes.
    """
    layout = scan_layout(path)
    classes = [[d.name for d in layout.folders if d.parent == split] for split in layout.splits]
    for split, names in zip(layout.splits, classes):
        if len(names) < 2:
            raise DatasetLayoutError(
                f"{split} holds {len(names)} class folder(s) {names}: a classifier needs at "
                f"least 2, as {split}/<class>/<image> (e.g. pets/cat/1.jpg, pets/dog/2.jpg)")
    if len(classes) == 2 and classes[0] != classes[1]:
        raise DatasetLayoutError(
            f"train/ and valid/ in {layout.root} hold different classes: only in train "
            f"{sorted(set(classes[0]) - set(classes[1]))}, only in valid "
            f"{sorted(set(classes[1]) - set(classes[0]))}; give both the same class folders")
    counts: dict[str, int] = {}
    for folder, files in layout.folders.items():
        _not_empty(folder, files)
        counts[folder.name] = counts.get(folder.name, 0) + len(files)
    return counts


def validate_layout(path: str | Path | Layout, check_images: bool = True) -> dict[str, int]:
    """Check the layout and return the image count per class.

    Checks: exactly the 9 class folders (a mini fish set: those it was drawn with, and that it
    was finished: `mini_fish.expected_classes`), each with an image folder that is not empty
    and a `<Class> GT` folder with one mask per image and no other, each mask of its image's
    size (from the headers); with `check_images`, that every image and mask decodes
    (`checked_image_files`).

    A folder that is not in the Fish Dataset layout is checked as your own data instead
    (`validate_folder`).

    Raises:
        DatasetLayoutError: what is wrong and where; FileNotFoundError: no folder at `path`.
    """
    layout = scan_layout(path)
    if not layout.masks:
        counts = validate_folder(layout)
        if check_images:
            checked_image_files(layout)
        return counts
    root = layout.root
    classes = expected_classes(root)
    found = set(layout.classes)
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
        files = layout.folders[images]
        _not_empty(images, files)
        names, mask_names = {f.name for f in files}, {f.name for f in listed_images(masks)}
        if names != mask_names:
            unpaired = sorted(names ^ mask_names)
            raise DatasetLayoutError(
                f"{cls}: {len(unpaired)} images and masks are unpaired, e.g. {unpaired[:3]}; "
                f"every {images}/x.png needs {masks}/x.png and the other way round")
        counts[cls] = len(files)
    _check_mask_sizes(layout.image_files())  # from the headers: before any training
    if check_images:
        checked_image_files(layout)
    return counts


def _unfit_error(unfit: Sequence[tuple[Path, tuple, tuple]]) -> DatasetLayoutError:
    """The error for (image, its size, its mask's size) pairs that differ, each named."""
    return DatasetLayoutError(f"{len(unfit)} mask(s) of another size than their image:" + "".join(
        f"\n  {pair_message(f, mask_file(f), a, b)}" for f, a, b in unfit))


def _check_mask_sizes(files: Sequence[Path]) -> None:
    """Check that each image's mask has its size, reading the files' headers only (nothing
    decoded); a file that cannot be opened is left to the decoding check.

    Raises:
        DatasetLayoutError: every pair of another size, named.
    """
    unfit = []
    for f in files:
        try:
            pair = shown_size(f), shown_size(mask_file(f))
        except (OSError, ValueError, SyntaxError):  # PIL: not an image, a broken header
            continue
        if pair[0] != pair[1]:
            unfit.append((f, *pair))
    if unfit:
        raise _unfit_error(unfit)


def checked_image_files(path: str | Path | Layout, max_per_class: int | None = None,
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
    layout = scan_layout(path)
    files = layout.image_files(max_per_class)
    masks = list(map(mask_file, files)) if layout.masks else []
    what = f"{len(files)} images" + (f" and their {len(masks)} masks" if masks else "")
    checked = decoded([*files, *masks], what=what)  # by absolute path, as abspath writes it
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
        raise _unfit_error(unfit)
    return files
