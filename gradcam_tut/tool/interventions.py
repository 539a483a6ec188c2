"""Evidence by intervention: what the network does when the region a map points at is taken
away, or moved into other images.

A map says where a layer holds evidence; it does not say that what is there decides the class.
Two counterfactual images per region ask the network itself:

    taken away   the region filled in from the image's own surroundings (`fill`): does the
                 prediction change?
    moved        the region pasted, at the same place, into an image of another class: is that
                 image now predicted as the region's class?
    swapped      where a class's images hold what it holds at that place (`fixed_content`),
                 that content exchanged for another class's (`swap_content`), the rest
                 kept: is it now predicted as the other class?
    copied       the pixels near a map's peak whose colours its class's other images hold
                 somewhere and other classes' do not (`copied_colours`: a tag, a logo, a
                 caption pasted into every photo; no two photographs of an object agree so
                 closely), taken away, and moved alone into images of other classes.

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
COPY_BITS = 6  # colours are compared at this many bits a channel (`colour_codes`)
COPY_GROW = 1  # a copy's pixels grown by this many: its blended edge, a JPEG's stray pixels


def map_regions(heat: Tensor, level: float = REGION_LEVEL, grow: int = 0) -> Tensor:
    """Where each map points: the pixels where it reaches `level` times its maximum, grown by
    `grow` pixels on every side (a coarse map's edge is uncertain by half a cell: it peaks
    beside a small mark as often as on it).

    Args:
        heat: (N, H, W) maps placed on the image (`receptive_field.place`).

    Returns:
        (N, H, W) bool; all False for an all-zero map (it points nowhere).
    """
    top = heat.flatten(1).amax(dim=1)[:, None, None]
    regions = (heat >= level * top) & (top > 0)
    return dilate(regions, grow) if grow > 0 else regions


def dilate(regions: Tensor, grow: int) -> Tensor:
    """Each (..., H, W) bool mask grown by `grow` pixels on every side (a square of side
    2 grow + 1, as a max pool would give): whether the square around each pixel holds any
    of it, from running sums along the rows, then the columns, whatever `grow` costs."""
    x = regions.to(torch.int32)
    for dim in (-1, -2):
        x = x.movedim(dim, -1)
        n = x.shape[-1]
        sums = F.pad(x.cumsum(-1, dtype=torch.int32), (1, 0))  # of the first k, k = 0..n
        edge = (*sums.shape[:-1], grow)
        sums = torch.cat([sums[..., :1].expand(edge), sums, sums[..., -1:].expand(edge)], -1)
        x = (sums[..., 2 * grow + 1:] - sums[..., :n]).movedim(-1, dim)
    return x > 0


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


def swap_content(x: Tensor, own: Tensor, other: Tensor, regions: Tensor) -> Tensor:
    """Each image with its class's content exchanged for another class's on `regions`:
    x - own + other there, where `own` and `other` are what each class holds at each place
    (the per-pixel median of its images: objects lie anywhere, so what is left is what every
    image of the class has there: a backdrop, a caption, a watermark).

    Args:
        x: (N, C, H, W) images; `own`, `other` (N or 1, C, H, W); `regions` (N, H, W) bool.

    Returns:
        A new (N, C, H, W) tensor; `x` is unchanged.
    """
    return torch.where(regions[:, None], x - own + other, x)


@torch.no_grad()
def probabilities(model: nn.Module, x: Tensor, bs: int = 64) -> Tensor:
    """Softmax of the model's outputs, (N, classes) float32 on the CPU, `bs` images a pass.
    Images go in channels last: a forward pass on a CPU takes a fifth less time that way (a
    Grad-CAM pass, with its backward, none; `benchmarks/README.md` (2))."""
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
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


def same_place(peaks: Tensor, groups: Sequence, size: tuple[int, int], radius: float
               ) -> Tensor:
    """How much more often than by chance the maps of a group's other images peak where this
    image's map peaks, up to mirror images: the share of them whose peak, folded into the
    top-left quarter of the image (a corner is every corner, a side both sides), lies within
    `radius` pixels of this one's on each axis, over the share of that quarter the square
    around it covers (what peaks anywhere would give). About 1 for maps that follow an object
    placed anywhere; large for evidence fixed in place (a corner, a caption bar).

    Args:
        peaks: (N, 2) each map's peak, row and column (`metrics.peak_points`), in pixels.
        groups: (N,) each image's group (its class); `size` the image's (H, W).
        radius: half the side of the square, in pixels (half a cell of the layer).

    Returns:
        (N,) float32; NaN for an image alone in its group.
    """
    (H, W), peaks = size, peaks.float()
    half = torch.tensor([(H + 1) // 2, (W + 1) // 2], dtype=torch.float32)
    f = torch.minimum(peaks, torch.tensor([H - 1.0, W - 1.0]) - peaks)  # (N, 2) folded
    side = (torch.minimum(f + radius, half - 1) - (f - radius).clamp(min=0) + 1)  # (N, 2)
    chance = side.prod(1) / half.prod()
    group = np.asarray(groups)
    out = torch.full((len(peaks),), float("nan"))
    for g in np.unique(group):
        idx = torch.from_numpy(np.flatnonzero(group == g))
        if len(idx) < 2:
            continue
        near = ((f[idx, None] - f[None, idx]).abs() <= radius).all(-1)  # (n, n)
        share = (near.sum(1) - 1) / (len(idx) - 1)
        out[idx] = share / chance[idx]
    return out


def mirrors(x: Tensor) -> Tensor:
    """(N, ...) images -> (4, N, ...): as they are, flipped left-right, upside down, both."""
    return torch.stack([x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)])


def fixed_content(x: Tensor, regions: Tensor, groups: Sequence | np.ndarray, k: int = 24,
                  share: float = 0.75, seed: int = 0) -> Tensor:
    """How much a pixel's content is its group's at that place: per image and pixel,
    1 - d_own / d_other, where d_own is the distance within which `share` of `k` images of its
    own group are there and d_other the median distance to `k` images of other groups, each
    other image mirrored the way that matches the region best (a mark in any corner is the same
    mark). Near 0 or below where objects lie anywhere, so that what is at a place is as often
    another group's as its own; 1 where (`share` of) the group's images hold the same thing at
    that place (a corner mark, a caption bar); in between for a tint or a faint overlay.

    Args:
        x: (N, C, h, w) the images, small (a 32 px side is plenty).
        regions: (N, h, w) bool, the pixels that decide which mirror of another image is
            compared (the map's region); the score is given for every pixel.
        groups: (N,) each image's group (its class).

    Returns:
        (N, h, w) float32, smoothed over 3x3 pixels; NaN for an image whose group or the rest
        has no other image.
    """
    group = np.asarray(groups)
    flipped = mirrors(x)  # (4, N, C, h, w)
    rng = np.random.default_rng(seed)
    out = torch.full(regions.shape, float("nan"))
    weight = regions.float()
    for i in range(len(x)):
        same = np.flatnonzero(group == group[i])
        same, other = same[same != i], np.flatnonzero(group != group[i])
        if len(same) == 0 or len(other) == 0:
            continue
        d = []
        for ix in (rng.permutation(same)[:k], rng.permutation(other)[:k]):
            dist = (x[i] - flipped[:, ix]).abs().amax(dim=2)  # (4, k, h, w)
            best = (dist * weight[i]).flatten(2).sum(-1).argmin(0)  # each image's best mirror
            d.append(dist[best, torch.arange(len(ix))])
        own, others = d[0].quantile(share, dim=0), d[1].median(dim=0).values
        out[i] = 1 - own / others.clamp(min=1e-3)
    return F.avg_pool2d(out[:, None], 3, 1, 1, count_include_pad=False)[:, 0]


def colour_codes(pictures: Tensor, bits: int = COPY_BITS) -> Tensor:
    """Each pixel's colour as one integer, its channels cut to `bits` each.

    Args:
        pictures: (N, C, H, W) the images as shown: integers 0..255 (fastai's decoded
            images) or floats 0..1.

    Returns:
        (N, H, W) int64.
    """
    if pictures.is_floating_point():
        pictures = (pictures.clamp(0, 1) * 255).round()
    q = pictures.long().clamp(0, 255) >> (8 - bits)
    code = torch.zeros_like(q[:, 0])
    for channel in q.unbind(1):
        code = (code << bits) | channel
    return code


def copy_pixels(pictures: Tensor, colours: Sequence[np.ndarray]) -> Tensor:
    """Where each picture holds its copied `colours` (`colour_codes`; one array per picture),
    grown by `COPY_GROW` (a copy's blended edge, a JPEG's stray pixels): (N, H, W) bool.

    Args:
        pictures: (N, C, H, W) the images as shown (see `colour_codes`).
    """
    found = [torch.isin(code, torch.from_numpy(np.asarray(c, np.int64)))
             for code, c in zip(colour_codes(pictures), colours)]
    return dilate(torch.stack(found), COPY_GROW)


def copied_colours(near: Sequence[np.ndarray] | np.ndarray,
                   held: Sequence[np.ndarray] | np.ndarray, groups: Sequence | np.ndarray
                   ) -> list[np.ndarray]:
    """For each image, by how much more often its group's other images than other groups'
    images hold each of its colours `near` (its map's peak) anywhere: 1 for a colour every
    image of its group holds and no other does, pixel for pixel (a copy: a tag, a logo, a
    caption), near 0 for the colours of objects and scenes, which every group shares.

    Args:
        near: (N,) each image's colours near its map's peak (`colour_codes`), unique.
        held: (N,) each image's colours anywhere, unique (a superset of its `near`).
        groups: (N,) each image's group (its class).

    Returns:
        (N,) arrays, each the lift of its `near` colours in their order; all NaN for an image
        whose group or the rest has no other image.
    """
    names, group = np.unique(np.asarray(groups), return_inverse=True)
    sizes, n = np.bincount(group, minlength=len(names)), len(group)
    wanted = np.unique(np.concatenate([np.zeros(0, np.int64), *map(np.asarray, near)]))
    counts = np.zeros((len(wanted), len(names)), np.int64)  # images of each group holding each
    every = np.concatenate([np.zeros(0, np.int64), *map(np.asarray, held)])
    owner = np.repeat(group, [len(h) for h in held])
    keep = np.isin(every, wanted)  # each image's colours are unique: one count per image
    np.add.at(counts, (np.searchsorted(wanted, every[keep]), owner[keep]), 1)
    out = []
    for colours, g in zip(near, group):
        if sizes[g] < 2 or sizes[g] == n:
            out.append(np.full(len(colours), np.nan))
            continue
        c = counts[np.searchsorted(wanted, colours)]
        own = (c[:, g] - 1) / (sizes[g] - 1)  # less its own image
        out.append(own - (c.sum(1) - c[:, g]) / (n - sizes[g]))
    return out
