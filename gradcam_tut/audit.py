"""A Clever-Hans audit without masks: cluster every class's Grad-CAM maps and flag the clusters
that look away from the object.

Spectral relevance analysis (SpRAy; Lapuschkin et al., Nature Communications 2019, "Unmasking
Clever Hans predictors") clusters the explanation maps of a whole class: a strategy the network
uses on many images, such as reading a copyright tag, shows up as a cluster of similar maps.
Here one `explain` pass gives each image's map at one layer (for its true class where the
image sits in a `<class>/<image>` folder named like a class of the learner, else for its
prediction), each map is placed on a `grid` x `grid` grid of the image and scaled to a maximum
of 1, and each class's maps are clustered with scikit-learn's `SpectralClustering`, the number
of clusters chosen by the eigengap. Maps are compared up to mirror images (each averaged with
its three flips): a tag in the top-left corner and one in the bottom-right are one strategy.
Each cluster's mean map says where its mass lies, and its maps' peaks where they point:

    centre   cells whose centres lie in the middle half of both axes   (1/4 of the image)
    corners  cells in the outer quarter of both axes: 4 squares        (1/4 of the image)
    edges    the rest: the border between the corners                  (1/2 of the image)
    compactness  1 - spread / a flat map's spread, clipped to 0..1 (spread: the root mean
             squared distance of the mass from its centroid); 1 is a point, 0 flat or split

A cluster is **flagged** when its maps look at the corners or along the border rather than
at a compact central region, by any of three numbers:

    peaks in corners >= 0.5   half its maps or more peak in a corner (a random peak: 0.25)
    corners >= 0.45           its mean map's mass in the corners (a flat map: 0.25)
    centre <= 0.10            its mean map's mass in the centre (a flat map: 0.25)

Measured on notebook 06's shortcut (`benchmarks/bench_audit.py`): a map that peaks on the
corner mark peaks in the corners 99% of the time, the other maps 13%; the mean maps stay
spread (layer2's receptive fields are wide), so the peaks catch what the mass alone misses.
A flag asks a person to look; it is no verdict (an object that sits in a corner of most photos
is flagged too).

    audited/
      clusters.csv   one row per image: file, class, cluster, flagged, the numbers
      report.html    classes -> clusters -> mean map and examples; one file, images inside
      complete.json  written last (`results.written_whole`)
"""

from __future__ import annotations

import base64
import html
import io
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.learner import Learner
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import sparse
from scipy.sparse.linalg import lobpcg
from sklearn.cluster import SpectralClustering
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

from .cam import Layer, body_layers, grad_cam, normalize_maps, resolve_layers
from .explain import csv_safe, explain_maps, gathered, image_paths, on_this_process
from .metrics import peak_points
from .plot import heat_cmap, image_hwc, new_figure, saved
from .receptive_field import CellCentres, cell_centres, place
from .results import check_destination, written_whole

RESULTS = ("clusters.csv", "report.html")
GRID = 8  # maps are compared on GRID x GRID cells of the image
MIN_CELLS = 7  # the default layer: the deepest whose map has at least this many cells a side
MAX_CLUSTERS = 6  # at most this many clusters per class
MIN_PER_CLUSTER = 4  # and at most n // this many, so that a cluster has a few images
GAP_TIE = 0.8  # eigengaps within 20% of the largest are ties, won by fewer clusters
NEIGHBOURS = 7  # local scale: the distance to the 7th nearest map (Zelnik-Manor & Perona)
DENSE_MAX = 4000  # more maps in a class: a sparse nearest-neighbour affinity (memory ~ n^2)
SPARSE_NEIGHBOURS = 15  # the neighbours each map keeps in the sparse affinity
PEAK_FLAG = 0.5  # a cluster is flagged when at least this share of its maps peak in a corner,
CORNER_FLAG = 0.45  # ... or at least this share of its mean map's mass is in the corners,
CENTRE_FLAG = 0.10  # ... or at most this share in the centre
EXAMPLES = 6  # example images per cluster in the report
THUMB = 96  # pixels a side of a mean map; examples are 3/4 of it


