"""Grad-CAM through a fastai Learner: its images and masks transformed as `learn.dls` does, its
model run, the maps measured and drawn.

Importing this module adds two methods where a fastai user looks for them (fastai's `@patch`):
`Learner.gradcam` (`gradcam_grid`) and `ClassificationInterpretation.plot_top_losses_gradcam`.
The drawing itself is `plot`'s, the scores `metrics`', the maps `cam`'s: this module decides
what to run and passes tensors down to them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from fastai.data.core import Datasets, TfmdDL
from fastai.data.transforms import Categorize, parent_label
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastcore.basics import patch
from fastprogress.fastprogress import progress_bar
from matplotlib.figure import Figure
from torch import Tensor, nn

from .cam import METHODS, class_index, grad_cam, normalize_maps
from .fish_layout import mask_file
from .images import RGBImage, fish_mask
from .layers import Layer, body_layers, resolve_layers
from .metrics import centre_map, chance, energy_in_mask, pointing_game
from .plot import (
    image_hwc,
    map_title,
    mark_peak,
    new_figure,
    outline,
    overlay,
    plot_layer_grid,
    saved,
)
from .receptive_field import CellCentres, cell_centres, place


def _one_image(learn: Learner, img) -> tuple[Tensor, Tensor, list[float], Tensor | None]:
    """`img` as the model sees it (1, 3, H, W), decoded for display, class probabilities, and
    its GT mask (H, W) through the same transforms, or None when it has no mask file."""
    dl = learn.dls.test_dl([RGBImage.create(img)])  # a learner's first tfm may be PILImage's
    xb = dl.one_batch()[0].to(next(learn.model.parameters()).device)
    was_training = learn.model.training
    try:
        with torch.no_grad():
            probs = learn.model.eval()(xb).float().softmax(dim=1)[0].tolist()
    finally:
        learn.model.train(was_training)
    mask = None
    if isinstance(img, (str, Path)) and mask_file(img).is_file():
        (mask,) = dl.after_item((fish_mask(Path(img)),))  # Resize as for the image
        mask = mask.as_subclass(Tensor)
    return xb, dl.decode((xb.cpu(),))[0][0], probs, mask


def _hw(x: Tensor) -> tuple[int, int]:
    """The (H, W) of a batch or of masks, its last two sizes."""
    return x.shape[-2], x.shape[-1]


def gradcam_grid(learn: Learner, img, layers: Layer | Sequence[Layer] | None = None,
                 target: int | str | None = None, contrast: int | str | None = None,
                 method: str = "gradcam", **kwargs) -> Figure:
    """Per-layer Grad-CAM grid for one image through a fastai vision Learner, in one pass.

    Args:
        learn: a trained (or loaded) vision Learner.
        img: a path or PIL image, transformed by `learn.dls.test_dl` like validation items.
            A Fish Dataset image gets its GT mask's outline on every panel.
        layers: modules or names; default every layer of `body_layers(learn)`.
        target: class name or index; default the predicted class.
        contrast: a class name or index to contrast with: the maps of "why `target` rather
            than `contrast`" (Grad-CAM of the difference of the two logits).
        method: "gradcam" or another of `cam.METHODS` ("gradcam++", "hirescam", ...).
        **kwargs: passed to `plot_layer_grid` (shared_scale, save, ...); each cell is drawn
            at its receptive field's centre unless `centres=None` (plain interpolation).
    """
    xb, image, probs, mask = _one_image(learn, img)
    vocab = learn.dls.vocab
    pred = int(np.argmax(probs))
    cls = pred if target is None else class_index(vocab, target)
    named = resolve_layers(learn.model, layers)
    other = None if contrast is None else class_index(vocab, contrast)
    maps = cast(list[Tensor], grad_cam(learn.model, xb, list(named.values()), cls, other,
                                       method=method))
    what = f"{method} map for {vocab[cls]} ({probs[cls]:.2f})"
    if other is not None:
        what += f" rather than {vocab[other]} ({probs[other]:.2f})"
    kwargs.setdefault("suptitle", f"predicted {vocab[pred]} ({probs[pred]:.2f}) · {what}")
    kwargs.setdefault("mask", mask)
    kwargs.setdefault("centres", list(cell_centres(learn.model, list(named.values()),
                                                   _hw(xb)).values()))
    return plot_layer_grid(image, [m[0] for m in maps], titles=list(named), **kwargs)


def plot_methods(learn: Learner, img, methods: Sequence[str] | None = None,
                 layers: Sequence[Layer] | None = None, target: int | str | None = None,
                 save: str | Path | None = None) -> Figure:
    """One row per CAM method, one column per layer, all from one `grad_cam` pass.

    Args:
        methods: keys of `cam.METHODS`; default all of them.
        layers: default the body's last three layers (where the methods differ most).
        target: class name or index; default the predicted class.
    """
    methods = list(METHODS) if methods is None else list(methods)
    xb, image, probs, mask = _one_image(learn, img)
    named = resolve_layers(learn.model, layers or list(body_layers(learn))[-3:])
    cls = int(np.argmax(probs)) if target is None else class_index(learn.dls.vocab, target)
    by_method = cast(dict[str, list[Tensor]],
                     grad_cam(learn.model, xb, list(named.values()), cls, method=methods))
    centres = list(cell_centres(learn.model, list(named.values()), _hw(xb)).values())
    img = image_hwc(image)
    H, W = img.shape[:2]
    fig = new_figure(figsize=(2.2 * (len(named) + 1) + 0.6, 2.3 * len(methods) * H / W + 0.4),
                     layout="constrained")
    axs = fig.subplots(len(methods), len(named) + 1, squeeze=False)
    for row, (method, maps) in zip(axs, by_method.items()):
        row[0].imshow(img)
        outline(row[0], mask)
        row[0].set_title(method, fontsize=10, fontweight="bold")
        row[0].set_axis_off()
        heat = normalize_maps(place([m.cpu() for m in maps], (H, W), centres)[0])
        for ax, h, m, name in zip(row[1:], heat, maps, named):
            im = overlay(ax, img, h, mask=mask)
            ax.set_title(map_title(name, m), fontsize=9)
    fig.colorbar(im, ax=axs.ravel().tolist(), shrink=0.6, label="share of the map's own maximum")
    fig.suptitle(f"{learn.dls.vocab[cls]} ({probs[cls]:.2f}) · {len(methods)} methods, one pass")
    return saved(fig, save)


@patch
def gradcam(self: Learner, img, layers=None, target=None, contrast=None, method="gradcam",
            **kwargs) -> Figure:
    """`gradcam_grid(learn, img, ...)` as a method: `learn.gradcam(img, target="Trout")`."""
    return gradcam_grid(self, img, layers=layers, target=target, contrast=contrast,
                        method=method, **kwargs)


@patch
def plot_top_losses_gradcam(self: ClassificationInterpretation, k: int = 4,
                            layer: Layer = "layer4", save: str | Path | None = None) -> Figure:
    """The k validation images with the highest loss: the image, the Grad-CAM maps at `layer`
    of the predicted and of the true class, and the contrastive map "why the prediction rather
    than the true class" (rather than the runner-up, when the prediction is right).

    The two class maps of a row share one colour scale (divided by the larger maximum, printed
    in the titles), so a row compares the strength of the evidence for the two classes. The
    contrastive map, Grad-CAM of y_pred - y_other, shows where the evidence for the prediction
    exceeds that for the other class; it has its own scale. Each map's peak is marked (a green
    dot inside the mask, a red cross outside: `mark_peak`).
    """
    learn, vocab = self.learn, self.vocab
    losses, idxs = self.top_losses(k)
    fig = new_figure(figsize=(13, 2.6 * len(idxs) + 0.5), layout="constrained")
    axs = fig.subplots(len(idxs), 4, squeeze=False)
    for row, loss, i in zip(axs, losses, idxs):
        item, true = self.dl.items[int(i)], int(self.dl.dataset[int(i)][1])
        xb, image, probs, mask = _one_image(learn, item)
        pred, second = np.argsort(-np.asarray(probs))[:2].tolist()
        other = true if pred != true else second
        (maps,) = cast(list[Tensor], grad_cam(learn.model, xb.expand(2, -1, -1, -1), layer,
                                              [pred, true]))
        (why,) = cast(list[Tensor], grad_cam(learn.model, xb, layer, pred, contrast=other))
        (where,) = cell_centres(learn.model, layer, _hw(xb)).values()
        heat = normalize_maps(place(maps.cpu(), _hw(xb), where), shared_scale=True)
        row[0].imshow(image_hwc(image))
        row[0].set_axis_off()
        row[0].set_title(f"true {vocab[true]}, loss {float(loss):.2f}", fontsize=9)
        for ax, h, m, c, what in zip(row[1:], heat, maps, (pred, true), ("pred", "true")):
            im = overlay(ax, image, h, mask=mask)
            mark_peak(ax, h, mask)
            ax.set_title(f"{what} {vocab[c]} ({probs[c]:.2f}) · max {float(m.max()):.2g}",
                         fontsize=9)
        why_heat = normalize_maps(place(why.cpu(), _hw(xb), where))[0]
        overlay(row[3], image, why_heat, mask=mask)
        mark_peak(row[3], why_heat, mask)
        row[3].set_title(f"why not {vocab[other]} · max {float(why.max()):.2g}", fontsize=9)
    name = next(iter(resolve_layers(learn.model, layer)))
    fig.suptitle(f"Grad-CAM at {name}: predicted class, true class, and why the prediction",
                 fontsize=10)
    fig.colorbar(im, ax=axs[:, 1:].ravel().tolist(), shrink=0.6,
                 label="share of the row's larger maximum (pred, true) or of its own (why)")
    return saved(fig, save)


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
    by_name: Mapping[str, CellCentres | None] | None = (centres if isinstance(centres, dict)
                                                        else None)  # None: to find, or none
    for xb, yb, mb in progress_bar(dl, leave=False):
        by_method = cast(dict[str, list[Tensor]],
                         grad_cam(model, xb, list(named.values()),
                                  yb if targets == "true" else None, method=methods))
        maps = [m for ms in by_method.values() for m in ms]  # method by method, layer by layer
        masks = mb.as_subclass(Tensor).cpu().bool()  # (B, H, W)
        B, H, W = masks.shape
        scored = masks.flatten(1).any(dim=1)  # an empty mask is skipped, as Zhang et al. do
        maps, masks = [m[scored.to(m.device)] for m in maps], masks[scored]
        skipped += B - len(masks)
        B = len(masks)
        if centres == "receptive field" and by_name is None:  # from the first batch's size
            by_name = cell_centres(model, list(named.values()), (H, W))
        where = None if by_name is None else [by_name[k] for k in named] * len(methods)
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
    columns: dict[str, object] = {"map": sizes, "pointing": (points[0] / n).tolist()}
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


def plot_pointing_gallery(learn: Learner, layer: Layer = "layer4", n: int = 4, dl=None,
                          save: str | Path | None = None) -> Figure:
    """Up to `n` hits and `n` misses of the pointing game at `layer`, true class's map.

    Each panel shows the map over the image (each cell at its receptive field's centre, as
    `localization_report` scores it), the mask's outline and the map's peak (a green dot on a
    hit, a red cross on a miss). `dl` gives (image, class, mask) batches; default
    `mask_dl(learn)`, the validation set.
    """
    dl = mask_dl(learn) if dl is None else dl
    vocab = learn.dls.vocab
    found: dict[bool, list[tuple[Tensor, Tensor, Tensor, int]]] = {True: [], False: []}
    for xb, yb, mb in dl:
        (maps,) = cast(list[Tensor], grad_cam(learn.model, xb, layer, yb))
        masks = mb.as_subclass(Tensor).cpu().bool()
        (where,) = cell_centres(learn.model, layer, _hw(masks)).values()
        heat = normalize_maps(place(maps.cpu(), _hw(masks), where))
        hits = pointing_game(heat, masks)
        images = dl.decode((xb.cpu(),))[0]
        for i, hit in enumerate(hits.tolist()):
            if len(found[hit]) < n:
                found[hit].append((images[i], heat[i], masks[i], int(yb[i])))
        if all(len(v) == n for v in found.values()):
            break
    fig = new_figure(figsize=(2.3 * n, 5.0), layout="constrained")
    for row, hit in zip(fig.subplots(2, n, squeeze=False), (True, False)):
        for ax, shown in zip(row, found[hit] + [None] * n):
            if shown is None:
                ax.set_axis_off()
                continue
            image, h, mask, cls = shown
            overlay(ax, image, h, mask=mask)
            mark_peak(ax, h, mask)
            ax.set_title(f"{'hit' if hit else 'miss'} · {vocab[cls]}", fontsize=9)
    name = next(iter(resolve_layers(learn.model, layer)))
    fig.suptitle(f"Pointing game at {name}: peaks inside the mask (top) and outside (bottom)")
    return saved(fig, save)
