"""Interventions on tensors: regions from maps, their controls, taken away (filled in) and
moved (pasted), what a network does then, and where a group's regions sit."""

import numpy as np
import pytest
import torch
from torch import nn

from gradcam_tut.tool.interventions import (
    colour_codes,
    copied_colours,
    dilate,
    elsewhere,
    fill,
    fixed_content,
    intervene,
    map_regions,
    paste,
    same_place,
    swap_content,
)


def square(n: int, y: int, x: int, side: int = 8, size: int = 32) -> torch.Tensor:
    """n regions (n, size, size), each a square at (y, x)."""
    r = torch.zeros(n, size, size, dtype=torch.bool)
    r[:, y:y + side, x:x + side] = True
    return r


def test_a_region_is_where_the_map_reaches_the_level():
    heat = torch.zeros(3, 8, 8)
    heat[0, 2, 3], heat[0, 5, 5] = 1.0, 0.49  # one cell at the top, one below the level
    heat[1] = torch.arange(64.0).view(8, 8)  # a ramp: its upper half (32 of 64 cells)
    regions = map_regions(heat)
    assert regions[0].sum() == 1 and regions[0, 2, 3]
    assert regions[1].sum() == 32 and not regions[2].any()  # an all-zero map: nowhere


def test_the_control_is_the_same_shape_elsewhere_and_the_same_every_run():
    regions = torch.cat([square(3, 4, 4), square(1, 0, 0, side=20)])
    controls = elsewhere(regions, seed=1)
    assert torch.equal(controls, elsewhere(regions, seed=1))
    assert (controls.sum((1, 2)) == regions.sum((1, 2))).all()  # shifted: the same area
    assert not (controls[:3] & regions[:3]).any()  # room enough: no overlap at all
    assert not torch.equal(controls[0], regions[0])


def test_fill_takes_the_region_away_and_leaves_the_rest():
    x = torch.zeros(2, 3, 32, 32)
    x[:, 1] = torch.linspace(-1, 1, 32)  # a horizontal ramp in one channel
    x[:, 0, 4:12, 4:12] = 5.0  # a mark, in the region
    regions = square(2, 4, 4)
    filled = fill(x, regions)
    assert torch.equal(filled[:, :, ~regions[0]], x[:, :, ~regions[0]])
    assert filled[:, 0, 4:12, 4:12].abs().max() < 0.5  # the mark is gone
    inside = filled[0, 1, 8, 4:12]  # the ramp, rebuilt from around the hole
    assert torch.allclose(inside, x[0, 1, 8, 4:12], atol=0.15)
    assert torch.equal(x[:, 0, 4:12, 4:12], torch.full((2, 8, 8), 5.0))  # x unchanged


def test_paste_copies_the_region_at_the_same_place():
    into, source = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    out = paste(into, source, square(1, 20, 2))
    assert out.sum() == 3 * 64 and out[0, :, 20:28, 2:10].eq(1).all()


class CornerReader(nn.Module):
    """Class k's logit: how much of channel 0 in the top-left 8x8 corner equals k (a network
    that reads a mark in the corner and nothing else)."""

    def forward(self, x):
        corner = x[:, 0, :8, :8].mean((1, 2))  # (B,)
        return -(corner[:, None] - torch.arange(3.0)) ** 2 * 10


def test_moving_the_region_a_network_reads_turns_other_images_into_its_class():
    x = torch.zeros(4, 3, 32, 32)
    x[:2, 0, :8, :8] = 2.0  # two images of class 2 (its mark), two of class 0
    classes = torch.tensor([2, 2, 0, 0])
    regions = square(4, 0, 0)
    receivers = x[[2, 3, 0, 1]]  # each moved into an image of the other class
    out = intervene(CornerReader(), x, classes, regions, receivers)
    assert out["moved"].tolist() == [1, 1, 1, 1]  # the corner decides, wherever it goes
    assert out["removed_pred"][:2].tolist() == [0, 0]  # taken away: back to the background
    control = intervene(CornerReader(), x, classes, square(4, 20, 20), receivers)
    assert control["moved"][:2].tolist() == [0, 0]  # a patch elsewhere: nothing
    assert control["removed_pred"][:2].tolist() == [2, 2]


def test_same_place_is_large_for_a_fixed_place_and_about_one_anywhere():
    g = torch.Generator().manual_seed(0)
    size, radius = (32, 32), 2
    fixed = torch.tensor([[1, 30]] * 40)  # every peak in the top-right corner
    anywhere = torch.randint(0, 32, (400, 2), generator=g)
    assert same_place(fixed, [0] * 40, size, radius).min() == 16  # 1 / a 4x4 corner square
    ratio = same_place(anywhere, [0] * 400, size, radius)
    assert 0.7 < ratio.median() < 1.3, ratio.median()
    mirrored = torch.tensor([[1, 1]] * 20 + [[30, 30]] * 20)  # opposite corners: one place
    assert same_place(mirrored, [0] * 40, size, radius).min() == 16
    two = same_place(torch.cat([fixed[:20], anywhere[:20]]), ["a"] * 20 + ["b"] * 20, size,
                     radius)
    assert two[:20].min() == 16 and two[20:].median() < 3  # each group on its own
    assert same_place(fixed[:1], ["a"], size, radius).isnan().all()


def test_a_region_grows_by_half_a_cell():
    heat = torch.zeros(1, 16, 16)
    heat[0, 8, 8] = 1
    assert map_regions(heat, grow=2)[0].sum() == 25


@pytest.mark.parametrize("steps", [1, 2])
def test_fill_is_exact_on_a_constant_image(steps):
    x = torch.full((1, 3, 16, 16), 0.3)
    regions = square(1, 2, 2, side=4 * steps, size=16)
    assert torch.allclose(fill(x, regions), x)