@dataclass
class Audit:
    """What `audit` found.

    Attributes:
        images: one row per image, the rows of `clusters.csv` (see `audit`).
        clusters: one row per (class, cluster): size, accuracy, mass numbers, flagged, why.
        features: (N, grid, grid) float32, each image's map on the grid, maximum 1 (0 for an
            all-zero map), in the order of `images`.
        maps: (N, h, w) float32, the maps as `grad_cam` gives them, in the same order.
        layer: the layer the maps are from.
        seconds: wall time of "explain" (the model pass), "cluster" and "report".
    """

    images: pd.DataFrame
    clusters: pd.DataFrame
    features: np.ndarray
    maps: np.ndarray
    layer: str
    seconds: dict[str, float] = field(default_factory=dict)


def regions(grid: int = GRID) -> dict[str, np.ndarray]:
    """Boolean (grid, grid) masks of the centre, the edges and the corners (see the module).

    Raises:
        ValueError: `grid` not a multiple of 4 (the regions would not be 1/4, 1/2, 1/4).
    """
    if grid < 4 or grid % 4:
        raise ValueError(f"grid={grid}: use a multiple of 4 (8, 16), so that the centre and "
                         "the corners are each a quarter of the image")
    inner = np.zeros(grid, bool)
    inner[grid // 4: grid - grid // 4] = True
    centre = inner[:, None] & inner[None, :]
    corners = ~inner[:, None] & ~inner[None, :]
    return {"centre": centre, "edges": ~centre & ~corners, "corners": corners}


def mass_numbers(maps: np.ndarray) -> pd.DataFrame:
    """Where the mass of each map (N, grid, grid) lies: its share in the centre, the edges and
    the corners, its compactness (see the module), the row and column of its peak cell and the
    region it is in (`peak_in`). An all-zero map gets NaN shares, no peak (-1, "") and `empty`
    1: it holds no evidence anywhere."""
    maps = np.asarray(maps, dtype=np.float64)
    N, G, _ = maps.shape
    total = maps.sum(axis=(1, 2))
    empty = total <= 0
    mass = maps / np.where(empty, 1.0, total)[:, None, None]  # (N, G, G), sums to 1
    parts = regions(G)
    out = {name: (mass * where).sum(axis=(1, 2)) for name, where in parts.items()}
    pos = (np.arange(G) + 0.5) / G  # cell centres in image units, 0..1
    cy, cx = (mass.sum(2) * pos).sum(1), (mass.sum(1) * pos).sum(1)  # (N,) centroid
    spread2 = (mass.sum(2) * (pos - cy[:, None]) ** 2).sum(1) \
        + (mass.sum(1) * (pos - cx[:, None]) ** 2).sum(1)
    flat2 = 2 * (pos.var())  # a flat map's squared spread on this grid
    out["compactness"] = np.clip(1 - np.sqrt(spread2 / flat2), 0, 1)
    table = pd.DataFrame(out)
    table.loc[empty, list(out)] = np.nan
    rows, cols = (t.numpy() for t in peak_points(torch.from_numpy(maps)))  # ties: the middle
    where = np.select([r[rows, cols] for r in parts.values()], np.array(list(parts)), "")
    table["peak_row"], table["peak_col"] = np.where(empty, -1, rows), np.where(empty, -1, cols)
    table["peak_in"] = np.where(empty, "", where)
    table["empty"] = empty.astype(int)
    return table


def flag_reason(numbers: pd.Series | dict) -> str:
    """Why a cluster is flagged (see the module), or "" when it is not.

    Args:
        numbers: its mean map's `centre` and `corners` (`mass_numbers`), and
            `peaks_in_corners`, the share of its maps whose peak is in a corner (NaN: none).
    """
    peaks = numbers.get("peaks_in_corners", np.nan)
    if peaks >= PEAK_FLAG:
        return f"{peaks:.0%} of its maps peak in a corner (flag at {PEAK_FLAG:.0%})"
    if numbers["corners"] >= CORNER_FLAG:
        return f"corners hold {numbers['corners']:.2f} of the mass (flag at {CORNER_FLAG})"
    if numbers["centre"] <= CENTRE_FLAG:
        return (f"along the border: the centre holds {numbers['centre']:.2f} of the mass "
                f"(flag at {CENTRE_FLAG})")
    return ""


def affinity(features: np.ndarray, dense_max: int = DENSE_MAX) -> np.ndarray | sparse.csr_matrix:
    """Similarity of the maps (N, D), with local scaling (Zelnik-Manor & Perona, NeurIPS 2004):
    W_ij = exp(-d_ij^2 / (s_i s_j)), d the Euclidean distance, s_i the distance from map i to
    its `NEIGHBOURS`-th nearest map. Dense (N, N) up to `dense_max` maps; above, a sparse
    matrix that keeps each map's `SPARSE_NEIGHBOURS` nearest (memory ~ N k instead of N^2:
    20,000 maps dense take 3.2 GB per copy, and spectral clustering makes several)."""
    X = np.ascontiguousarray(features, dtype=np.float32)
    N = len(X)
    k = min(NEIGHBOURS, N - 1)
    if N <= dense_max:
        sq = (X * X).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0).astype(np.float64)
        np.fill_diagonal(d2, 0)
        scale = np.sqrt(np.partition(d2, k, axis=1)[:, k])
        scale = np.maximum(scale, _floor(scale))
        W = np.exp(-d2 / (scale[:, None] * scale[None, :]))
        return (W + W.T) / 2
    n_keep = min(max(SPARSE_NEIGHBOURS, k) + 1, N)
    dist, idx = NearestNeighbors(n_neighbors=n_keep).fit(X).kneighbors(X)  # self first
    scale = np.maximum(dist[:, k], _floor(dist[:, k]))
    w = np.exp(-dist.astype(np.float64) ** 2 / (scale[:, None] * scale[idx]))
    W = sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(N), n_keep), idx.ravel())),
                          shape=(N, N))
    return W.maximum(W.T).tocsr()


