"""Your own data: any folder of class folders (fastai's `parent_label` layout, optionally with
`train/` and `valid/`), no masks: checked, loaded, trained on, and run through the notebooks."""

import shutil

import pytest
import torch
from torch import nn

from gradcam_tut import grad_cam
from gradcam_tut.fish_layout import DatasetLayoutError
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.data import fish_dataloaders
from gradcam_tut.tool.layout import scan_layout, validate_layout
from gradcam_tut.tool.settings import run_settings
from gradcam_tut.tool.train import train_fish

# borrowed pictures, 12 per class: enough for a batch of 16 in the notebooks' smoke mode
PETS = {"bird": ("Red Mullet", "Red Sea Bream"), "cat": ("Trout", "Sea Bass"),
        "dog": ("Shrimp", "Black Sea Sprat")}


def _fill(dest, mini_root, names=PETS, pick=slice(None)):
    for pet, fishes in names.items():
        (dest / pet).mkdir(parents=True)
        for fish in fishes:
            for f in sorted((mini_root / fish / fish).iterdir())[pick]:
                shutil.copy(f, dest / pet / f"{fish}_{f.name}")
    return dest


@pytest.fixture(scope="module")
def pets(mini_root, tmp_path_factory):
    return _fill(tmp_path_factory.mktemp("own") / "pets", mini_root)


def test_a_folder_of_class_folders(pets):
    assert scan_layout(pets).kind == "folders"
    assert validate_layout(pets) == {"bird": 12, "cat": 12, "dog": 12}
    dls = fish_dataloaders(pets, size=32, bs=4)
    assert list(dls.vocab) == ["bird", "cat", "dog"] and len(dls.valid_ds) == 7
    xb, yb = dls.one_batch()  # fastai's types, straight in
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    (m,) = grad_cam(model, xb, "0", yb)
    assert type(m) is torch.Tensor and m.shape == (4, 30, 30)
    with pytest.raises(ValueError, match="with_masks=True needs the Fish Dataset layout"):
        fish_dataloaders(pets, size=32, with_masks=True)


def test_a_fixed_train_valid_split(mini_root, tmp_path):
    root = tmp_path / "split"
    _fill(root / "train", mini_root, pick=slice(0, 4))
    _fill(root / "valid", mini_root, pick=slice(4, 6))
    dls = fish_dataloaders(root, size=32, bs=4)
    assert {f.parent.parent.name for f in dls.valid_ds.items} == {"valid"}
    assert len(dls.train_ds) == 24 and len(dls.valid_ds) == 12
    shutil.rmtree(root / "valid" / "dog")
    with pytest.raises(DatasetLayoutError, match=r"different classes: only in train \['dog'\]"):
        fish_dataloaders(root, size=32)


def test_folder_errors_name_the_fix(mini_root, tmp_path):
    one = _fill(tmp_path / "one", mini_root, {"cat": ["Trout"]})
    with pytest.raises(DatasetLayoutError, match=r"1 class folder\(s\) \['cat'\]: a classifier "
                                                 "needs at least 2, as .*/<class>/<image>"):
        fish_dataloaders(one, size=32)
    (one / "dog").mkdir()
    with pytest.raises(DatasetLayoutError, match="no images in .*dog: every class needs"):
        fish_dataloaders(one, size=32)


@pytest.mark.slow
def test_train_and_settings_on_your_own_data(pets, tmp_path):
    learn = train_fish(pets, epochs=1, size=32, bs=4, pretrained=False)
    assert list(learn.dls.vocab) == ["bird", "cat", "dog"]
    s = run_settings(smoke=True, data=pets, out=tmp_path)
    assert s.data == pets and not s.masks
    with pytest.raises(ValueError, match="Notebook 05 measures maps against GT masks, and .* "
                                         "has none: it needs the Fish Dataset layout"):
        s.require_masks("Notebook 05")


@pytest.mark.slow
def test_the_notebooks_on_your_own_data(pets, tmp_path, capsys):
    """`gradcam-tut run --data pets`: 01 to 04 run; 05 (masks) and 06 (its own data) are
    skipped, each with a line."""
    assert main(["run", "--smoke", "--epochs", "1", "--data", str(pets),
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"skipping 05_does_it_look_at_the_fish.ipynb: it needs GT masks, and {pets}" in printed
    assert f"skipping 06_catching_a_shortcut.ipynb: it trains on mini fish of its own, not on " \
        f"{pets}" in printed
    notebooks = sorted(p.name[:2] for p in (tmp_path / "latest" / "notebooks").iterdir())
    assert notebooks == ["01", "02", "03", "04"]
    assert main(["run", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
