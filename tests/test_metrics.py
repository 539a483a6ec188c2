import pytest
import torch

from gradcam_tut import grad_cam
from gradcam_tut.cam import upsample
from gradcam_tut.metrics import (
    centre_map,
    chance,
    energy_in_mask,
    localization_report,
    mask_dl,
    peak_points,
    pointing_game,
)


def square_mask(H=10, W=10, rows=slice(2, 5), cols=slice(2, 5)):
    m = torch.zeros(1, H, W, dtype=torch.bool)
    m[0, rows, cols] = True
    return m


def point_map(y, x, H=10, W=10):
    m = torch.zeros(1, H, W)
    m[0, y, x] = 1.0
    return m


def test_pointing_inside_outside_and_tolerance():
    mask = square_mask()  # rows and columns 2..4
    assert pointing_game(point_map(3, 3), mask).tolist() == [True]
    assert pointing_game(point_map(2, 4), mask).tolist() == [True]  # on the border: inside
    assert pointing_game(point_map(3, 7), mask).tolist() == [False]  # 3 px right of it
    assert pointing_game(point_map(3, 7), mask, tolerance=2.9).tolist() == [False]
    assert pointing_game(point_map(3, 7), mask, tolerance=3).tolist() == [True]
    assert pointing_game(point_map(7, 7), mask, tolerance=4).tolist() == [False]  # 4.24 px
    assert pointing_game(point_map(7, 7), mask, tolerance=4.3).tolist() == [True]


def test_pointing_batch_zero_map_one_pixel_and_full_mask():
    one_pixel = torch.zeros(1, 10, 10, dtype=torch.bool)
    one_pixel[0, 6, 1] = True
    maps = torch.cat([point_map(6, 1), torch.zeros(1, 10, 10), point_map(0, 0)])
    masks = torch.cat([one_pixel, torch.ones(1, 10, 10, dtype=torch.bool), one_pixel])
    # a hit on a one-pixel mask; an all-zero map misses even a full mask; a miss
    assert pointing_game(maps, masks).tolist() == [True, False, False]
    assert pointing_game(torch.ones(1, 10, 10), masks[1:2]).tolist() == [True]


def test_plateau_peak_is_its_middle_not_its_first_pixel():
    coarse = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # max in the bottom-right cell
    heat = upsample(coarse, (8, 8))  # a flat 3x3 corner of 1.0 (rows/cols 5..7)
    y, x = peak_points(heat)
    assert (y.item(), x.item()) == (6, 6)
    assert peak_points(torch.ones(1, 5, 5)) == (torch.tensor([2]), torch.tensor([2]))


def test_energy_in_mask():
    mask = square_mask()
    assert energy_in_mask(point_map(3, 3), mask).tolist() == [1.0]
    assert energy_in_mask(point_map(8, 8), mask).tolist() == [0.0]
    flat = torch.ones(1, 10, 10)
    assert energy_in_mask(flat, mask).item() == pytest.approx(9 / 100)
    assert energy_in_mask(flat, mask).item() == pytest.approx(chance(mask).item())
    half = point_map(3, 3) + point_map(8, 8)
    assert energy_in_mask(half, mask).item() == pytest.approx(0.5)
    zero = energy_in_mask(torch.zeros(1, 10, 10), mask)
    assert zero.tolist() == [0.0] and not zero.isnan().any()


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="upsample the maps"):
        pointing_game(torch.ones(1, 4, 4), square_mask())
    with pytest.raises(ValueError, match="non-negative"):
        energy_in_mask(-point_map(3, 3), square_mask())


def test_centre_baseline():
    c = centre_map(9, 11)
    assert c.argmax().item() == 4 * 11 + 5 and c.min().item() == 0.0
    centred, corner = square_mask(9, 11, slice(3, 6), slice(4, 7)), square_mask(9, 11)
    assert pointing_game(c[None], centred).tolist() == [True]
    assert pointing_game(c[None], corner).tolist() == [False]


def test_localization_report_on_a_trained_model(tiny_learner, mini_root):
    from gradcam_tut.data import fish_dataloaders

    tiny_learner.dls = fish_dataloaders(mini_root, size=32, bs=8, num_workers=0)
    dl = mask_dl(tiny_learner)
    xb, yb, mb = dl.one_batch()
    assert mb.shape == (8, 32, 32) and set(mb.unique().tolist()) <= {0, 1}
    report = localization_report(tiny_learner, layers=["layer1", "layer4"])
    assert list(report.index) == ["layer1", "layer4"]
    assert list(report.columns) == ["map", "pointing", "energy", "zero_maps", "chance",
                                    "centre", "images"]
    assert report["map"].tolist() == ["8x8", "1x1"]
    n = len(tiny_learner.dls.valid_ds)
    assert (report["images"] == n).all()
    assert report[["pointing", "energy", "zero_maps", "chance"]].stack().between(0, 1).all()
    # the same numbers by hand, from the same batches
    hits, total = torch.zeros(()), 0
    for xb, yb, mb in dl:
        (m,) = grad_cam(tiny_learner.model, xb, "layer1", yb)
        hits += pointing_game(upsample(m, mb.shape[-2:]), mb.bool()).sum()
        total += len(xb)
    assert report.loc["layer1", "pointing"] == pytest.approx((hits / total).item())
    pred = localization_report(tiny_learner, layers=["layer4"], targets="pred")
    assert pred["images"].item() == n
    tol = localization_report(tiny_learner, layers=["layer1", "layer4"], tolerance=4)
    assert list(tol.columns) == ["map", "pointing", "pointing_tol", "energy", "zero_maps",
                                 "chance", "centre", "centre_tol", "images"]
    assert tol["pointing"].tolist() == report["pointing"].tolist()
    assert (tol["pointing_tol"] >= tol["pointing"]).all()
    assert (tol["centre_tol"] >= tol["centre"]).all()
    with pytest.raises(ValueError, match="'true'"):
        localization_report(tiny_learner, targets="label")
