"""Evidence by intervention: what the network does when the region a map points at is taken
away, or moved into other images.

A map says where a layer holds evidence; it does not say that what is there decides the class.
Two counterfactual images per region ask the network itself:

    taken away   the region filled in from the image's own surroundings (`fill`): does the
                 prediction change?
    moved        the region pasted, at the same place, into an image of another class: is that
                 image now predicted as the region's class?

Each beside its control: the same intervention on a region of the same size and shape
elsewhere in the same image (`elsewhere`), so that a number says what the region does beyond
any patch of that size. Regions are boolean masks (N, H, W) on the network's input; images are
the input batches as the network sees them (normalised), so everything here is plain tensor
maths, for any model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REGION_LEVEL = 0.5  # a map's region: where it is at least this share of its maximum


def map_regions(heat: Tensor, level: float = REGION_LEVEL) -> Tensor:
    """Where each map points: the pixels where it reaches `level` times its maximum.

    Args:
        heat: (N, H, W) maps placed on the image (`receptive_field.place`).

    Returns:
        (N, H, W) bool; all False for an all-zero map (it points nowhere).
    """
    top = heat.flatten(1).amax(dim=1)[:, None, None]
    return (heat >= level * top) & (top > 0)


def elsewhere(regions: Tensor, seed: int = 0, tries: int = 16) -> Tensor:
    """For each region, the same shape moved to another place (shifted, wrapping round the
    image's edges): of `tries` random shifts (seeded: the same every run), the one that
    overlaps the region least."""
    N, H, W = regions.shape
    g = torch.Generator().manual_seed(seed)
    shifts = torch.stack([torch.randint(H, (N, tries), generator=g),
                          torch.randint(W, (N, tries), generator=g)], dim=-1)  # (N, T, 2)
    out = torch.empty_like(regions)
    for i, region in enumerate(regions):
        moved = [torch.roll(region, (int(dy), int(dx)), (0, 1)) for dy, dx in shifts[i]]
        overlap = torch.stack([(m & region).sum() for m in moved])
        out[i] = moved[int(overlap.argmin())]
    return out


def fill(x: Tensor, regions: Tensor) -> Tensor:
    """Each image with its region filled in from the pixels around it (push-pull: the known
    pixels averaged down a pyramid, the holes filled from the coarser level on the way up),
    so no colour or edge of the region's own content is left.

    Args:
        x: (N, C, H, W) images; `regions` (N, H, W) bool, the pixels to fill.

    Returns:
        A new (N, C, H, W) tensor; `x` is unchanged.
    """
    known = (~regions).to(x.dtype)[:, None]  # (N, 1, H, W)
    levels = [(x * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        v, w = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    v, w = levels[-1]
    filled = v / w.clamp(min=1e-6)
    for v, w in reversed(levels[:-1]):
        coarse = F.interpolate(filled, size=v.shape[-2:], mode="bilinear", align_corners=False)
        filled = v + (1 - w) * coarse  # w * (the known pixels' mean) + (1 - w) * the coarse fill
    return torch.where(regions[:, None], filled, x)


def paste(into: Tensor, source: Tensor, regions: Tensor) -> Tensor:
    """`into` (N, C, H, W) with each region's pixels taken from `source` at the same place."""
    return torch.where(regions[:, None], source, into)


@torch.no_grad()
def probabilities(model: nn.Module, x: Tensor, bs: int = 64) -> Tensor:
    """Softmax of the model's outputs, (N, classes) float32 on the CPU, `bs` images a pass."""
    return torch.cat([model(xb).float().softmax(dim=1).cpu() for xb in x.split(bs)])


def intervene(model: nn.Module, x: Tensor, classes: Tensor, regions: Tensor,
              receivers: Tensor, bs: int = 64) -> dict[str, Tensor]:
    """Both interventions on a batch of images, its regions taken away and moved, in one
    pass of 2N images (its control: the same call with the regions from `elsewhere`).

    Args:
        x: (N, C, H, W) images; `classes` (N,) the class each is audited for.
        regions: (N, H, W) bool.
        receivers: (N, C, H, W) an image of another class for each region to be moved into.

    Returns:
        Per image (N,) float32: `removed_p` the class's probability once the region is taken
        away, `removed_pred` the class then predicted; `moved` 1 where the receiver is now
        predicted as the class, `moved_p` its probability of the class.
    """
    probs = probabilities(model, torch.cat([fill(x, regions), paste(receivers, x, regions)]), bs)
    removed, moved = probs.split(len(x))
    c = classes.cpu()[:, None]
    return {"removed_p": removed.gather(1, c)[:, 0], "removed_pred": removed.argmax(1).float(),
            "moved": (moved.argmax(1) == c[:, 0]).float(), "moved_p": moved.gather(1, c)[:, 0]}


def coverage(regions: Tensor, cells: int = 16) -> Tensor:
    """Regions (N, H, W) bool as the share of each of `cells` x `cells` cells they cover:
    (N, cells, cells) float32, small enough to keep for every image."""
    return F.adaptive_avg_pool2d(regions[:, None].float(), cells)[:, 0]


def same_place(regions: Tensor, groups: Sequence) -> Tensor:
    """How much more than by chance the regions of a group's other images lie where this
    image's region lies, up to mirror images: the mean share of their area inside this region
    or one of its three mirror images, over the share of the image those cover (what a region
    at a random place would have inside). About 1 for regions that follow an object placed
    anywhere (more for objects that keep to the middle); large for a region fixed in place (a
    corner, a caption bar).

    Args:
        regions: (N, h, w) `coverage` of the regions; `groups` (N,) each image's group.

    Returns:
        (N,) float32; NaN for an image alone in its group or with an empty region.
    """
    r = regions
    cover = ((r + r.flip(1) + r.flip(2) + r.flip(1, 2)) > 0).float().flatten(1)  # (N, D)
    area = regions.flatten(1)
    chance = cover.mean(1)  # (N,)
    groups = np.asarray(groups)
    out = torch.full((len(regions),), float("nan"))
    for g in np.unique(groups):
        idx = torch.from_numpy(np.flatnonzero(groups == g))
        if len(idx) < 2:
            continue
        inside = (cover[idx] @ area[idx].T) / area[idx].sum(1).clamp(min=1e-6)  # (n, n)
        others = (inside.sum(1) - inside.diagonal()) / (len(idx) - 1)
        out[idx] = torch.where(chance[idx] > 0, others / chance[idx], float("nan"))
    return out
