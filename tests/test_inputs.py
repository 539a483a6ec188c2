"""Inputs read right: one file listing for training, `explain` and the checks (each real file
once, no masks, no earlier results, nested folders refused), every image mode and EXIF
orientation, masks saved as 0/1 or 0/255 and of the wrong size, mini-fish's lock, options and
marker, and the damaged-image cache. Each error names the problem and the fix, and nothing
outside the temporary folders changes."""

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from fastai.data.transforms import get_image_files, parent_label
from PIL import Image, ImageOps
from repo_state import file_mtimes

from gradcam_tut.fish_layout import CLASSES, DatasetLayoutError, mask_file
from gradcam_tut.images import fish_mask, load_rgb
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.data import fish_dataloaders
from gradcam_tut.tool.decode_check import damaged_images
from gradcam_tut.tool.explaining import image_paths
from gradcam_tut.tool.layout import (
    checked_image_files,
    image_files,
    listed_images,
    validate_layout,
)
from gradcam_tut.tool.mini_fish import MARKER, MiniFishSpec, make_mini_fish, mark_mask

REPO = Path(__file__).resolve().parents[1]
SPEC = MiniFishSpec(per_class=2, width=48, height=36)


def _state() -> dict[str, int]:
    """What a test could write by mistake: the repository's data/ and runs/, its top level."""
    return {**file_mtimes(REPO / "data"), **file_mtimes(REPO / "runs"),
            **{p.name: 0 for p in REPO.iterdir()}}


@pytest.fixture(scope="module", autouse=True)
def nothing_outside_tmp_changes():
    before = _state()
    yield
    assert _state() == before


def _pets(dest: Path, mini_root: Path, n: int = 3) -> Path:
    """Your own data: cat/ and dog/, n images each, borrowed from the mini set."""
    for pet, fish in (("cat", "Trout"), ("dog", "Shrimp")):
        (dest / pet).mkdir(parents=True)
        for f in sorted((mini_root / fish / fish).iterdir())[:n]:
            shutil.copy(f, dest / pet / f.name)
    return dest


# one listing


def test_a_symlink_loop_lists_each_file_once(mini_root, tmp_path):
    pets = _pets(tmp_path / "pets", mini_root)
    (pets / "cat" / "self").symlink_to(".", target_is_directory=True)  # a loop
    (pets / "dog" / "again.png").symlink_to(pets / "dog" / "00001.png")  # the same file
    outside = _pets(tmp_path / "outside", mini_root, n=1)
    (outside / "cat" / "back").symlink_to(outside / "cat", target_is_directory=True)
    (pets / "bird").symlink_to(outside / "cat", target_is_directory=True)  # a loop outside
    assert len(get_image_files(pets)) > 40  # fastai follows the loops until the OS stops it
    listed = listed_images(pets)
    assert [f.relative_to(pets).as_posix() for f in listed] == [
        "bird/00001.png", "cat/00001.png", "cat/00002.png", "cat/00003.png", "dog/00001.png",
        "dog/00002.png", "dog/00003.png"]  # own names rather than links, each once
    assert image_paths([pets, pets / "cat"]) == list(listed)  # explain: each real file once
    dls = fish_dataloaders(pets, size=16, bs=2, valid_pct=0.5)  # training: the same 7
    assert sorted(dls.train_ds.items + dls.valid_ds.items) == list(listed)
    (pets / "cat" / "up").symlink_to("..", target_is_directory=True)  # cat/up -> pets
    assert listed_images(pets) == listed
    with pytest.raises(DatasetLayoutError, match="pets/cat/up is a folder inside the class "
                                                 "folder .*pets/cat: lay your images out as"):
        validate_layout(pets)  # from cat/, `up` leads to dog's images: a folder in a class


def test_gt_mask_folders_are_never_listed(mini_dest, mini_root, tmp_path):
    assert len(get_image_files(mini_dest)) == 2 * 9 * 6  # fastai: the masks too
    for listed in (listed_images(mini_dest), image_paths([mini_dest]), image_files(mini_root)):
        assert len(listed) == 9 * 6 and not any(f.parent.name.endswith(" GT") for f in listed)
    # your own data: `cat GT/` holds masks, not a class
    pets = _pets(tmp_path / "pets", mini_root)
    shutil.copytree(pets / "cat", pets / "cat GT")
    assert validate_layout(pets) == {"cat": 3, "dog": 3}
    assert list(fish_dataloaders(pets, size=16, bs=2).vocab) == ["cat", "dog"]
    assert len(listed_images(pets)) == 6


