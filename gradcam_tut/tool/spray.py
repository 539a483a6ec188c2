"""Spectral relevance analysis (SpRAy; Lapuschkin et al., Nature Communications 2019,
"Unmasking Clever Hans predictors"): cluster the explanation maps of a whole class, so that a
strategy the network uses on many images shows up as a cluster of similar maps.

Maps are compared on a `grid` x `grid` grid of the image, each scaled to a maximum of 1, up to
mirror images (each averaged with its three flips: a tag in the top-left corner and one in the
bottom-right are one strategy), with scikit-learn's `SpectralClustering`, the number of
clusters chosen by the eigengap. Where a map's mass lies (`mass_numbers`):

    centre   cells whose centres lie in the middle half of both axes   (1/4 of the image)
    corners  cells in the outer quarter of both axes: 4 squares        (1/4 of the image)
    edges    the rest: the border between the corners                  (1/2 of the image)
    compactness  1 - spread / a flat map's spread, clipped to 0..1 (spread: the root mean
             squared distance of the mass from its centroid); 1 is a point, 0 flat or split
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.sparse.linalg import lobpcg
from sklearn.cluster import SpectralClustering
from sklearn.neighbors import NearestNeighbors

from ..metrics import peak_points

GRID = 8  # maps are compared on GRID x GRID cells of the image
MAX_CLUSTERS = 6  # at most this many clusters per class
MIN_PER_CLUSTER = 4  # and at most n // this many, so that a cluster has a few images
GAP_TIE = 0.8  # eigengaps within 20% of the largest are ties, won by fewer clusters
NEIGHBOURS = 7  # local scale: the distance to the 7th nearest map (Zelnik-Manor & Perona)
DENSE_MAX = 4000  # more maps in a class: a sparse nearest-neighbour affinity (memory ~ n^2)
SPARSE_NEIGHBOURS = 15  # the neighbours each map keeps in the sparse affinity


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
