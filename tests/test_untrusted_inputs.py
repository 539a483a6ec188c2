"""Files the user did not make: names a spreadsheet would run, stray result files, transparent
pixels, images that would decode to gigabytes (issue 25)."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from gradcam_tut.images import ImageTooLarge, load_rgb
from gradcam_tut.tool.decode_check import damaged_images
from gradcam_tut.tool.explaining import explain, image_paths
from gradcam_tut.tool.layout import class_name
from gradcam_tut.tool.results import FORMULA_STARTS, formula_safe, spreadsheet_text


def test_spreadsheet_text_neutralises_formulas_the_owasp_way():
    assert [spreadsheet_text(c) for c in ("=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx")] == \
        ["'=1+1", "'+1", "'-2", "'@SUM(A1)", "'\tx", "'\rx"]
    assert [spreadsheet_text(c) for c in ("Trout", -0.5, 3, "a=b")] == ["Trout", -0.5, 3, "a=b"]
    table = pd.DataFrame({"file": ["=x.png", "y.png"], "-l": [-1.0, 2.0]})
    safe = formula_safe(table)
    assert list(safe.columns) == ["file", "'-l"] and list(safe["file"]) == ["'=x.png", "y.png"]
    assert list(safe["'-l"]) == [-1.0, 2.0] and list(table["file"])[0] == "=x.png"


def test_explain_csv_holds_no_formula_with_relative_paths(tiny_learner, mini_root, tmp_path,
                                                          monkeypatch):
    trout = tmp_path / "Trout"
    trout.mkdir()
    sources = sorted((mini_root / "Trout" / "Trout").glob("*.png"))
    for name, src in zip(("=HYPERLINK(1).png", "+1.png", "-2.png", "@a.png"), sources):
        shutil.copy(src, trout / name)
    monkeypatch.chdir(trout)
    table = explain(tiny_learner, ["."], ["layer4"], out=tmp_path / "out")
    assert sorted(table["file"]) == sorted(p.name for p in trout.iterdir())  # as given
    with open(tmp_path / "out" / "explain.csv", newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c.startswith(FORMULA_STARTS)]
    assert "'=HYPERLINK(1).png" in cells and "'-2.png" in cells
    assert {class_name(f) for f in table["file"]} == {"Trout"}  # not "" for ./x.png


def test_a_stray_explain_csv_does_not_hide_a_class_folder(mini_root, tmp_path):
    cat = tmp_path / "pets" / "cat"
    shutil.copytree(mini_root / "Trout" / "Trout", cat)
    (cat / "explain.csv").write_text("someone's notes\n")
    assert len(image_paths([tmp_path / "pets"])) == len(list(cat.glob("*.png")))


def test_transparent_pixels_are_drawn_on_white_as_a_viewer_shows_them(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red everywhere, but hidden under alpha 0 on the left half
    a[:, 2:, 3] = 255
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    rgb = np.asarray(load_rgb(tmp_path / "x.png"))
    assert (rgb[:, :2] == 255).all() and (rgb[:, 2:] == [255, 0, 0]).all()
    Image.fromarray(a[..., [0, 3]].copy(), "LA").save(tmp_path / "la.png")
    assert (np.asarray(load_rgb(tmp_path / "la.png"))[:, :2] == 255).all()


def test_an_image_over_the_pixel_budget_is_refused_before_it_is_decoded(tmp_path,
                                                                         monkeypatch):
    f = tmp_path / "big.png"
    Image.new("I;16", (2000, 1000)).save(f)
    monkeypatch.setenv("GRADCAM_TUT_MAX_MEGAPIXELS", "1")
    with pytest.raises(ImageTooLarge, match="2000x1000.*budget of 1 megapixels.*"
                                            "GRADCAM_TUT_MAX_MEGAPIXELS"):
        load_rgb(f)
    assert "GRADCAM_TUT_MAX_MEGAPIXELS" in damaged_images([f])[f]
    monkeypatch.setenv("GRADCAM_TUT_MAX_MEGAPIXELS", "3")
    assert load_rgb(f).size == (2000, 1000) and damaged_images([f]) == {}
    monkeypatch.setenv("GRADCAM_TUT_MAX_MEGAPIXELS", "lots")
    with pytest.raises(ValueError, match="positive number"):
        load_rgb(f)


def test_a_grid_name_fits_a_file_name_however_long_the_image_name(tiny_learner, mini_root,
                                                                  tmp_path):
    from gradcam_tut.tool.explaining import grid_name

    long = "é" * 120 + "x" * 11  # 251 bytes: with the number and .png, over 255
    assert len(grid_name(7, Path(long + ".png")).encode()) <= 255
    assert grid_name(7, Path("a.png")) == "00007_a.png"
    shutil.copy(next((mini_root / "Trout" / "Trout").glob("*.png")), tmp_path / f"{long}.png")
    explain(tiny_learner, [tmp_path / f"{long}.png"], ["layer4"], out=tmp_path / "o", grids=True)
    assert len(list((tmp_path / "o" / "grids").iterdir())) == 1


def test_the_python_api_names_the_argument_and_the_fix(resnet18, batch):
    from gradcam_tut.cam import grad_cam

    with pytest.raises(TypeError, match=r"not a torch tensor: pass torch.as_tensor\(x\)"):
        grad_cam(resnet18, batch.numpy(), ["layer4"])
    with pytest.raises(TypeError, match=r"layers holds 3, a int: pass modules or names"):
        grad_cam(resnet18, batch, [3])
    with pytest.raises(ValueError, match="empty batch"):
        grad_cam(resnet18, batch[:0], ["layer4"])


def test_inputs_inside_out_are_refused_before_any_work(tiny_learner, mini_root, tmp_path):
    out = tmp_path / "out"
    trout = sorted((mini_root / "Trout" / "Trout").iterdir())[0]  # one grid to explain again
    explain(tiny_learner, [trout], ["layer4"], out=out, grids=True)
    before = sorted(p.name for p in (out / "grids").iterdir())
    with pytest.raises(ValueError, match="lies inside --out .*pick another --out"):
        explain(tiny_learner, [out / "grids"], ["layer4"], out=out, force=True)
    assert sorted(p.name for p in (out / "grids").iterdir()) == before
