"""`scan_layout`: a dataset folder scanned once into a `Layout`, for each kind of folder, and
passed down: one `fish_dataloaders` call scans once."""

import ast
import shutil
from pathlib import Path

import pytest

from gradcam_tut.fish_layout import CLASSES, DatasetLayoutError
from gradcam_tut.tool import data, layout
from gradcam_tut.tool.layout import Layout, image_files, scan_layout, validate_layout
from gradcam_tut.tool.mini_fish import expected_classes, is_mini_fish


def _own(dest, mini_root, splits=("",), per_class=3):
    """Two class folders of mini fish images, in `dest` or in each of its `splits`."""
    for split in splits:
        for cls in ("Shrimp", "Trout"):
            (dest / split / cls.lower()).mkdir(parents=True)
            for f in sorted((mini_root / cls / cls).iterdir())[:per_class]:
                shutil.copy(f, dest / split / cls.lower() / f.name)
    return dest


def test_the_mini_fish_set_is_the_fish_kind(mini_dest, mini_root):
    found = scan_layout(mini_dest)  # any nesting level of the download
    assert found == scan_layout(mini_root) and scan_layout(found) is found
    assert (found.root, found.kind, found.classes, found.masks) == (mini_root, "fish", CLASSES,
                                                                   True)
    assert list(found.folders) == [mini_root / c / c for c in CLASSES]
    files = found.image_files()
    assert len(files) == 9 * 6 and not any(" GT" in str(f) for f in files)
    assert list(found.image_files(2)) == [f for c in CLASSES
                                          for f in sorted((mini_root / c / c).iterdir())[:2]]
    assert found.splits == (mini_root,)
    assert is_mini_fish(found.root) and expected_classes(found.root) == CLASSES


def test_a_folder_of_class_folders_is_the_folders_kind(mini_root, tmp_path):
    root = _own(tmp_path / "pets", mini_root)
    (root / "shrimp GT").mkdir()  # masks, not a class
    found = scan_layout(root)
    assert (found.kind, found.classes, found.masks) == ("folders", ("shrimp", "trout"), False)
    assert list(found.folders) == [root / "shrimp", root / "trout"]
    assert found.image_files() == tuple(image_files(root)) and len(found.image_files()) == 6
    assert not is_mini_fish(found.root) and expected_classes(found.root) == CLASSES
    (root / "trout" / "inner").mkdir()
    shutil.copy(found.image_files()[0], root / "trout" / "inner" / "x.png")
    with pytest.raises(DatasetLayoutError, match="is a folder inside the class folder"):
        scan_layout(root)


def test_a_train_valid_tree_is_the_train_valid_kind(mini_root, tmp_path):
    root = _own(tmp_path / "split", mini_root, splits=("train", "valid"))
    found = scan_layout(root)
    assert (found.kind, found.classes, found.masks) == ("train_valid", ("shrimp", "trout"), False)
    assert found.splits == (root / "train", root / "valid")
    assert list(found.folders) == [root / s / c for s in ("train", "valid")
                                   for c in ("shrimp", "trout")]
    assert len(found.image_files(1)) == 4  # the first of each class in each split
    assert validate_layout(found) == {"shrimp": 6, "trout": 6}


def test_one_fish_dataloaders_call_scans_once(mini_dest, mini_root, tmp_path, monkeypatch):
    calls = {"scan_layout": 0, "dataset_root": 0}

    def counted(name, f):
        def wrapper(*args, **kwargs):
            if not isinstance(args[0], Layout):  # a Layout is passed through as it is
                calls[name] += 1
            return f(*args, **kwargs)
        return wrapper

    for name in calls:
        f = getattr(layout, name)
        for module in (data, layout):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counted(name, f))
    for path in (mini_dest, _own(tmp_path / "own", mini_root, ("train", "valid"))):
        calls.update(scan_layout=0, dataset_root=0)
        data.fish_dataloaders(path, size=16, bs=4)
        assert calls == {"scan_layout": 1, "dataset_root": 1}, path
    scanned = scan_layout(mini_root)
    calls.update(scan_layout=0, dataset_root=0)
    data.fish_dataloaders(scanned, size=16, bs=4)  # scanned already: not again
    assert calls == {"scan_layout": 0, "dataset_root": 0}


PACKAGE = Path(__file__).parents[1] / "gradcam_tut"
# the data's modules, bottom up: each imports only modules below it, and data none of
# mini_fish's marker (mini_fish answers for its own sets: is_mini_fish, expected_classes).
# fish_layout and images are the lesson's (gradcam_tut/), the others the tool's (tool/)
ARROWS = {"fish_layout": set(), "results": set(), "images": {"fish_layout"},
          "decode_check": {"images"},
          "mini_fish": {"fish_layout", "results"},
          "layout": {"fish_layout", "images", "decode_check", "mini_fish"},
          "data": {"fish_layout", "images", "layout", "mini_fish"},
          "train": {"data", "layout", "pickle_check"},
          "settings": {"data", "fish_layout", "layout", "mini_fish", "results", "train"}}
LESSON = {"fish_layout", "images"}


def _imports(module: str) -> dict[str, set[str]]:
    """The package's modules `module` imports anywhere in it (by file name, either package),
    and the names it takes of each."""
    file = PACKAGE / ("" if module in LESSON else "tool") / f"{module}.py"
    found = {}
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level in (1, 2) and node.module:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
    return found


def test_the_data_modules_import_downwards():
    for module, allowed in ARROWS.items():
        assert set(_imports(module)) == allowed, module
    assert _imports("layout")["mini_fish"] == {"expected_classes"}  # not its marker
    assert _imports("data")["mini_fish"] == {"make_mini_fish"}
