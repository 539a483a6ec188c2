"""Does a map land on the object? Pointing game and energy in the GT mask, per layer.

Maps and masks are (B, H, W) at the image's size: upsample Grad-CAM maps with
`receptive_field.place` (each cell at its receptive field's centre) or `upsample`, and
carry the masks through the same transforms as the images (`fish_dataloaders(with_masks=True)`,
or `mask_dl(learn)`). Two baselines say what a map that knows nothing scores: *chance*, the
mask's share of the image (a random point, or a flat map's energy), and *centre*, a map whose
peak is the image centre (objects are often near the middle).
"""

from collections.abc import Callable, Sequence

import pandas as pd
import torch
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import Categorize, parent_label
from fastai.learner import Learner
from fastprogress.fastprogress import progress_bar
from torch import Tensor, nn

from .cam import Layer, grad_cam, resolve_layers
from .data import RGBImage, fish_mask
from .receptive_field import CellCentres, cell_centres, place


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


def mask_dl(learn: Learner, items: Sequence | None = None,
            get_mask: Callable = fish_mask, bs: int | None = None) -> TfmdDL:
    """(image, class, mask) batches with the validation transforms of `learn.dls`.

    The masks go through the same Resize as the images (nearest-neighbour for masks), so
    they line up with maps upsampled to the input size.

    Args:
        items: image files, labelled by their parent folder; default the validation set.
        get_mask: file -> `PILMask` (0 background, 1 object); default the Fish GT mask.
    """
    items = learn.dls.valid_ds.items if items is None else items
    if len(items) == 0:
        raise ValueError("no images to measure: the learner has no validation items; attach "
                         "DataLoaders (learn.dls = ...) or pass items=")
    tfms = [[RGBImage.create], [parent_label, Categorize(vocab=learn.dls.vocab)], [get_mask]]
    dsets = Datasets(items, tfms, n_inp=1, split_idx=1)  # 1: validation transforms only
    return learn.dls.valid.new(dsets, bs=bs or learn.dls.valid.bs, shuffle=False,
                               drop_last=False)


def localization_report(learn: Learner, dl=None, layers: Sequence[Layer] | None = None,
                        targets: str = "true", tolerance: float = 0,
                        method: str | Sequence[str] = "gradcam",
                        centres: str | dict[str, CellCentres] = "receptive field",
                        model: nn.Module | None = None) -> pd.DataFrame:
    """Per-layer localization of the Grad-CAM maps against the GT masks.

    One `grad_cam` pass per batch gives every layer's map (for every method asked for); each is
    upsampled to the image and scored with `pointing_game` and `energy_in_mask`.

    Args:
        learn: a vision Learner.
        dl: batches of (image, class, mask); default `mask_dl(learn)`, the validation set.
        layers: modules or names; default `body_layers(learn)`.
        targets: "true" for the labelled class's map, "pred" for the predicted class's.
        tolerance: when > 0, the pointing game and its centre baseline are also scored with
            this tolerance in pixels, in the same pass (columns `pointing_tol`, `centre_tol`).
        method: a CAM method of `grad_cam`, or a sequence of them.
        centres: where each layer's cells are drawn on the image: "receptive field" (default)
            at their receptive fields' centres (`receptive_field.cell_centres`; notebook 05
            measures the difference), "interpolate" where plain bilinear upsampling puts
            them (as pytorch-grad-cam and captum draw), or {layer name: `CellCentres`}.
        model: the network to score, default `learn.model`: e.g. a randomised copy of it
            (`sanity.randomized`), the baseline of a network that learned nothing.

    Returns:
        One row per layer (per method and layer for a sequence of methods): its native map
        size, pointing game, energy in mask, the share of all-zero maps, the chance and centre
        baselines, the number of images scored and of those skipped for an empty mask (an
        object that is not in the picture has no place to point at: Zhang et al., 2018, and
        TorchRay skip them rather than count a miss).
    """
    if targets not in ("true", "pred"):
        raise ValueError(f"targets={targets!r}: use 'true' (the label) or 'pred' (prediction)")
    if centres not in ("receptive field", "interpolate") and not isinstance(centres, dict):
        raise ValueError(f"centres={centres!r}: use 'receptive field', 'interpolate' or a dict "
                         "of CellCentres by layer name")
    dl = mask_dl(learn) if dl is None else dl
    model = learn.model if model is None else model
    named = resolve_layers(model, layers)
    methods = [method] if isinstance(method, str) else list(method)
    tols = (0, tolerance) if tolerance > 0 else (0,)
    L, T = len(named) * len(methods), len(tols)
    points, energy, zero = torch.zeros(T, L), torch.zeros(L), torch.zeros(L)
    centre, sizes, base_chance, n, skipped = torch.zeros(T), [""] * L, 0.0, 0, 0
    for xb, yb, mb in progress_bar(dl, leave=False):
        by_method = grad_cam(model, xb, list(named.values()),
                             yb if targets == "true" else None, method=methods)
        maps = [m for ms in by_method.values() for m in ms]  # method by method, layer by layer
        masks = mb.as_subclass(Tensor).cpu().bool()  # (B, H, W)
        B, H, W = masks.shape
        scored = masks.flatten(1).any(dim=1)  # an empty mask is skipped, as Zhang et al. do
        maps, masks = [m[scored.to(m.device)] for m in maps], masks[scored]
        skipped += B - len(masks)
        B = len(masks)
        if centres == "receptive field":
            centres = cell_centres(model, list(named.values()), (H, W))
        where = None if centres == "interpolate" else [centres[k] for k in named] * len(methods)
        heat = place([m.cpu() for m in maps], (H, W), where)  # (B, L, H, W)
        for i, m in enumerate(maps):
            sizes[i] = "x".join(map(str, m.shape[1:]))
            energy[i] += energy_in_mask(heat[:, i], masks).sum()
            zero[i] += (heat[:, i].flatten(1).amax(dim=1) <= 0).sum()
            for t, tol in enumerate(tols):
                points[t, i] += pointing_game(heat[:, i], masks, tol).sum()
        base_chance += chance(masks).sum().item()
        for t, tol in enumerate(tols):
            centre[t] += pointing_game(centre_map(H, W).expand(B, H, W), masks, tol).sum()
        n += B
    if n == 0:
        raise ValueError(f"nothing to measure: the DataLoader gave no batches, or only images "
                         f"with an empty mask ({skipped}), which the pointing game skips")
    columns = {"map": sizes, "pointing": (points[0] / n).tolist()}
    if tolerance > 0:
        columns["pointing_tol"] = (points[1] / n).tolist()
    columns |= {"energy": (energy / n).tolist(), "zero_maps": (zero / n).tolist(),
                "chance": base_chance / n, "centre": centre[0].item() / n}
    if tolerance > 0:
        columns["centre_tol"] = centre[1].item() / n
    columns |= {"images": n, "empty_masks": skipped}
    if isinstance(method, str):
        return pd.DataFrame(columns, index=pd.Index(list(named), name="layer"))
    rows = pd.MultiIndex.from_product([methods, list(named)], names=["method", "layer"])
    return pd.DataFrame(columns, index=rows)
