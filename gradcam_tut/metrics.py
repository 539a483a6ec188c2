"""Does a map land on the object? Pointing game, energy in the GT mask, and two baselines.

Pure tensor maths: maps and masks are (B, H, W) tensors at the image's size, given. Upsample
Grad-CAM maps with `receptive_field.place` (each cell at its receptive field's centre) or
`upsample`, and carry the masks through the same transforms as the images
(`fish_dataloaders(with_masks=True)`, or `learner.mask_dl(learn)`); `learner.localization_report`
runs a Learner over them, layer by layer. Two baselines say what a map that knows nothing
scores: *chance*, the mask's share of the image (a random point, or a flat map's energy), and
*centre*, a map whose peak is the image centre (objects are often near the middle).
"""

import torch
from torch import Tensor


def _check(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be "
                         "(B, H, W): upsample the maps to the masks' size first")
    if (maps < 0).any():
        raise ValueError("maps must be non-negative (Grad-CAM after its ReLU)")


def peak_points(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column of each map's maximum, (B,) each.

    Upsampling a coarse map copies its border cells into flat bands, so the maximum can be a
    plateau; the peak is then the plateau's pixel nearest its centroid, not its first pixel.
    """
    B, H, W = maps.shape
    flat = maps.flatten(1)  # (B, H*W)
    tied = flat == flat.amax(dim=1, keepdim=True)
    rows = torch.arange(H, device=maps.device).repeat_interleave(W).float()
    cols = torch.arange(W, device=maps.device).repeat(H).float()
    n = tied.sum(dim=1, keepdim=True)
    cy, cx = (tied * rows).sum(1, keepdim=True) / n, (tied * cols).sum(1, keepdim=True) / n
    dist = ((rows - cy) ** 2 + (cols - cx) ** 2).masked_fill(~tied, float("inf"))
    idx = dist.argmin(dim=1)
    return idx // W, idx % W


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 0) -> Tensor:
    """Whether each map's peak lies in its mask, or within `tolerance` pixels of it.

    The pointing game (Zhang et al., 2018) uses a 15 px tolerance on full-size images. On a
    plateau of tied maxima (an upsampled coarse map) the peak is the tied pixel nearest the
    plateau's centroid (`peak_points`); Quantus instead counts a hit when any tied pixel is in
    the mask. An all-zero map points nowhere: a miss. Skip images with an empty mask before
    scoring (`localization_report` does): there is nothing to point at.

    Args:
        maps: (B, H, W), non-negative. An all-zero map points nowhere: a miss.
        masks: (B, H, W), nonzero on the object.
        tolerance: the largest distance, in pixels, from the peak to the mask for a hit.

    Returns:
        (B,) bool; its mean is the pointing-game score.
    """
    _check(maps, masks)
    B, H, W = maps.shape
    y, x = peak_points(maps)
    masks = masks.bool()
    rows = torch.arange(H, device=maps.device)[None, :, None]
    cols = torch.arange(W, device=maps.device)[None, None, :]
    near = (rows - y[:, None, None]) ** 2 + (cols - x[:, None, None]) ** 2 <= tolerance**2
    hit = (near & masks).flatten(1).any(dim=1)  # tolerance 0: the peak pixel itself
    return hit & (maps.flatten(1).amax(dim=1) > 0)


def energy_in_mask(maps: Tensor, masks: Tensor) -> Tensor:
    """The share of each map's mass inside its mask, (B,) in [0, 1]; 0 for an all-zero map."""
    _check(maps, masks)
    total = maps.flatten(1).sum(dim=1)
    inside = (maps * masks.bool()).flatten(1).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def chance(masks: Tensor) -> Tensor:
    """The mask's share of the image, (B,): a random point's pointing hit rate, and the energy
    in mask of a flat map."""
    return masks.bool().flatten(1).float().mean(dim=1)


def centre_map(H: int, W: int) -> Tensor:
    """A map (H, W) that knows nothing but peaks at the image centre: 1 minus the distance."""
    rows = torch.arange(H).float()[:, None] - (H - 1) / 2
    cols = torch.arange(W).float()[None, :] - (W - 1) / 2
    dist = (rows**2 + cols**2).sqrt()
    return 1 - dist / dist.max()
