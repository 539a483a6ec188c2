"""Heat maps over images: an overlay, a per-layer grid, the one-call grid for a Learner."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastcore.basics import patch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from .cam import Layer, body_layers, grad_cam, normalize_maps, resolve_layers, upsample


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


def overlay(ax: Axes, image, heatmap: Tensor, cmap: str = "magma", alpha: float = 0.5,
            vmax: float = 1.0):
    """Draw `image` with `heatmap` (H, W) on top; returns the heat map's AxesImage."""
    ax.imshow(image_hwc(image))
    im = ax.imshow(heatmap.detach().cpu().numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=vmax)
    ax.set_axis_off()
    return im


def plot_layer_grid(image, maps: Sequence[Tensor], titles: Sequence[str] | None = None,
                    shared_scale: bool = False, ncols: int = 5, colorbar: bool = True,
                    cmap: str = "magma", alpha: float = 0.5, suptitle: str | None = None,
                    save: str | Path | None = None) -> Figure:
    """The image, then one panel per layer with that layer's Grad-CAM map over it.

    Args:
        image: (3, H, W) tensor or (H, W, 3) array/PIL image.
        maps: one map (h_l, w_l) per layer, any sizes; upsampled bilinearly to (H, W).
        titles: one per map (layer names).
        shared_scale: one colour scale for all layers (compare strengths across layers)
            instead of each map scaled to its own max (compare where each layer looks).
        save: write the figure to this PNG path as well.

    Returns:
        A matplotlib Figure not registered with pyplot: shown once in a notebook, nothing leaks.
    """
    img = image_hwc(image)
    H, W = img.shape[:2]
    heat = upsample([m.detach().float().cpu()[None] for m in maps], (H, W))[0]  # (L, H, W)
    heat = normalize_maps(heat, shared_scale)
    titles = list(titles) if titles is not None else [f"map {i}" for i in range(len(maps))]
    n = len(maps) + 1
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.6 * ncols + 0.6 * colorbar, 2.6 * nrows * H / W + 0.4),
                 layout="constrained")
    axs = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axs[0].imshow(img)
    axs[0].set_title("image")
    axs[0].set_axis_off()
    for ax, m, title in zip(axs[1:], heat, titles):
        im = overlay(ax, img, m, cmap=cmap, alpha=alpha)
        ax.set_title(title)
    for ax in axs[n:]:
        ax.remove()
    if colorbar:
        label = "Grad-CAM / max over layers" if shared_scale else "Grad-CAM / max of its map"
        fig.colorbar(im, ax=list(axs[:n]), shrink=0.8, label=label)
    if suptitle:
        fig.suptitle(suptitle)
    if save is not None:
        fig.savefig(save, dpi=110)
    return fig


def class_index(vocab: Sequence[str], target: int | str) -> int:
    """`target` as an index into `vocab`; a class name is looked up, an unknown one listed."""
    if isinstance(target, str):
        if target not in vocab:
            raise ValueError(f"no class named {target!r}: use one of {list(vocab)}")
        return list(vocab).index(target)
    if not 0 <= target < len(vocab):
        raise ValueError(f"class index {target} out of range 0..{len(vocab) - 1}")
    return int(target)


def _one_image(learn: Learner, img) -> tuple[Tensor, Tensor, list[float]]:
    """`img` as the model sees it (1, 3, H, W), decoded for display, and class probabilities."""
    dl = learn.dls.test_dl([img])
    xb = dl.one_batch()[0].to(next(learn.model.parameters()).device)
    was_training = learn.model.training
    try:
        with torch.no_grad():
            probs = learn.model.eval()(xb).float().softmax(dim=1)[0].tolist()
    finally:
        learn.model.train(was_training)
    return xb, dl.decode((xb.cpu(),))[0][0], probs


def gradcam_grid(learn: Learner, img, layers: Layer | Sequence[Layer] | None = None,
                 target: int | str | None = None, **kwargs) -> Figure:
    """Per-layer Grad-CAM grid for one image through a fastai vision Learner, in one pass.

    Args:
        learn: a trained (or loaded) vision Learner.
        img: a path or PIL image, transformed by `learn.dls.test_dl` like validation items.
        layers: modules or names; default every layer of `body_layers(learn)`.
        target: class name or index; default the predicted class.
        **kwargs: passed to `plot_layer_grid` (shared_scale, save, ...).
    """
    xb, image, probs = _one_image(learn, img)
    vocab = learn.dls.vocab
    pred = int(np.argmax(probs))
    cls = pred if target is None else class_index(vocab, target)
    named = resolve_layers(learn.model, list(body_layers(learn)) if layers is None else layers)
    maps = grad_cam(learn.model, xb, list(named.values()), cls)
    kwargs.setdefault("suptitle", f"predicted {vocab[pred]} ({probs[pred]:.2f}) · "
                                  f"map for {vocab[cls]} ({probs[cls]:.2f})")
    return plot_layer_grid(image, [m[0] for m in maps], titles=list(named), **kwargs)


@patch
def gradcam(self: Learner, img, layers=None, target=None, **kwargs) -> Figure:
    """`gradcam_grid(learn, img, ...)` as a method: `learn.gradcam(img, target="Trout")`."""
    return gradcam_grid(self, img, layers=layers, target=target, **kwargs)


@patch
def plot_top_losses_gradcam(self: ClassificationInterpretation, k: int = 4,
                            layer: Layer = "layer4", save: str | Path | None = None) -> Figure:
    """The k validation images with the highest loss: the image, then the Grad-CAM maps of the
    predicted and of the true class on one colour scale (one pass per image for both).

    Where the two maps differ is where the network found evidence for the wrong class.
    """
    learn, vocab = self.learn, self.vocab
    losses, idxs = self.top_losses(k)
    fig = Figure(figsize=(7.8, 2.3 * len(idxs)), layout="constrained")
    for row, loss, i in zip(fig.subplots(len(idxs), 3, squeeze=False), losses, idxs):
        item, true = self.dl.items[int(i)], int(self.dl.dataset[int(i)][1])
        xb, image, probs = _one_image(learn, item)
        pred = int(np.argmax(probs))
        (maps,) = grad_cam(learn.model, xb.expand(2, -1, -1, -1), layer, [pred, true])
        heat = normalize_maps(upsample(maps.cpu(), xb.shape[-2:]), shared_scale=True)
        row[0].imshow(image_hwc(image))
        row[0].set_axis_off()
        row[0].set_title(f"true {vocab[true]}, loss {float(loss):.2f}", fontsize=9)
        for ax, m, c, what in zip(row[1:], heat, (pred, true), ("pred", "true")):
            overlay(ax, image, m)
            ax.set_title(f"{what} {vocab[c]} ({probs[c]:.2f})", fontsize=9)
    if save is not None:
        fig.savefig(save, dpi=110)
    return fig