def _floor(scale: np.ndarray) -> float:
    """A smallest local scale: identical maps (all-zero ones) would otherwise divide by 0."""
    positive = scale[scale > 0]
    return float(positive.min() * 1e-3) if len(positive) else 1.0


def laplacian_spectrum(W: np.ndarray | sparse.spmatrix, n: int) -> np.ndarray:
    """The `n` smallest eigenvalues of the normalised Laplacian I - D^-1/2 W D^-1/2, ascending
    (the largest of the normalised affinity; for more than 300 maps by LOBPCG, a block method
    that finds a repeated eigenvalue as often as it repeats: a sparse affinity in k pieces has
    k zeros, and ARPACK's Lanczos returned two of three, measured)."""
    N = W.shape[0]
    d = np.asarray(W.sum(axis=1)).ravel()
    inv = 1 / np.sqrt(np.maximum(d, 1e-300))
    if sparse.issparse(W):
        A = sparse.diags(inv) @ W @ sparse.diags(inv)
    else:
        A = W * inv[:, None] * inv[None, :]
    if N <= 300 or n >= N - 1:
        mu = np.linalg.eigvalsh(A.toarray() if sparse.issparse(A) else A)[::-1][:n]
    else:
        start = np.random.default_rng(0).normal(size=(N, n))  # the same every run
        with warnings.catch_warnings():  # "not reaching the requested tolerance": close enough
            warnings.simplefilter("ignore", UserWarning)
            mu = np.sort(lobpcg(A, start, largest=True, tol=1e-6, maxiter=500)[0])[::-1]
    return np.clip(1 - mu, 0, 2)


def eigengap_clusters(eigenvalues: np.ndarray, tie: float = GAP_TIE) -> int:
    """The number of clusters k with the largest gap lambda_{k+1} - lambda_k between the
    Laplacian's smallest eigenvalues (ascending): k well separated groups give k eigenvalues
    near 0 and then a jump (von Luxburg, "A tutorial on spectral clustering", 2007, 8.3).
    A gap of at least `tie` x the largest is a tie, and ties go to fewer clusters: maps with
    no cluster structure give gaps that are all alike, and the largest is then chance."""
    if len(eigenvalues) < 2:
        return 1
    gaps = np.diff(eigenvalues)
    return int(np.flatnonzero(gaps >= tie * gaps.max())[0]) + 1