def test_a_nested_folder_is_refused_by_the_validator_and_the_datablock(mini_root, tmp_path):
    pets = _pets(tmp_path / "pets", mini_root)
    (pets / "cat" / "indoor").mkdir()
    shutil.copy(pets / "cat" / "00001.png", pets / "cat" / "indoor" / "x.png")
    assert parent_label(get_image_files(pets / "cat")[-1]) == "indoor"  # a 3rd class in fastai
    match = (r"pets/cat/indoor is a folder inside the class folder .*pets/cat: lay your images "
             r"out as <root>/<class>/<image>")
    for check in (validate_layout, image_files, lambda p: fish_dataloaders(p, size=16)):
        with pytest.raises(DatasetLayoutError, match=match):
            check(pets)
    (pets / "cat" / "indoor" / "x.png").rename(pets / "cat" / "x.png")  # the fix
    assert validate_layout(pets) == {"cat": 4, "dog": 3} and len(image_files(pets)) == 7


def test_an_output_folder_inside_the_input_is_skipped(mini_root, tmp_path):
    photos = _pets(tmp_path / "photos", mini_root)
    for out, marker in (("explained", "explain.csv"), ("other", "complete.json")):
        (photos / out / "grids").mkdir(parents=True)
        (photos / out / marker).write_text("file\n")
        shutil.copy(photos / "cat" / "00001.png", photos / out / "grids" / "00000_x.png")
    run = photos / "runs" / "20260101-000000"  # a run of `gradcam-tut run`, and its latest
    for d in ("notebooks", "figures"):
        (run / d).mkdir(parents=True)
    shutil.copy(photos / "cat" / "00001.png", run / "figures" / "01_fig.png")
    (photos / "runs" / "latest").symlink_to(run.name, target_is_directory=True)
    (photos / "nb" / "models").mkdir(parents=True)  # a notebook run alone: out=photos/nb
    shutil.copytree(run / "figures", photos / "nb" / "figures")
    assert len(get_image_files(photos)) == 6 + 5  # fastai reads the results back
    assert [f.parent.name for f in image_paths([photos])] == ["cat"] * 3 + ["dog"] * 3
    assert validate_layout(photos) == {"cat": 3, "dog": 3}  # not classes either
    assert len(image_paths([photos / "explained"])) == 1  # a result named: listed as asked


# image modes and orientation


@pytest.fixture
def grey(tmp_path) -> np.ndarray:
    """An 8-bit grey ramp, 0..255, with its PNG at tmp_path/grey8.png."""
    a = np.linspace(0, 255, 48 * 64).reshape(48, 64).round().astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "grey8.png")
    return a


def test_32_bit_tiffs_are_not_black(grey, tmp_path):
    eight = np.asarray(load_rgb(tmp_path / "grey8.png"))
    Image.fromarray((grey / 255).astype(np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").convert("RGB").getextrema()[0][1] <= 1  # black
    for name, a, mode in (("float.tif", grey / 255, "F"), ("int.tif", grey, "I"),
                          ("int16.tif", grey.astype(np.int32) * 257, "I")):
        Image.fromarray(a.astype(np.float32 if mode == "F" else np.int32)).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == mode
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # they fit their depth: no warning
            got = np.asarray(load_rgb(tmp_path / name))
        np.testing.assert_array_equal(got, eight, err_msg=name)
    big_endian = Image.frombytes("I;16B", (64, 48), (grey.astype(">u2") * 257).tobytes())
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(load_rgb(big_endian)), eight)


def test_values_that_do_not_fit_their_depth_warn_with_the_file(grey, tmp_path):
    for name, a in (("neg.tif", grey.astype(np.int32) - 100),
                    ("big.tif", grey.astype(np.int32) * 1000),
                    ("hdr.tif", grey.astype(np.float32) / 255 * 4)):
        Image.fromarray(a).save(tmp_path / name)
        with pytest.warns(UserWarning, match=f"{name}: its [IF] values .* do not fit .*: "
                                             "scaled from their minimum to their maximum"):
            got = np.asarray(load_rgb(tmp_path / name))[..., 0]
        assert got.min() == 0 and got.max() == 255


def test_exif_rotated_jpeg_is_loaded_as_a_viewer_shows_it(tmp_path, tiny_learner):
    from gradcam_tut.images import RGBImage
    from gradcam_tut.learner import _one_image

    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # red on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    f = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(f, exif=exif, quality=95)
    viewed = ImageOps.exif_transpose(Image.open(f))
    assert viewed.size == (20, 40)
    for loaded in (load_rgb(f), RGBImage.create(f), RGBImage.create(str(f)),
                   load_rgb(Image.open(f))):
        assert loaded.size == (20, 40)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(viewed.convert("RGB")))
    assert np.asarray(load_rgb(f))[:10, :, 0].mean() > 200  # red is on top as viewed
    # explain (the learner's test_dl) and grid (_one_image) get the picture as viewed
    (x,) = tiny_learner.dls.test_dl([f]).one_batch()
    assert x.equal(_one_image(tiny_learner, viewed.convert("RGB"))[0])
    assert x.equal(_one_image(tiny_learner, f)[0])


# masks


@pytest.fixture
def fish(mini_root, tmp_path) -> Path:
    root = tmp_path / "Fish_Dataset" / "Fish_Dataset"
    shutil.copytree(mini_root, root)
    return root


