"""Heat maps over images: an overlay, a per-layer grid, the one-call grid for a Learner, and
the localization charts (per-layer bars, hits and misses)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastcore.basics import patch
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from torch import Tensor

from .cam import (
    METHODS,
    Layer,
    body_layers,
    class_index,
    grad_cam,
    normalize_maps,
    resolve_layers,
)
from .data import RGBImage, fish_mask, mask_file
from .metrics import mask_dl, peak_points, pointing_game
from .receptive_field import CellCentres, cell_centres, place


def image_hwc(image) -> np.ndarray:
    """An image as a float array (H, W, 3) in [0, 1], for matplotlib.

    Accepts a tensor (3, H, W) or (1, 3, H, W), or anything `np.asarray` takes in (H, W, 3)
    layout (a PIL image). Integer pixels (fastai's decoded images, PIL) are 0..255.
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu().squeeze(0)
        image = image.permute(1, 2, 0) if image.shape[0] in (1, 3) else image
    arr = np.asarray(image)
    scale = 255 if np.issubdtype(arr.dtype, np.integer) else 1
    return arr.astype(np.float32) / scale


def new_figure(**kwargs) -> Figure:
    """A pyplot figure, closed at once: nothing piles up in pyplot over a loop, and creating it
    through pyplot loads the backend, so Jupyter shows the returned figure inline."""
    fig = plt.figure(**kwargs)
    plt.close(fig)
    return fig


def saved(fig: Figure, save: str | Path | None) -> Figure:
    """Write `fig` to the PNG path `save`, if given, and return it."""
    if save is not None:
        fig.savefig(save, dpi=100)
    return fig


def heat_cmap(name: str = "magma", max_alpha: float = 0.85) -> ListedColormap:
    """`name` with an opacity that grows with the value's square root: 0 is transparent, the
    top `max_alpha`, and a tenth of the top still a third as opaque (thin, spread-out evidence
    stays visible).

    The overlay then shows the image where there is no evidence, and a colour bar drawn with
    the same colormap shows the colours as they look over the image.
    """
    colors = plt.get_cmap(name)(np.linspace(0, 1, 256))
    colors[:, 3] = max_alpha * np.sqrt(np.linspace(0, 1, 256))  # low values stay visible
    return ListedColormap(colors, name=f"{name}_fade")


def outline(ax: Axes, mask) -> None:
    """Draw the outline of `mask` (H, W), nonzero on the object, in cyan; nothing for None."""
    if mask is not None:
        ax.contour(np.asarray(mask, dtype=np.float32), levels=[0.5], colors="cyan",
                   linewidths=0.8)


def overlay(ax: Axes, image, heatmap: Tensor, cmap: str = "magma", vmax: float = 1.0,
            mask=None):
    """Draw `image` with `heatmap` (H, W) on top, and the mask's outline when given.

    Returns the heat map's AxesImage (for a colour bar).
    """
    ax.imshow(image_hwc(image))
    im = ax.imshow(heatmap.detach().cpu().numpy(), cmap=heat_cmap(cmap), vmin=0, vmax=vmax)
    outline(ax, mask)
    ax.set_axis_off()
    return im


def mark_peak(ax: Axes, heat: Tensor, mask=None) -> None:
    """Mark the peak of `heat` (H, W) as the pointing game finds it: a green dot inside `mask`,
    a red cross outside it, a white dot when there is no mask; nothing on an all-zero map."""
    if float(heat.max()) <= 0:
        return
    py, px = peak_points(heat[None].float())
    y, x = int(py[0]), int(px[0])
    inside = None if mask is None else bool(mask[y, x])
    if inside is False:
        ax.plot(x, y, "x", color="red", ms=9, mew=2.5)
    else:
        ax.plot(x, y, "o", color="white" if inside is None else "lime", ms=8, mec="k")


def map_title(name: str, m: Tensor) -> str:
    """A panel's title: the layer, its native map size and its raw maximum."""
    return f"{name} · {'x'.join(map(str, m.shape[-2:]))} · max {float(m.max()):.2g}"


def plot_layer_grid(image, maps: Sequence[Tensor], titles: Sequence[str] | None = None,
                    shared_scale: bool = False, ncols: int = 5, colorbar: bool = True,
                    cmap: str = "magma", mask=None, suptitle: str | None = None,
                    save: str | Path | None = None, details: bool = True,
                    centres: Sequence[CellCentres | None] | None = None) -> Figure:
    """The image, then one panel per layer with that layer's Grad-CAM map over it.

    Each panel's title gives the layer, the map's native size and its raw maximum, so small
    maps stay readable on a shared scale.

    Args:
        image: (3, H, W) tensor or (H, W, 3) array/PIL image.
        maps: one map (h_l, w_l) per layer, any sizes; upsampled to (H, W).
        titles: one per map (layer names).
        shared_scale: one colour scale for all layers, each map times its number of cells
            h*w first (the CAM scale: Grad-CAM averages the gradient over h*w cells, so its
            raw values shrink with 1/(h*w)), to compare strengths across layers; default each
            map scaled to its own max, to compare where each layer looks.
        mask: (H, W), nonzero on the object: its outline is drawn on every panel.
        save: write the figure to this PNG path as well.
        details: add each map's native size and raw maximum to its title.
        centres: one `CellCentres` per map: each cell drawn at its receptive field's centre
            (`receptive_field.cell_centres`); None: plain bilinear upsampling.

    Returns:
        The Figure; not left open in pyplot, and shown inline when it ends a notebook cell.
    """
    img = image_hwc(image)
    H, W = img.shape[:2]
    maps = [m.detach().float().cpu() for m in maps]
    scaled = [m * m.shape[-2] * m.shape[-1] if shared_scale else m for m in maps]  # CAM scale
    heat = normalize_maps(place([m[None] for m in scaled], (H, W), centres)[0], shared_scale)
    names = list(titles) if titles is not None else [f"map {i}" for i in range(len(maps))]
    n = len(maps) + 1
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = new_figure(figsize=(2.2 * ncols + 0.6 * colorbar, 2.3 * nrows * H / W + 0.4),
                     layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axs[0].imshow(img)
    outline(axs[0], mask)
    axs[0].set_title("image" + (" · mask outline" if mask is not None else ""), fontsize=9)
    axs[0].set_axis_off()
    for ax, h, m, name in zip(axs[1:], heat, maps, names):
        im = overlay(ax, img, h, cmap=cmap, mask=mask)
        ax.set_title(map_title(name, m) if details else name, fontsize=9)
    for ax in axs[n:]:
        ax.remove()
    if colorbar:
        label = ("share of the largest, on the CAM scale" if shared_scale
                 else "share of the map's own maximum")
        fig.colorbar(im, ax=list(axs[:n]), shrink=0.8, label=label)
    if suptitle:
        fig.suptitle(suptitle)
    return saved(fig, save)


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
    maps = grad_cam(learn.model, xb, list(named.values()), cls, other, method=method)
    what = f"{method} map for {vocab[cls]} ({probs[cls]:.2f})"
    if other is not None:
        what += f" rather than {vocab[other]} ({probs[other]:.2f})"
    kwargs.setdefault("suptitle", f"predicted {vocab[pred]} ({probs[pred]:.2f}) · {what}")
    kwargs.setdefault("mask", mask)
    kwargs.setdefault("centres", list(cell_centres(learn.model, named.values(),
                                                   xb.shape[-2:]).values()))
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
    by_method = grad_cam(learn.model, xb, list(named.values()), cls, method=methods)
    centres = list(cell_centres(learn.model, named.values(), xb.shape[-2:]).values())
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
        (maps,) = grad_cam(learn.model, xb.expand(2, -1, -1, -1), layer, [pred, true])
        (why,) = grad_cam(learn.model, xb, layer, pred, contrast=other)
        (where,) = cell_centres(learn.model, layer, xb.shape[-2:]).values()
        heat = normalize_maps(place(maps.cpu(), xb.shape[-2:], where), shared_scale=True)
        row[0].imshow(image_hwc(image))
        row[0].set_axis_off()
        row[0].set_title(f"true {vocab[true]}, loss {float(loss):.2f}", fontsize=9)
        for ax, h, m, c, what in zip(row[1:], heat, maps, (pred, true), ("pred", "true")):
            im = overlay(ax, image, h, mask=mask)
            mark_peak(ax, h, mask)
            ax.set_title(f"{what} {vocab[c]} ({probs[c]:.2f}) · max {float(m.max()):.2g}",
                         fontsize=9)
        why_heat = normalize_maps(place(why.cpu(), xb.shape[-2:], where))[0]
        overlay(row[3], image, why_heat, mask=mask)
        mark_peak(row[3], why_heat, mask)
        row[3].set_title(f"why not {vocab[other]} · max {float(why.max()):.2g}", fontsize=9)
    name = next(iter(resolve_layers(learn.model, layer)))
    fig.suptitle(f"Grad-CAM at {name}: predicted class, true class, and why the prediction",
                 fontsize=10)
    fig.colorbar(im, ax=axs[:, 1:].ravel().tolist(), shrink=0.6,
                 label="share of the row's larger maximum (pred, true) or of its own (why)")
    return saved(fig, save)


def plot_localization(report: pd.DataFrame, title: str | None = None,
                      save: str | Path | None = None) -> Figure:
    """Bar charts of a `localization_report`: pointing game and energy in mask per layer,
    with the chance and centre baselines drawn across (and, when the report has them, the
    pointing game within its tolerance as lighter bars behind)."""
    fig = new_figure(figsize=(10, 3.4), layout="constrained")
    axs = fig.subplots(1, 2)
    labels = [f"{name}\n{size}" for name, size in zip(report.index, report["map"])]
    if "pointing_tol" in report:
        axs[0].bar(labels, report["pointing_tol"], color="navajowhite", label="within tolerance")
        axs[0].axhline(report["centre_tol"].iloc[0], color="tab:blue", ls=":", lw=1,
                       alpha=0.5, label="centre, within tolerance")
    for ax, col, what in zip(axs, ("pointing", "energy"),
                             ("pointing game: peak inside the mask", "energy inside the mask")):
        ax.bar(labels, report[col], color="tab:orange", label=col)
        ax.axhline(report["chance"].iloc[0], color="k", ls="--", lw=1, label="chance")
        if col == "pointing":
            ax.axhline(report["centre"].iloc[0], color="tab:blue", ls=":", lw=1.5,
                       label="centre point")
        ax.set_ylim(0, 1.25)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(what, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7, loc="upper left", ncols=3)
    fig.suptitle(title or f"Grad-CAM against the GT masks, {report['images'].iloc[0]} images")
    return saved(fig, save)


def plot_pointing_gallery(learn: Learner, layer: Layer = "layer4", n: int = 4, dl=None,
                          save: str | Path | None = None) -> Figure:
    """Up to `n` hits and `n` misses of the pointing game at `layer`, true class's map.

    Each panel shows the map over the image (each cell at its receptive field's centre, as
    `localization_report` scores it), the mask's outline and the map's peak (a green dot on a
    hit, a red cross on a miss). `dl` gives (image, class, mask) batches; default
    `mask_dl(learn)`, the validation set.
    """
    dl = mask_dl(learn) if dl is None else dl
    vocab, found = learn.dls.vocab, {True: [], False: []}
    for xb, yb, mb in dl:
        (maps,) = grad_cam(learn.model, xb, layer, yb)
        masks = mb.as_subclass(Tensor).cpu().bool()
        (where,) = cell_centres(learn.model, layer, masks.shape[-2:]).values()
        heat = normalize_maps(place(maps.cpu(), masks.shape[-2:], where))
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