def scenes(n: int, colour: float, mark: bool, seed: int) -> torch.Tensor:
    """n noisy 32x32 images, each with an object (an 8x8 square of `colour`) anywhere and, with
    `mark`, the same `colour` in a 6x6 corner, a random corner each: a mark up to mirrors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    for i in range(n):
        y0, x0 = torch.randint(0, 24, (2,), generator=g).tolist()
        x[i, :, y0:y0 + 8, x0:x0 + 8] = colour
        if mark:
            flip = torch.randint(0, 4, (1,), generator=g).item()
            x[i, :, :6, :6] = colour
            x[i] = x[i].flip(-1) if flip & 1 else x[i]
            x[i] = x[i].flip(-2) if flip & 2 else x[i]
    return x


def test_fixed_content_is_high_on_a_mark_at_one_place_and_low_on_objects_anywhere():
    """A class's mark, the same in each of its images at one place up to mirrors, is fixed
    content; its object, as alike but anywhere, is not; nor is a mark every class shares."""
    x = torch.cat([scenes(24, 0.1, True, 0), scenes(24, 0.9, True, 1)])
    groups = [0] * 24 + [1] * 24
    everywhere = torch.ones(48, 32, 32, dtype=torch.bool)
    score = fixed_content(x, everywhere, groups)
    mark = torch.zeros(48, 32, 32, dtype=torch.bool)
    for i in range(48):  # the corner that holds the mark, whichever it is
        for r, c in ((slice(0, 6), slice(0, 6)), (slice(0, 6), slice(26, 32)),
                     (slice(26, 32), slice(0, 6)), (slice(26, 32), slice(26, 32))):
            if (x[i, :, r, c] == x[i, 0, r, c][0, 0]).all():
                mark[i, r, c] = True
    assert mark.flatten(1).any(1).all()
    inner = torch.nn.functional.max_pool2d(mark[:, None].float(), 3, 1, 1)[:, 0] == 0
    assert score[mark].median() > 0.9  # the mark: the class's own images hold it there
    assert score[inner].median() < 0.2  # objects and noise: anything is anywhere
    shared = fixed_content(torch.cat([scenes(24, 0.5, True, 2), scenes(24, 0.5, True, 3)]),
                           everywhere, groups)
    assert shared.median() < 0.2  # the same mark in every class tells none apart
    assert fixed_content(x[:2], everywhere[:2], [0, 1]).isnan().all()  # no other image


def test_a_class_s_content_is_exchanged_for_another_s_where_the_image_holds_it():
    """x - own + other on the region, by hand: a backdrop of 0.2 with a fish of 0.9 on it,
    its class's backdrop (0.2) exchanged for another's (0.6) around the fish, which stays."""
    x = torch.full((1, 3, 4, 4), 0.2)
    x[..., 1:3, 1:3] = 0.9  # the fish
    own, other = torch.full((1, 3, 4, 4), 0.2), torch.full((1, 3, 4, 4), 0.6)
    where = torch.ones(1, 4, 4, dtype=torch.bool)
    where[:, 1:3, 1:3] = False  # the image does not hold its class's content on the fish
    out = swap_content(x, own, other, where)
    want = torch.full((1, 3, 4, 4), 0.6)
    want[..., 1:3, 1:3] = 0.9
    assert torch.allclose(out, want) and torch.equal(x[0, 0, 0], torch.full((4,), 0.2))


def test_a_colour_is_one_integer_of_six_bits_a_channel_from_bytes_or_floats():
    """(r, g, b) >> 2 packed as r g b; fastai's decoded bytes and floats in 0..1 agree."""
    rgb = torch.tensor([[255, 0, 0], [4, 8, 252], [3, 7, 251]]).T[None, :, :, None]  # (1,3,3,1)
    codes = colour_codes(rgb)[0, :, 0].tolist()
    assert codes == [63 << 12, (1 << 12) | (2 << 6) | 63, (0 << 12) | (1 << 6) | 62]
    assert colour_codes(rgb / 255).tolist() == colour_codes(rgb).tolist()


def test_a_copy_is_a_colour_its_class_holds_anywhere_and_other_classes_do_not():
    """By hand: colour 7 is in all three images of class a and in one of class b's three;
    colour 1 is in every image; image 6 is alone in class c."""
    held = [np.array([1, 7, 9]), np.array([1, 7]), np.array([1, 7]),
            np.array([1, 7]), np.array([1]), np.array([1, 5]), np.array([1, 7])]
    near = [np.array([1, 7, 9]), np.array([7]), np.array([1]), np.array([7]), np.array([1]),
            np.array([5]), np.array([7])]
    lifts = copied_colours(near, held, list("aaabbbc"))
    # image 0: colour 1 held by 2 of its 2 others and 4 of 4 others: 0; colour 7: 1 - 2/4;
    # colour 9: its class's others hold none: 0 - 0
    assert lifts[0].tolist() == [0.0, 0.5, 0.0]
    assert lifts[1].tolist() == [0.5] and lifts[2].tolist() == [0.0]
    assert lifts[3].tolist() == [-1.0]  # none of its class's others, all 4 of the rest
    assert np.isnan(lifts[6]).all()  # no other image of its class


@pytest.mark.parametrize("grow", [1, 3, 16, 40])
def test_dilate_is_the_max_pool_of_a_square(grow):
    """The running sums grow a mask exactly as a (2 grow + 1)-square max pool does, edges
    included."""
    regions = torch.rand(4, 37, 53, generator=torch.Generator().manual_seed(grow)) > 0.97
    pooled = torch.nn.functional.max_pool2d(regions[:, None].float(), 2 * grow + 1, 1, grow)
    assert torch.equal(dilate(regions, grow), pooled[:, 0].bool())
