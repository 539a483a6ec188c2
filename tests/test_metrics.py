import pytest
import torch

from gradcam_tut.cam import upsample
from gradcam_tut.metrics import (
    centre_map,
    chance,
    energy_in_mask,
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


def quantus_pointing(maps, masks):
    """Quantus 0.6's PointingGame, written out: a hit when any pixel of the maximum is in the
    mask."""
    top = maps.flatten(1) == maps.flatten(1).amax(dim=1, keepdim=True)
    return (top & masks.flatten(1).bool()).any(dim=1)


def quantus_energy(maps, masks):
    """Quantus 0.6's AttributionLocalisation (the energy in the mask), written out."""
    return (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)


def test_pointing_and_energy_agree_with_quantus_except_on_ties():
    """300 random maps, 150 of them coarse and upsampled (plateaus where a border cell is
    copied): the same hits and energies as Quantus's definitions, except where the maximum is
    tied across the mask's edge, which the two conventions score differently."""
    torch.manual_seed(0)
    fine = torch.rand(150, 32, 32)
    coarse = upsample(torch.rand(150, 4, 4), (32, 32))
    maps = torch.cat([fine, coarse])
    masks = torch.zeros(300, 32, 32)
    for i in range(300):
        y, x = torch.randint(0, 24, (2,)).tolist()
        masks[i, y:y + 8, x:x + 10] = 1
    torch.testing.assert_close(energy_in_mask(maps, masks), quantus_energy(maps, masks))
    ours, theirs = pointing_game(maps, masks), quantus_pointing(maps, masks)
    flat = maps.flatten(1)
    tied = (flat == flat.amax(dim=1, keepdim=True)).sum(dim=1) > 1
    assert torch.equal(ours[~tied], theirs[~tied]) and (~tied).sum() > 200
    assert (ours[tied] <= theirs[tied]).all()  # any tied pixel inside is a hit for Quantus
