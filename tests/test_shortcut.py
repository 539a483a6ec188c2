"""Counterfactual test sets and what they measure: the network asked, not its map."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.data.transforms import parent_label
from PIL import Image

from gradcam_tut.tool.mini_fish import MARKS, MiniFishSpec, mark_class, mark_mask
from gradcam_tut.tool.shortcut import counterfactual_sets, shortcut_scores

SPEC = MiniFishSpec(per_class=3, width=48, height=36, seed=7)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return counterfactual_sets(tmp_path_factory.mktemp("cf"), SPEC)


def test_three_versions_of_the_same_fish(sets):
    assert [len(f) for f in sets.values()] == [27, 27, 27]
    for clean, marked, swapped in zip(*sets.values()):
        cls = parent_label(clean)
        assert parent_label(marked) == parent_label(swapped) == cls
        assert mark_class(clean) is None and mark_class(marked) == cls
        assert mark_class(swapped) not in (None, cls)  # always another class's mark
        a, b, c = (np.asarray(Image.open(f)) for f in (clean, marked, swapped))
        box = np.asarray(mark_mask(marked)).astype(bool)
        assert np.array_equal(np.asarray(mark_mask(swapped)).astype(bool), box)
        assert np.array_equal(a[~box], b[~box]) and np.array_equal(a[~box], c[~box])
        assert (b[box] == MARKS[cls]).all() and (c[box] == MARKS[mark_class(swapped)]).all()


class _Stub:
    """A learner whose predictions are chosen by the test: the fish's class, or the mark's."""

    def __init__(self, vocab, follow_mark):
        self.dls = SimpleNamespace(vocab=vocab, test_dl=lambda files, bs: files)
        self.follow_mark = follow_mark

    def get_preds(self, dl):
        cls = [mark_class(f) if self.follow_mark and mark_class(f) else parent_label(f)
               for f in dl]
        return torch.eye(len(self.dls.vocab))[[self.dls.vocab.o2i[c] for c in cls]], None


def test_shortcut_scores_counts_the_fish_and_the_mark(sets):
    from fastai.data.transforms import CategoryMap

    vocab = CategoryMap(list(MARKS))
    fish = shortcut_scores(_Stub(vocab, follow_mark=False), sets)
    assert fish == {"clean accuracy": 1.0, "marked accuracy": 1.0, "swapped accuracy": 1.0,
                    "follows mark": 0.0}
    mark = shortcut_scores(_Stub(vocab, follow_mark=True), sets)
    assert mark == {"clean accuracy": 1.0, "marked accuracy": 1.0, "swapped accuracy": 0.0,
                    "follows mark": 1.0}


def test_mark_decides_where_the_prediction_follows_the_mark(sets):
    from fastai.data.transforms import CategoryMap

    from gradcam_tut.tool.shortcut import mark_decides

    vocab = CategoryMap(list(MARKS))
    assert mark_decides(_Stub(vocab, follow_mark=False), sets).tolist() == [0.0] * 27
    assert mark_decides(_Stub(vocab, follow_mark=True), sets).tolist() == [1.0] * 27


def test_moved_alone_counts_what_the_region_carries():
    """A model that reads the left half only: the left half moved makes the source's class,
    the right half the receiver's."""
    from gradcam_tut.tool.shortcut import moved_alone

    y = torch.arange(3).repeat(4)
    x = torch.nn.functional.one_hot(y, 3).float()[:, :, None, None].expand(-1, -1, 8, 8)
    left = torch.zeros(12, 8, 8, dtype=torch.bool)
    left[:, :, :4] = True

    def reads_left(xb):  # its class: the channel brightest on the left half
        return xb[..., :4].mean((2, 3))

    assert moved_alone(reads_left, x, y, left) == 1.0
    assert moved_alone(reads_left, x, y, ~left) == 0.0


def test_swap_and_shuffle_exclude_each_other():
    with pytest.raises(ValueError, match="shuffle_marks and swap_marks: pick one"):
        MiniFishSpec(mark=1.0, shuffle_marks=True, swap_marks=True)


def test_where_maps_lie_finds_maps_on_the_mark_and_off_it(sets, tiny_learner):
    """Maps made from the mark's own square lie on it; the same maps turned 180 degrees lie in
    the opposite corner, off it."""
    import torch.nn.functional as F

    from gradcam_tut.learner import mask_dl
    from gradcam_tut.tool.shortcut import where_maps_lie

    files = list(sets["marked"])
    masks = torch.cat([mb.as_subclass(torch.Tensor).float()
                       for _, _, mb in mask_dl(tiny_learner, files, mark_mask)])
    on = F.adaptive_avg_pool2d(masks[:, None], 8)[:, 0].numpy()  # layer1: 8x8 cells at 32 px
    at = where_maps_lie(tiny_learner, files, on, "layer1")
    away = where_maps_lie(tiny_learner, files, on[:, ::-1, ::-1].copy(), "layer1")
    assert len(at) == len(files) and at["on mark"].mean() == 1 and away["on mark"].sum() == 0
    assert (at["mark energy"] > 2 * at["mark area"]).all()
    assert (away["mark energy"] < at["mark area"]).all()
    assert 0 < at["mark area"].min() and at["mark area"].max() < 0.2