def test_masks_saved_as_0_1_give_the_same_report_as_0_255(fish, tiny_learner):
    from gradcam_tut.learner import localization_report, mask_dl

    files = [sorted((fish / c / c).iterdir())[0] for c in CLASSES]
    report = localization_report(tiny_learner, mask_dl(tiny_learner, files, bs=9))
    for f in files:
        m = mask_file(f)
        Image.fromarray((np.asarray(Image.open(m)) > 0).astype(np.uint8)).save(m)  # 0/1
        assert np.asarray(Image.open(m)).max() == 1
    assert validate_layout(fish) == dict.fromkeys(CLASSES, 6)
    again = localization_report(tiny_learner, mask_dl(tiny_learner, files, bs=9))
    assert again.equals(report) and (report["chance"] > 0).all()


def test_a_mask_of_another_size_is_an_error_naming_the_pair(fish, monkeypatch):
    image = sorted((fish / "Trout" / "Trout").iterdir())[0]
    Image.open(mask_file(image)).resize((40, 30)).save(mask_file(image))
    pair = re.escape(f"the mask {mask_file(image)} is 40x30 pixels but its image {image} is "
                     "64x48: save the mask at its image's size")
    with pytest.raises(ValueError, match=pair):
        fish_mask(image)
    with pytest.raises(DatasetLayoutError, match=r"1 mask\(s\) of another size than their "
                                                 rf"image:\n  {pair}"):
        fish_dataloaders(fish, size=16)
    monkeypatch.chdir(fish / "Trout")
    with pytest.raises(DatasetLayoutError, match="1 mask.s. of another size"):
        fish_dataloaders("../../Fish_Dataset", size=16)  # a path with ..: the same check


# mini-fish


def test_mini_fish_leaves_no_lock_file_and_works_in_an_empty_current_folder(tmp_path,
                                                                          monkeypatch):
    make_mini_fish(tmp_path / "a", SPEC, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no .a.lock beside it
    here = tmp_path / "here"
    here.mkdir()
    (here / "..lock").write_text("")  # left by an older version: not content
    monkeypatch.chdir(here)
    assert main(["mini-fish", ".", "--per-class", "1", "--workers", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "here"]
    assert sorted(p.name for p in here.iterdir()) == ["..lock", "Fish_Dataset", MARKER]
    assert validate_layout(here) == {c: 1 for c in CLASSES}


@pytest.mark.parametrize("args, match", [
    (["--seed", "-1"], "seed=-1: use a whole number from 0 up"),
    (["--per-class", "0"], "per_class=0: ask for at least 1"),
    (["--per-class", "-3"], "per_class=-3: ask for at least 1"),
    (["--workers", "-1"], "n_workers=-1: use 0"),
    (["--mark", "1.5"], "mark=1.5: the share of marked images is in 0..1"),
    (["--mark", "nan"], "mark=nan: the share of marked images is in 0..1"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, args, match):
    dest = tmp_path / "m"
    assert main(["mini-fish", str(dest), *args]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no set, no lock, no marker
    assert main(["mini-fish", str(dest), "--per-class", "1"]) == 0  # the corrected rerun


def test_a_file_as_destination_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main(["mini-fish", str(tmp_path / "f")]) == 2
    assert "is a file: pass a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("broken", ["", "{", "[1, 2]", "\xff"])
def test_an_empty_or_broken_marker_is_an_unfinished_set(tmp_path, broken):
    dest = tmp_path / "m"
    make_mini_fish(dest, SPEC, progress=False)
    expected = {f: f.read_bytes() for f in dest.rglob("*.png")}
    (dest / MARKER).write_text(broken, encoding="latin-1")
    with pytest.raises(DatasetLayoutError, match=rf"the mini fish set in {dest} was left "
                                                 r"unfinished: run `gradcam-tut mini-fish .*` "
                                                 rf"\(with its options\) to finish it, or remove "
                                                 rf"it \(its {MARKER} is empty or broken\)"):
        validate_layout(dest)
    with pytest.raises(ValueError, match="is empty or broken: an unfinished set: rerun"):
        mark_mask(dest / "Fish_Dataset" / "Fish_Dataset" / "Trout" / "Trout" / "00001.png")
    make_mini_fish(dest, SPEC, progress=False)  # the rerun draws it again and finishes it
    assert json.loads((dest / MARKER).read_text())["complete"] is True
    assert {f: f.read_bytes() for f in dest.rglob("*.png")} == expected


# the damaged-image cache


def test_the_cache_sees_a_file_changed_in_place_with_size_and_mtime_kept(fish):
    f = sorted((fish / "Trout" / "Trout").iterdir())[0]
    assert damaged_images([f]) == {}
    st = f.stat()
    f.write_bytes(b"not a png" + f.read_bytes()[9:])  # its header overwritten
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert list(damaged_images([f])) == [f.absolute()]
    with pytest.raises(DatasetLayoutError, match=f"1 damaged file\n  {f}: .*\nReplace or "
                                                 "delete them"):
        checked_image_files(fish)
