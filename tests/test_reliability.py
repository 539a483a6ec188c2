"""Bad data and wrong settings: each is caught before training, with a message that names the
problem and the fix, and nothing outside the temporary folders changes.

The other halves of the reliability suite sit beside what they test: `grad_cam`'s errors in
test_cam.py, the CLI's one-line errors and never-overwrite rules in test_cli.py, mini-fish's
refusals in test_mini_fish.py, the smoke flag's spellings in test_settings.py.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.vision.core import PILImage
from PIL import Image
from repo_state import file_mtimes

from gradcam_tut.fish_layout import DatasetLayoutError, mask_file
from gradcam_tut.images import RGBImage, load_rgb
from gradcam_tut.tool import decode_check
from gradcam_tut.tool.data import fish_dataloaders, project_dir
from gradcam_tut.tool.decode_check import damaged_images
from gradcam_tut.tool.layout import checked_image_files
from gradcam_tut.tool.settings import run_settings

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, int]:
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__", ".ipynb_checkpoints"}
    return file_mtimes(root, skip)


@pytest.fixture(scope="module", autouse=True)
def nothing_outside_tmp_changes():
    before = _snapshot(REPO)
    yield
    assert _snapshot(REPO) == before


@pytest.fixture
def fish(mini_root, tmp_path):
    """A writable copy of the mini set (6 per class, 64x48)."""
    root = tmp_path / "Fish_Dataset" / "Fish_Dataset"
    shutil.copytree(mini_root, root)
    return root


def _images(root, cls):
    return sorted((root / cls / cls).iterdir())


def _damage(root) -> list[Path]:
    """A truncated PNG, an empty file and text named .png: each used to crash mid-epoch."""
    truncated, empty, text = _images(root, "Trout")[0], _images(root, "Shrimp")[1], \
        mask_file(_images(root, "Sea Bass")[2])
    truncated.write_bytes(truncated.read_bytes()[:-200])
    empty.write_bytes(b"")
    text.write_text("not a png")
    return [truncated, empty, text]


def test_damaged_files_stop_before_training(fish):
    bad = _damage(fish)
    with pytest.raises(DatasetLayoutError) as err:
        fish_dataloaders(fish, size=32, bs=4)
    msg = str(err.value)
    assert msg.startswith("3 damaged files\n")
    for f in bad:
        assert str(f) in msg  # all of them, in one error
    assert "truncated" in msg and "cannot identify image file" in msg
    assert "Replace or delete them" in msg and "damaged='skip'" in msg


def test_damaged_files_can_be_skipped_with_a_warning(fish):
    bad = _damage(fish)
    with pytest.warns(UserWarning, match="leaving out 3 damaged files") as rec:
        dls = fish_dataloaders(fish, size=32, bs=4, damaged="skip")
    assert all(str(f) in str(rec[0].message) for f in bad)
    used = {*dls.train_ds.items, *dls.valid_ds.items}
    assert len(used) == 9 * 6 - 3  # the image whose mask is damaged goes too
    assert not used & {bad[0], bad[1], bad[2].parent.parent / "Sea Bass" / bad[2].name}
    dls.train.one_batch()
    with pytest.raises(ValueError, match="damaged='ignore': use 'raise' or 'skip'"):
        checked_image_files(fish, damaged="ignore")


def test_decompression_bomb_is_a_damaged_file(fish, monkeypatch):
    big = _images(fish, "Trout")[0]
    Image.new("RGB", (200, 200)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # the mini images have 3,072
    with pytest.raises(DatasetLayoutError, match="(?s)1 damaged file\n.*00001.png: "
                                                 "DecompressionBombError"):
        checked_image_files(fish)


def test_the_check_is_cached_and_sees_changes(fish, monkeypatch):
    files = _images(fish, "Trout")
    assert damaged_images(files) == {}
    monkeypatch.setattr(decode_check, "_decode", lambda f: pytest.fail("decoded again"))
    assert damaged_images(files) == {}  # the same files, unchanged: read from the cache
    files[0].write_bytes(b"")
    monkeypatch.undo()
    assert list(damaged_images(files)) == [files[0].absolute()]


def test_the_cache_folder_is_read_from_the_environment_at_each_call(fish, tmp_path, monkeypatch):
    files = _images(fish, "Trout")
    for home in ("a", "b"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / home))
        assert damaged_images(files) == {}
        assert len(list((tmp_path / home / "gradcam_tut" / "checked").glob("*.json"))) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert decode_check.cache_dir() == Path.home() / ".cache" / "gradcam_tut"

def test_empty_class_and_wrong_folder(fish, tmp_path):
    for f in _images(fish, "Shrimp"):
        f.unlink()
    with pytest.raises(DatasetLayoutError, match="no images in .*Shrimp/Shrimp: every class "
                                                 "needs images"):
        fish_dataloaders(fish, size=32)
    pets = tmp_path / "pets"
    (pets / "cat").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"1 class folder\(s\) \['cat'\]: a "
                                                 "classifier needs at least 2"):
        fish_dataloaders(pets, size=32)  # a wrong folder: not the Fish Dataset, nor usable
    with pytest.raises(FileNotFoundError, match="is not a folder. Download"):
        fish_dataloaders(tmp_path / "nowhere", size=32)


def test_unfinished_mini_set_is_an_error(mini_dest, tmp_path):
    dest = tmp_path / "mini"
    shutil.copytree(mini_dest, dest)
    marker = dest / "MINI_FISH.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    with pytest.raises(DatasetLayoutError, match="left unfinished: run `gradcam-tut mini-fish"):
        fish_dataloaders(dest, size=32)


def test_a_typo_in_fish_dataset_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FISH_DATASET", str(tmp_path / "Fish_Datset"))
    with pytest.raises(FileNotFoundError, match="FISH_DATASET=.*Fish_Datset' is not a folder: "
                                                "correct it, or unset FISH_DATASET"):
        run_settings(out=tmp_path / "runs")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    f = tmp_path / "scan.png"
    Image.fromarray(ramp).save(f)
    assert Image.open(f).mode.startswith("I")
    assert (np.asarray(PILImage.create(f)) == 255).mean() > 0.99  # fastai clips: white
    got = np.asarray(RGBImage.create(f))
    assert got.shape == (48, 64, 3) and got.dtype == np.uint8
    np.testing.assert_allclose(got[..., 0], ramp / 257, atol=0.5)
    assert load_rgb(f).mode == "RGB"


def test_data_and_runs_never_go_into_site_packages(tmp_path, monkeypatch):
    assert project_dir() == REPO  # running from a clone: its data/ and runs/
    installed = tmp_path / "site-packages" / "gradcam_tut"
    installed.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert project_dir(installed) == tmp_path  # installed: the current folder


IMPORTS_QUIETLY = """
import warnings
before = list(warnings.filters)
import gradcam_tut, gradcam_tut.tool.cli
with warnings.catch_warnings():  # what the command silences while it runs: fastai's import
    for message, category, module in gradcam_tut.tool.cli.FASTAI_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message, category, module)
    import gradcam_tut.learner, gradcam_tut.plot, gradcam_tut.tool.train, gradcam_tut.tool.settings
assert warnings.filters == before, "importing the package changed the warning filters"
"""


@pytest.mark.slow
def test_importing_the_package_is_quiet_and_leaves_the_warning_filters_alone():
    """No filter added on import (a library leaves them to its user); nothing warns but
    fastai's import, which `gradcam-tut` silences while a command runs."""
    out = subprocess.run([sys.executable, "-W", "error", "-c", IMPORTS_QUIETLY],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]


def test_a_learner_takes_a_path_a_string_and_a_16_bit_file(tiny_learner, mini_root, tmp_path):
    from gradcam_tut.learner import _one_image

    f = sorted((mini_root / "Trout" / "Trout").iterdir())[0]
    grey = Image.open(f).convert("L")
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(tmp_path / "16bit.png")
    by_path, by_str, by_pil = (_one_image(tiny_learner, x)[0]
                               for x in (f, str(f), Image.open(f)))
    assert torch.equal(by_path, by_str) and torch.equal(by_path, by_pil)
    x16 = _one_image(tiny_learner, tmp_path / "16bit.png")[0]
    assert torch.equal(x16, _one_image(tiny_learner, grey)[0])  # the 8-bit picture, not white
