"""Heat maps drawn over images: the overlay, the per-layer grid, the peak marker and the
localization charts.

Everything here draws tensors, arrays and images it is given, and returns the Figure; nothing
runs a model or reads a file. What runs a fastai Learner and hands the results here
(`gradcam_grid`, `Learner.gradcam`, the top losses, the pointing gallery) is in `learner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torch import Tensor

from .cam import normalize_maps
from .metrics import peak_points
from .receptive_field import CellCentres, place


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


def outline_region(ax: Axes, region) -> None:
    """Draw the outline of `region` (H, W), nonzero inside, dashed black and white (seen on a
    white mark and on a dark one alike); nothing for None or an empty region."""
    if region is not None and np.asarray(region).any():
        arr = np.asarray(region, dtype=np.float32)
        ax.contour(arr, levels=[0.5], colors="black", linewidths=1.6)
        ax.contour(arr, levels=[0.5], colors="white", linewidths=1.0, linestyles="--")


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
        ax.plot(x, y, "x", color="red", ms=9, mew=2.5, clip_on=False)  # whole on a border
    else:
        ax.plot(x, y, "o", color="white" if inside is None else "lime", ms=8, mec="k",
                clip_on=False)


def map_title(name: str, m: Tensor) -> str:
    """A panel's title: the layer, its native map size and its raw maximum."""
    return f"{name} · {'x'.join(map(str, m.shape[-2:]))} · max {float(m.max()):.2g}"


def plot_layer_grid(image, maps: Sequence[Tensor], titles: Sequence[str] | None = None,
                    shared_scale: bool = False, ncols: int = 5, colorbar: bool = True,
                    cmap: str = "magma", mask=None, suptitle: str | None = None,
                    save: str | Path | None = None, details: bool = True,
                    centres: Sequence[CellCentres | None] | None = None, peaks: bool = False,
                    region=None, grey: bool = False) -> Figure:
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
        peaks: mark each map's peak (`mark_peak`: green inside `mask`, a red cross outside).
        region: (H, W), nonzero inside, a second region (a planted mark, a watermark): its
            outline drawn dashed on every panel.
        grey: draw the maps over the image in dark grey (the first panel keeps its colours):
            a colour map reads the same over any background, a white mark included.

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
    outline_region(axs[0], region)
    axs[0].set_title("image" + (" · mask outline" if mask is not None else ""), fontsize=9)
    axs[0].set_axis_off()
    under = np.repeat(img.mean(axis=2, keepdims=True) * 0.6, 3, axis=2) if grey else img
    for ax, h, m, name in zip(axs[1:], heat, maps, names):
        im = overlay(ax, under, h, cmap=cmap, mask=mask)
        outline_region(ax, region)
        if peaks:
            mark_peak(ax, h, mask)
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


def mean_map_image(mean: np.ndarray, side: int = 96) -> Image.Image:
    """A cluster's mean map (grid, grid) as a colour image `side` pixels a side, with the
    centre square (cyan) and the four corner squares (grey) outlined, a quarter of the image
    each."""
    top = mean.max()
    rgba = heat_cmap("magma", 1.0)(mean / top if top > 0 else mean)  # opaque
    img = Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8))
    img = img.resize((side, side), Image.Resampling.NEAREST)
    draw, q = ImageDraw.Draw(img), side // 4
    draw.rectangle([q, q, side - q - 1, side - q - 1], outline=(0, 220, 255))
    for x in (0, side - q):
        for y in (0, side - q):
            draw.rectangle([x, y, x + q - 1, y + q - 1], outline=(160, 160, 160))
    return img


def plot_clusters(clusters, notes: Sequence[str] | None = None, ncols: int = 6,
                  save: str | Path | None = None) -> Figure:
    """Every cluster's mean map (`mean_map_image`), titled with its class, number and size; a
    flagged cluster titled and framed in red.

    Args:
        clusters: `Audit.clusters` (or the `Audit`): class, cluster, size, flagged, mean_map.
        notes: a last title line per cluster, in the order of `clusters`.
    """
    clusters = getattr(clusters, "clusters", clusters)
    nrows = -(-len(clusters) // ncols)
    fig = new_figure(figsize=(1.7 * ncols, 2.4 * nrows))
    axs = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for i, (ax, (_, row)) in enumerate(zip(axs, clusters.iterrows())):
        ax.imshow(mean_map_image(row["mean_map"]))
        note = f"\n{notes[i]}" if notes is not None else ""
        ax.set_title(f"{row['class']}\n#{row['cluster']}: {row['size']} maps{note}",
                     fontsize=8, color="#d22" if row["flagged"] else "black")
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set(color="#d22" if row["flagged"] else "0.7",
                     linewidth=3 if row["flagged"] else 1)
    for ax in axs[len(clusters):]:
        ax.axis("off")  # the empty panels of the last row
    fig.tight_layout()
    return saved(fig, save)


def plot_interventions(examples: dict[int, list[tuple[np.ndarray, str]]], titles: dict[int, str],
                       save: str | Path | None = None) -> Figure:
    """One row per cluster: the images of `Audit.examples` (the image with its region
    outlined, the region taken away, an image of another class, the region moved into it;
    where tested, an image's copies outlined, taken away and alone moved in; last, the image
    with its class's content swapped for another class's), each captioned with the network's
    prediction; `titles` name each row's cluster."""
    rows = [k for k in titles if k in examples]
    columns = max([len(examples[k]) for k in rows], default=4)
    h, w = examples[rows[0]][0][0].shape[:2] if rows else (3, 4)
    # each row: an image 2 in wide, and two lines of caption above it
    fig = new_figure(figsize=(2.1 * columns, (2 * h / w + 0.6) * max(1, len(rows))))
    axs = fig.subplots(max(1, len(rows)), columns, squeeze=False)
    for ax_row, k in zip(axs, rows):
        for ax in ax_row[len(examples[k]):]:
            ax.axis("off")
        for ax, (image, caption) in zip(ax_row, examples[k]):
            ax.imshow(image)
            ax.set_title(caption.replace(": ", ":\n"), fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        ax_row[0].set_ylabel(titles[k], fontsize=8)
    fig.tight_layout()
    return saved(fig, save)
