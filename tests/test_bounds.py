"""Bounds checked before work (issue 25): a mini fish set that cannot fit this machine, and
masks of another size than their images, are refused in one message before anything is
drawn or any notebook runs."""

import shutil
from collections import namedtuple

import pytest
from PIL import Image

from gradcam_tut.fish_layout import mask_file
from gradcam_tut.tool import runner
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.mini_fish import MiniFishSpec


def test_mini_fish_counts_and_sizes_that_cannot_fit_are_refused(tmp_path, capsys):
    dest = tmp_path / "mini"
    assert main(["mini-fish", str(dest), "--per-class", "100000000000"]) == 2
    err = capsys.readouterr().err
    assert err == ("gradcam-tut: error: per_class=100000000000: ask for at most 99999 images "
                   "per class\n")
    assert not dest.exists()
    with pytest.raises(ValueError, match="20000x96: draw at most 4096 pixels a side"):
        MiniFishSpec(width=20_000)


def test_mini_fish_that_would_fill_the_disk_is_refused(tmp_path, monkeypatch, capsys):
    """The disk budget: one image and mask drawn and compressed, times the count, against the
    free space; named, with what to do."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    dest = tmp_path / "mini"
    assert main(["mini-fish", str(dest), "--per-class", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradcam-tut: error: 9 x 5000 images of "
                                                   "128x96 take about ")
    assert f"GB, more than the 0.001 GB free on the disk of {tmp_path}: ask for fewer " \
           "(--per-class), free some space, or write to a larger disk" in err
    assert not dest.exists()
    assert main(["mini-fish", str(dest), "--per-class", "1"]) == 0  # what fits is drawn
    assert len(list(dest.rglob("*.png"))) == 18


def test_run_data_catches_masks_of_another_size_before_any_notebook(mini_dest, tmp_path,
                                                                    monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a notebook ran")
    monkeypatch.setattr(runner, "run_notebooks", never)
    data = tmp_path / "fish"
    shutil.copytree(mini_dest, data)
    image = sorted((data / "Fish_Dataset" / "Fish_Dataset" / "Trout" / "Trout").iterdir())[0]
    Image.open(mask_file(image)).resize((40, 30)).save(mask_file(image))
    runs = tmp_path / "runs"
    assert main(["run", "--smoke", "--data", str(data), "--out", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err == (f"gradcam-tut: error: 1 mask(s) of another size than their image:\n  the "
                   f"mask {mask_file(image)} is 40x30 pixels but its image {image} is 64x48: "
                   "save the mask at its image's size\n")
    assert not runs.exists()
