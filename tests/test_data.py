import shutil

import numpy as np
import pytest
import torch
from fastai.data.transforms import get_image_files, parent_label
from PIL import Image

from gradcam_tut.fish_layout import CLASSES, DatasetLayoutError, mask_file
from gradcam_tut.tool import data
from gradcam_tut.tool.data import find_fish_dataset, fish_dataloaders
from gradcam_tut.tool.layout import dataset_root, image_files, validate_layout
from gradcam_tut.tool.mini_fish import is_mini_fish


def test_masks_excluded_and_nine_classes(mini_root):
    everything = get_image_files(mini_root)
    assert len({parent_label(f) for f in everything}) == 18  # the source article's trap
    files = image_files(mini_root)
    assert len(files) == 9 * 6
    assert {parent_label(f) for f in files} == set(CLASSES)
    assert not any(f.parent.name.endswith(" GT") for f in files)
    assert len(image_files(mini_root, max_per_class=2)) == 18


def test_mask_pairing(mini_root):
    f = image_files(mini_root)[0]
    m = mask_file(f)
    assert m == f.parent.parent / f"{f.parent.name} GT" / f.name and m.is_file()
    mask = np.asarray(Image.open(m))
    assert set(np.unique(mask)) == {0, 255}
    assert 0.02 < (mask > 0).mean() < 0.6  # a fish, not the whole image


def test_any_nesting_level(mini_dest, mini_root):
    for p in (mini_dest, mini_dest / "Fish_Dataset", mini_root):
        assert dataset_root(p) == mini_root
    assert validate_layout(mini_dest) == dict.fromkeys(CLASSES, 6)


@pytest.fixture
def broken(mini_root, tmp_path):
    root = tmp_path / "Fish_Dataset" / "Fish_Dataset"
    shutil.copytree(mini_root, root)
    return root


def _first_image(root, cls="Trout"):
    return sorted((root / cls / cls).iterdir())[0]


@pytest.mark.parametrize("breakage, match", [
    (lambda r: shutil.rmtree(r / "Shrimp"), r"missing: \['Shrimp'\]"),
    (lambda r: (r / "NA_Fish_Dataset").mkdir(), r"unexpected: \['NA_Fish_Dataset'\]"),
    (lambda r: shutil.rmtree(r / "Trout" / "Trout GT"), "missing folder .*Trout GT"),
    (lambda r: [f.unlink() for f in (r / "Trout" / "Trout").iterdir()], "no images in"),
    (lambda r: mask_file(_first_image(r)).unlink(), "Trout: 1 images and masks are unpaired"),
    (lambda r: shutil.copy(mask_file(_first_image(r)), r / "Trout" / "Trout" / "m.png"),
     "unpaired, e.g. \\['m.png'\\]"),  # a mask mixed in with the images
    (lambda r: _first_image(r).write_bytes(b"not a png"),
     "(?s)1 damaged file\n.*00001.png: UnidentifiedImageError.*damaged='skip'"),
])
def test_broken_layouts_raise_clear_errors(broken, breakage, match):
    breakage(broken)
    with pytest.raises(DatasetLayoutError, match=match):
        validate_layout(broken)


def test_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="crowww/a-large-scale-fish-dataset"):
        validate_layout(tmp_path / "nowhere")


@pytest.fixture
def no_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    for var in ("FISH_DATASET", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle"))
    return tmp_path / "data"


def test_find_order(no_dataset, mini_dest, monkeypatch):
    with pytest.raises(FileNotFoundError, match="FISH_DATASET"):
        find_fish_dataset()
    monkeypatch.setenv("FISH_DATASET", str(mini_dest))
    assert find_fish_dataset() == dataset_root(mini_dest)
    assert find_fish_dataset(mini_dest / "Fish_Dataset") == dataset_root(mini_dest)


@pytest.mark.slow  # builds the default mini set
def test_find_falls_back_to_mini(no_dataset):
    root = find_fish_dataset(allow_mini=True)
    assert root == no_dataset / "mini_fish" / "Fish_Dataset" / "Fish_Dataset"
    assert is_mini_fish(root)
    assert validate_layout(root)


def test_dataloaders(mini_root):
    dls = fish_dataloaders(mini_root, size=32, bs=4, num_workers=0)
    assert list(dls.vocab) == list(CLASSES)
    assert len(dls.valid_ds) == int(0.2 * 54)
    x, y = dls.one_batch()
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    again = fish_dataloaders(mini_root, size=32, bs=4, num_workers=0)
    assert again.valid_ds.items == dls.valid_ds.items  # same seed, same split


def test_dataloaders_with_masks(mini_root):
    dls = fish_dataloaders(mini_root, size=32, bs=4, with_masks=True, batch_tfms=[],
                           num_workers=0)
    x, y, m = dls.valid.one_batch()
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,) and m.shape == (4, 32, 32)
    assert set(m.unique().tolist()) <= {0, 1} and m.float().mean() > 0.02
    # the mask goes through the same Resize as its image: compare with the resized GT file
    f = dls.valid_ds.items[0]
    gt = torch.from_numpy(np.array(Image.open(mask_file(f)).resize((32, 32), Image.NEAREST)))
    agree = ((gt > 127) == (m[0].cpu() > 0)).float().mean()
    assert agree > 0.95


def test_hidden_folders_are_not_classes(broken):
    """Jupyter leaves `.ipynb_checkpoints` wherever a notebook opened a file."""
    (broken / ".ipynb_checkpoints").mkdir()
    assert validate_layout(broken) == dict.fromkeys(CLASSES, 6)
    assert len(image_files(broken)) == 9 * 6


def test_learners_exported_before_the_split_still_load():
    """Exported learners pickle their item type by module: those exported when RGBImage and
    load_rgb lived in data.py name them there, and must still load: `load_fish_learner`'s
    unpicklers (trusted or checked) find them where they live now."""
    import io

    from gradcam_tut import images
    from gradcam_tut.tool.pickle_check import CheckedUnpickler, trusted_pickle

    for unpickler in (trusted_pickle.Unpickler, CheckedUnpickler):
        assert unpickler(io.BytesIO(b"cgradcam_tut.data\nRGBImage\n.")).load() is images.RGBImage
        assert unpickler(io.BytesIO(b"cgradcam_tut.data\nload_rgb\n.")).load() is images.load_rgb