def mirrored(features: np.ndarray) -> np.ndarray:
    """Maps (N, h, w) averaged with their left-right, up-down and both flips, scaled to a
    maximum of 1: where a map looks, up to which side or corner."""
    f = np.asarray(features, dtype=np.float32)
    g = f + f[:, ::-1] + f[:, :, ::-1] + f[:, ::-1, ::-1]
    return g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-12)


def cluster_maps(features: np.ndarray, max_clusters: int = MAX_CLUSTERS,
                 dense_max: int = DENSE_MAX, seed: int = 0,
                 mirror: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Spectral clustering of one class's maps, the number of clusters from the eigengap.

    Args:
        features: (N, grid, grid) maps, each scaled to a maximum of 1.
        mirror: compare the maps up to mirror images (`mirrored`): the same place in another
            corner or on the other side is the same strategy.
        max_clusters: the cap; also at most N // `MIN_PER_CLUSTER` clusters.
        dense_max: above this many maps the affinity is sparse (`affinity`).

    Returns:
        Labels (N,) numbered by size, 0 the largest cluster; and the Laplacian's smallest
        eigenvalues that chose their number.
    """
    X = mirrored(features) if mirror else np.asarray(features, dtype=np.float32)
    X = X.reshape(len(X), -1)
    N = len(X)
    cap = min(max_clusters, N // MIN_PER_CLUSTER)
    if cap < 2:
        return np.zeros(N, int), np.zeros(1)
    W = affinity(X, dense_max)
    eigenvalues = laplacian_spectrum(W, cap + 1)
    k = eigengap_clusters(eigenvalues)
    if k == 1:
        return np.zeros(N, int), eigenvalues
    with warnings.catch_warnings():  # a graph in pieces: the eigengap counted the pieces
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        # LOBPCG for the embedding too: ARPACK's shift-invert took 65 s at 20,000 maps, this 1 s
        labels = SpectralClustering(n_clusters=k, affinity="precomputed",
                                    assign_labels="cluster_qr", random_state=seed,
                                    eigen_solver="lobpcg" if N > 300 else "arpack"
                                    ).fit_predict(W)
    by_size = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    return np.argsort(by_size)[labels], eigenvalues


def default_layer(learn: Learner, x: Tensor) -> str:
    """The deepest body layer whose map of the batch `x` has at least `MIN_CELLS` cells on its
    shorter side (fine enough to tell a corner from the centre); else the finest layer."""
    body = body_layers(learn.model)
    maps = grad_cam(learn.model, x[:1], list(body.values()))
    sides = {name: min(m.shape[-2:]) for name, m in zip(body, maps)}
    fine = [name for name, side in sides.items() if side >= MIN_CELLS]
    return fine[-1] if fine else max(sides, key=sides.get)


def on_grid(maps: np.ndarray, size: tuple[int, int], centres: CellCentres | None,
            grid: int = GRID) -> np.ndarray:
    """Maps (N, h, w) placed on the image (`receptive_field.place`: each cell at its receptive
    field's centre), averaged into (N, grid, grid) and scaled to a maximum of 1."""
    out = []
    for chunk in torch.from_numpy(np.asarray(maps, np.float32)).split(256):
        placed = place(chunk, size, centres)  # (b, H, W)
        out.append(F.adaptive_avg_pool2d(placed[:, None], grid)[:, 0])
    return normalize_maps(torch.cat(out)).numpy()


def audit(learn: Learner, items: Sequence[str | Path] | str | Path,
          out: str | Path | None = None, layer: Layer | None = None,
          method: str = "gradcam", bs: int = 16, grid: int = GRID,
          max_clusters: int = MAX_CLUSTERS, examples: int = EXAMPLES,
          force: bool = False) -> Audit:
    """Cluster every class's Grad-CAM maps and flag the clusters that look away from the object
    (see the module for the rule), with no mask.

    One `explain` pass over `items` (a batch at a time) gives each image's map at `layer` for
    its true class where it lies in a `<class>/<image>` folder whose name is one of
    `learn.dls.vocab`, else for its predicted class; images are grouped the same way.
    Under `accelerate launch --num_processes N` (or `torchrun`) each process explains every
    N-th image, the maps are gathered, every process clusters them and the first one writes
    `out` (`explain.process_group`).

    Args:
        items: image files and folders (searched recursively, as `explain` does).
        out: a folder for `clusters.csv` and `report.html`, written whole or not at all
            (`results.written_whole`): an earlier result is replaced only with `force`.
        layer: a body layer's name or a module; default `default_layer`.
        method: a CAM method of `grad_cam`.
        grid: the maps are compared on grid x grid cells of the image (a multiple of 4).
        max_clusters: at most this many clusters per class (the eigengap picks up to it).
        examples: images shown per cluster in the report: the nearest to its mean map.

    Returns:
        An `Audit`; its `images` has one row per image: file, class, cluster, flagged (1 when
        its cluster is), label ("" when none), predicted, confidence, correct (empty without
        a label), its cluster's size, its own map's centre, edges, corners, compactness,
        peak_row, peak_col, peak_in (centre, edges, corners) and empty (an all-zero map).

    Raises:
        ValueError: `bs` < 1, a `grid` that is not a multiple of 4, an unknown layer or method,
            a file name a CSV cannot hold, images that cannot be decoded.
        FileNotFoundError: no images in `items`.
        FileExistsError: an earlier result in `out` (without `force`), or files not ours.
        ResultInUse: another run writes to `out`.
        NotWritten: the disk is full or read-only; `out` is left as it was.
    """
    if bs < 1:
        raise ValueError(f"bs={bs!r}: pass a batch size of at least 1 (images per pass)")
    regions(grid)  # checks grid before any compute
    if out is not None:
        check_destination(out, RESULTS, force)
    items = [items] if isinstance(items, (str, Path)) else items
    files = image_paths(items)
    if out is not None:
        csv_safe(files)
    rank, world = on_this_process(learn, files)
    start = time.perf_counter()
    (x,) = learn.dls.test_dl(files[:1]).one_batch()
    size = tuple(x.shape[-2:])
    layer = default_layer(learn, x) if layer is None else layer
    named = resolve_layers(learn.model, layer)
    name, module = next(iter(named.items()))
    table, maps = _explain_all(learn, files[rank::world], named, method, bs)
    table, maps = gathered(table, {name: maps}, world)
    maps = maps[name]
    seconds = {"explain": time.perf_counter() - start}

    start = time.perf_counter()
    centres = cell_centres(learn.model, [module], size)[name]
    features = on_grid(maps, size, centres, grid)
    images, clusters = _clusters(table, features, max_clusters)
    seconds["cluster"] = time.perf_counter() - start

    result = Audit(images, clusters, features, maps, name, seconds)
    if out is not None and rank == 0:
        start = time.perf_counter()
        with written_whole(out, RESULTS, force, by="gradcam-tut audit") as tmp:
            images.to_csv(tmp / "clusters.csv", index=False)
            page = report_html(result, _example_thumbnails(learn, result, maps, centres, size,
                                                           examples, bs), method=method)
            (tmp / "report.html").write_text(page, encoding="utf-8")
        seconds["report"] = time.perf_counter() - start
    return result


def _explain_all(learn: Learner, files: list[Path], named: dict, method: str, bs: int
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """`explain`'s batches over `files`, the true class's map for the labelled ones (one call
    per class) and the prediction's for the rest: the table with a `label` column, and the
    maps (N, h, w) at the one layer, both in the order of `files`."""
    vocab = list(learn.dls.vocab)
    labels = [f.parent.name if f.parent.name in vocab else "" for f in files]
    tables, maps, order = [], [], []
    for label in sorted(set(labels)):
        pos = [i for i, lab in enumerate(labels) if lab == label]
        cls = vocab.index(label) if label else None
        t, m = explain_maps(learn, [files[i] for i in pos], named, cls, method, bs)
        tables.append(t.assign(label=label))
        maps.append(next(iter(m.values())))
        order += pos
    back = np.argsort(order)
    table = pd.concat(tables, ignore_index=True).iloc[back].reset_index(drop=True)
    return table, np.concatenate(maps)[back]


def _clusters(table: pd.DataFrame, features: np.ndarray, max_clusters: int
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-image rows of `clusters.csv` and one row per (class, cluster)."""
    labelled = table["label"] != ""
    images = pd.DataFrame({"file": table["file"],
                           "class": table["label"].where(labelled, table["predicted"]),
                           "cluster": 0, "flagged": 0, "label": table["label"],
                           "predicted": table["predicted"],
                           "confidence": table["confidence"].round(4),
                           "correct": pd.array(np.where(labelled,
                                                        table["label"] == table["predicted"],
                                                        pd.NA), dtype="Int64")})
    own = mass_numbers(features)
    rows = []
    for cls in sorted(images["class"].unique()):
        pos = np.flatnonzero(images["class"] == cls)
        labels, eigenvalues = cluster_maps(features[pos], max_clusters)
        images.loc[pos, "cluster"] = labels
        for c in range(labels.max() + 1):
            members = pos[labels == c]
            mean = features[members].mean(0)
            numbers = mass_numbers(mean[None]).iloc[0]
            peaks = own["peak_in"].iloc[members]
            numbers["peaks_in_corners"] = ((peaks == "corners").sum() / (peaks != "").sum()
                                           if (peaks != "").any() else np.nan)
            correct = images.loc[members, "correct"].dropna()
            why = "" if numbers["empty"] else flag_reason(numbers)
            rows.append({"class": cls, "cluster": c, "size": len(members),
                         "accuracy": float(correct.mean()) if len(correct) else np.nan,
                         "labelled": len(correct),
                         **numbers[["centre", "edges", "corners", "compactness",
                                    "peaks_in_corners"]].to_dict(),
                         "flagged": int(bool(why)), "why": why, "mean_map": mean,
                         "members": members, "eigenvalues": eigenvalues})
    clusters = pd.DataFrame(rows)
    for row in clusters.itertuples():
        images.loc[row.members, "flagged"] = row.flagged
        images.loc[row.members, "cluster_size"] = row.size
    images = pd.concat([images, own.round(4)], axis=1)
    images["cluster_size"] = images["cluster_size"].astype(int)
    return images, clusters


def _rgb(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)


def _data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _thumb(img: Image.Image) -> Image.Image:
    w, h = img.size
    scale = THUMB * 3 / 4 / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def mean_map_image(mean: np.ndarray) -> Image.Image:
    """A cluster's mean map (grid, grid) as a colour image, THUMB pixels a side, with the
    centre square and the four corner squares outlined."""
    top = mean.max()
    rgba = heat_cmap("magma", 1.0)(mean / top if top > 0 else mean)  # opaque
    img = Image.fromarray(_rgb(rgba[..., :3])).resize((THUMB, THUMB), Image.NEAREST)
    draw, q = ImageDraw.Draw(img), THUMB // 4
    draw.rectangle([q, q, THUMB - q - 1, THUMB - q - 1], outline=(0, 220, 255))
    for x in (0, THUMB - q):
        for y in (0, THUMB - q):
            draw.rectangle([x, y, x + q - 1, y + q - 1], outline=(160, 160, 160))
    return img


def plot_clusters(result: Audit, notes: Sequence[str] | None = None, ncols: int = 6,
                  save: str | Path | None = None) -> Figure:
    """Every cluster's mean map (`mean_map_image`: the centre square outlined in cyan, the
    corners in grey), titled with its class, number and size; a flagged cluster framed in red.

    Args:
        notes: a last title line per cluster, in the order of `result.clusters`.
    """
    rows = list(result.clusters.itertuples())
    nrows = -(-len(rows) // ncols)
    fig = new_figure(figsize=(1.7 * ncols, 2.4 * nrows))
    axs = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for i, (ax, row) in enumerate(zip(axs, rows)):
        ax.imshow(mean_map_image(row.mean_map))
        note = f"\n{notes[i]}" if notes is not None else ""
        name = result.clusters["class"].iloc[i]
        ax.set_title(f"{name}\n#{row.cluster}: {row.size} maps{note}", fontsize=8,
                     color="#d22" if row.flagged else "black")
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set(color="#d22" if row.flagged else "0.7", linewidth=3 if row.flagged else 1)
    for ax in axs[len(rows):]:
        ax.axis("off")  # the empty panels of the last row
    fig.tight_layout()
    return saved(fig, save)


def _example_thumbnails(learn: Learner, result: Audit, maps: np.ndarray,
                        centres: CellCentres | None, size: tuple[int, int], examples: int,
                        bs: int) -> dict[int, tuple[str, str]]:
    """{image index: (image, image with its map) as data URIs} for the `examples` images of
    each cluster nearest its mean map: the image as the network saw it (validation
    transforms), decoded."""
    chosen = []
    for row in result.clusters.itertuples():
        members = row.members
        dist = ((result.features[members] - row.mean_map) ** 2).sum(axis=(1, 2))
        chosen += list(members[np.argsort(dist, kind="stable")[:examples]])
    files = [Path(result.images["file"][i]) for i in chosen]
    dl = learn.dls.test_dl(files, bs=bs)
    cmap, thumbs, done = heat_cmap(), {}, 0
    for (xb,) in dl:
        decoded = dl.decode((xb,))[0]
        heat = normalize_maps(place(torch.from_numpy(maps[chosen[done:done + len(xb)]]),
                                    size, centres))  # (b, H, W)
        for image, h in zip(decoded, heat):
            rgb = image_hwc(image)
            rgba = cmap(h.numpy())
            mixed = rgb * (1 - rgba[..., 3:]) + rgba[..., :3] * rgba[..., 3:]
            thumbs[chosen[done]] = tuple(_data_uri(_thumb(Image.fromarray(_rgb(a))), "JPEG")
                                         for a in (rgb, mixed))
            done += 1
    return thumbs


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Grad-CAM audit: {title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; }}
.controls button {{ font: inherit; padding: .2em .8em; margin-right: .4em; }}
.controls button[aria-pressed="true"] {{ background: #246; color: #fff; }}
.clusters {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.cluster {{ border: 2px solid #ccc; border-radius: 6px; padding: 8px; width: 460px; }}
.cluster.flagged {{ border-color: #d22; background: #fff4f4; }}
.cluster h3 {{ margin: 0 0 6px; font-size: 1em; }}
.flag {{ color: #fff; background: #d22; border-radius: 3px; padding: 0 .4em; }}
.why {{ color: #b00; }}
.top {{ display: flex; gap: 10px; align-items: flex-start; }}
.numbers td {{ padding: 0 .5em 0 0; }}
.examples {{ display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; }}
.example {{ display: flex; gap: 1px; }}
.example img, .mean {{ image-rendering: pixelated; }}
.note {{ color: #555; max-width: 60em; }}
</style></head><body>
<h1>Grad-CAM audit</h1>
<p class="note">{summary}</p>
<p class="note">Each class's maps at <code>{layer}</code> ({method}, on {grid}x{grid} cells of the
image, each scaled to a maximum of 1) are clustered with spectral clustering, up to mirror
images, the number of clusters from the eigengap. The mean map of a cluster shows the centre
(cyan square) and the four corners (grey squares), each a quarter of the image; the numbers are
the shares of its mass there, and the share of its maps that peak in a corner. <b>Flagged</b>:
at least {peak} of its maps peak in a corner (a random peak: 0.25), or the corners hold at
least {corner} of the mean map's mass, or the centre at most {centre} (a flat map: 0.25 each).
Examples: the images nearest their cluster's mean map, as the network saw them, and their map.
A flag asks you to look; it is no verdict.</p>
<div class="controls">Sort clusters by
<button type="button" data-key="size" aria-pressed="false">size</button>
<button type="button" data-key="accuracy" aria-pressed="false">accuracy</button>
<span id="sorted"></span></div>
{classes}
<script>
document.querySelectorAll("button[data-key]").forEach(function (button) {{
  button.addEventListener("click", function () {{
    var key = button.dataset.key, desc = button.dataset.dir !== "desc";
    document.querySelectorAll("button[data-key]").forEach(function (b) {{
      b.dataset.dir = ""; b.setAttribute("aria-pressed", "false"); }});
    button.dataset.dir = desc ? "desc" : "asc";
    button.setAttribute("aria-pressed", "true");
    document.querySelectorAll(".clusters").forEach(function (list) {{
      var cards = Array.prototype.slice.call(list.children);
      cards.sort(function (a, b) {{
        var x = parseFloat(a.dataset[key]), y = parseFloat(b.dataset[key]);
        if (isNaN(x) || isNaN(y)) {{ return isNaN(x) - isNaN(y); }}  // no value: last
        return desc ? y - x : x - y;
      }});
      cards.forEach(function (card) {{ list.appendChild(card); }});
    }});
    document.getElementById("sorted").textContent =
      "(" + key + ", " + (desc ? "largest" : "smallest") + " first; click again to reverse)";
  }});
}});
</script>
</body></html>
"""


def report_html(result: Audit, thumbs: dict[int, tuple[str, str]],
                method: str = "gradcam") -> str:
    """The report page: one static HTML file, every image inside it as a data URI (it opens
    offline, and can be mailed as one file). Classes, each with its clusters as cards
    (`data-size`, `data-accuracy` for the sort buttons; flagged cards have class `flagged`)."""
    esc = html.escape
    images, clusters = result.images, result.clusters
    sections = []
    for cls, group in clusters.groupby("class", sort=True):
        n = int(group["size"].sum())
        cards = []
        for row in group.itertuples():
            acc = "" if np.isnan(row.accuracy) else f"{row.accuracy:.4f}"
            acc_text = (f"accuracy {row.accuracy:.2f} ({row.labelled} labelled)" if acc
                        else "no labels")
            flag = ('<span class="flag">flagged</span> ' if row.flagged else "")
            numbers = "".join(f"<tr><td>{k.replace('_', ' ')}</td>"
                              f"<td>{getattr(row, k):.2f}</td></tr>"
                              for k in ("centre", "edges", "corners", "compactness",
                                        "peaks_in_corners")
                              if not np.isnan(getattr(row, k)))
            shown = []
            for i in row.members:
                if i in thumbs:
                    file = esc(images["file"][i])
                    title = esc(f"{Path(images['file'][i]).name}: predicted "
                                f"{images['predicted'][i]} ({images['confidence'][i]:.2f})")
                    plain, mixed = thumbs[i]
                    shown.append(f'<span class="example" title="{title}">'
                                 f'<img src="{plain}" alt="{file}">'
                                 f'<img src="{mixed}" alt="map of {file}"></span>')
            mean = _data_uri(mean_map_image(row.mean_map))
            cards.append(
                f'<div class="cluster{" flagged" if row.flagged else ""}" '
                f'id="{esc(cls)}-{row.cluster}" data-size="{row.size}" data-accuracy="{acc}">'
                f"<h3>{flag}cluster {row.cluster}: {row.size} images "
                f"({row.size / n:.0%}), {acc_text}</h3>"
                + (f'<p class="why">{esc(row.why)}</p>' if row.why else "")
                + f'<div class="top"><img class="mean" src="{mean}" alt="mean map" '
                f'width="{THUMB}" height="{THUMB}"><table class="numbers">{numbers}</table>'
                f'</div><div class="examples">{"".join(shown)}</div></div>')
        k, n_flagged = len(group), int(group["flagged"].sum())
        sections.append(f'<section class="class" data-class="{esc(cls)}"><h2>{esc(cls)}: '
                        f"{n} images, {k} cluster{'s' * (k > 1)}, {n_flagged} flagged</h2>"
                        f'<div class="clusters">{"".join(cards)}</div></section>')
    flagged = clusters[clusters["flagged"] == 1]
    summary = (f"{len(images)} images, {clusters['class'].nunique()} classes, "
               f"{len(clusters)} clusters, {len(flagged)} flagged"
               + (": " + ", ".join(f'<a href="#{esc(r["class"])}-{r["cluster"]}">'
                                   f'{esc(r["class"])} {r["cluster"]} ({r["size"]} images)</a>'
                                   for _, r in flagged.iterrows()) if len(flagged) else "")
               + ".")
    return PAGE.format(title=esc(f"{len(images)} images"), summary=summary,
                       layer=esc(result.layer), method=esc(method), grid=result.features.shape[1],
                       peak=PEAK_FLAG, corner=CORNER_FLAG, centre=CENTRE_FLAG,
                       classes="\n".join(sections))
