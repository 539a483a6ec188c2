"""A Clever-Hans audit without masks: cluster every class's Grad-CAM maps, then ask the
network what the region each cluster's maps point at does, and flag what decides a class
without being its object.

1. **Maps.** One `explain` pass gives each image's map at one layer, for its true class where
   the image sits in a `<class>/<image>` folder named like a class of the learner, else for
   its prediction.
2. **Clusters** (`spray`): each class's maps, placed on the image and compared up to mirror
   images, clustered by spectral relevance analysis (Lapuschkin et al., 2019): a strategy the
   network uses on many images shows up as a cluster of similar maps.
3. **Interventions** (`evidence`, `interventions`): each map's region (where it reaches half
   its maximum) is *taken away* (filled in from its surroundings) and *moved* (pasted at the
   same place into an image of another class), and the same is done to the region's shape
   moved elsewhere in the image, the control. What its class holds at each place (a
   backdrop, a caption, a watermark: the median of its images, objects lying anywhere) is
   *swapped* for another class's, where its class holds it, the rest kept. Its *copies*, the
   colours near its peak that its class's other images hold somewhere, pixel for pixel, and
   other classes' do not, are taken away. Forward passes only.
4. **Flags** (`apply_rule`): a map says where; only an intervention says why. An object's
   region moves other images too (the fish is its class): that alone is no flag. An image is
   flagged when there is also a sign, without masks, that what decides is not its object:
   - *content*: its map peaks within a cell of what swapping its class's content changes
     (`swapped_at_peak`), and its class's content swapped for others' makes those classes
     far more probable than other swaps do (`content_lift`, `RULE["content"]`): a backdrop,
     a tint or a watermark decides over the fish, wherever it lies;
   - *copies*: its map peaks on a copy, and taking its class's copies away lowers the class's
     probability beyond their controls (`RULE["copies"]`): no two photographs of an object
     agree pixel for pixel, a tag, a logo or a caption pasted into each does, wherever it
     lies. (Moved alone, a copy also turns other images; but a network that reads a red
     label on red fish as the fish's colour does that too, and does not need the label.)
   The thresholds come from networks trained without any shortcut alone;
   `benchmarks/bench_audit.py` scores them on six kinds of shortcut, under three draws of the
   tests, and with each kind left out in turn. Where maps peak (`same_place`) is reported, no
   sign: a cluster of maps on an object peaks at one place by chance too (a network trained
   without any shortcut had up to 17% of its images flagged that way), and a mark at one place
   is content its class holds there and a copy. Two more signs were measured and dropped:
   a class's *fixed parts* (what three in four of its images hold at one place, up to
   mirrors) moved alone, and its controls turning other images *everywhere*. On the six
   kinds they flagged no shortcut image that these two did not, and their false alarms (a
   red label moved alone makes fish red enough, to a network that reads colour) broke the
   goal on some draws.

A flag asks a person to look; it is no verdict. The report says what to look for, and that
no flag is no clean bill: a shortcut that is neither at one place nor a copy (a texture that
moves, a camera's colours) gives neither sign.

    audited/
      clusters.csv   one row per image: file, class, cluster, flagged, why, the numbers
      report.html    classes -> clusters -> numbers, interventions, examples; images inside
      complete.json  written last (`results.written_whole`)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.learner import Learner
from scipy import stats
from torch import Tensor

from ..cam import Layer, body_layers, grad_cam, normalize_maps, resolve_layers
from ..metrics import peak_points
from ..receptive_field import CellCentres, cell_centres, place
from .audit_report import example_thumbnails, intervention_examples, report_html, times
from .explaining import (
    csv_safe,
    explain_maps,
    gathered,
    image_paths,
    on_this_process,
    process_group,
)
from .interventions import (
    COPY_BITS,
    colour_codes,
    copied_colours,
    copy_pixels,
    elsewhere,
    fill,
    fixed_content,
    intervene,
    map_regions,
    probabilities,
    same_place,
    swap_content,
)
from .layout import class_name
from .results import (
    check_destination,
    check_inputs_outside,
    formula_safe,
    holding,
    written_whole,
)
from .spray import GRID, MAX_CLUSTERS, cluster_maps, mass_numbers, regions

RESULTS = ("clusters.csv", "report.html")
MIN_CELLS = 7  # the default layer: the deepest whose map has at least this many cells a side
EXAMPLES = 6  # example images per cluster in the report
EVIDENCE = ("region_area", "removed_p", "removed_changed", "moved", "moved_p",
            "removed_control_p", "removed_control_changed", "moved_control", "moved_control_p",
            "same_place", "swapped", "swapped_chance", "swapped_gain", "swapped_at_peak", "copied",
            "copy_removed_p", "copy_removed_control_p")  # evidence's columns
TESTED = 6  # the region's interventions run on up to this many images of each cluster
POOL = 8  # the images a region is moved into are drawn from this many images of each class
SMALL = 32  # the side of the copies `fixed_content` compares, in pixels
SWAP_LEVEL = 0.1  # the pixels whose content is swapped: fixed_content at least this
TESTED_SWAP = 24  # the content is swapped on up to this many images of each class,
SWAPS = 2  # each time with this many other classes' content (one, 24 a class, was too noisy)
P_FLOOR = 1e-4  # a probability below this counts as this: its log compares swaps
MEDIAN_POOL = 16  # what a class holds at each place: the median of this many of its images
HOLDS_SHARE = 0.5  # its content is swapped where at least this share of its class holds it
CHANGED = 0.5  # a map on swapped content: near a pixel changed this share of the most
COPY_LEVEL = 0.5  # a copy: a colour held by this share more of its class than of the others
COPY_CONFIDENCE = 0.95  # what taking copies away costs: its lower bound at this confidence
TESTED_COPIES = 24  # copies are taken away on up to this many images of each class
# what `_Kept` keeps of the explain pass, beside the maps
SMALL_INPUTS, PEAKS, NEAR, HELD = "<small>", "<peaks>", "<near>", "<held>"
# The flag's thresholds (module), from networks trained without any shortcut alone (five, of
# four recipes): each sign flags at most a fifth of 10% of their images on every kind's fish,
# under each of three draws of the tests (`seed`) (`benchmarks/bench_audit.py`, `CALIBRATION`,
# `calibrated_rule`)
RULE = {"content": 3.86, "copies": 0.04}


@dataclass
class Audit:
    """What `audit` found.

    Attributes:
        images: one row per image, the rows of `clusters.csv` (see `audit`).
        clusters: one row per (class, cluster): size, the interventions' numbers and their
            controls (`cluster_numbers`), accuracy, flagged, why, what to look for, mean map,
            members and example.
        features: (N, grid, grid) float32, each image's map on the grid, maximum 1 (0 for an
            all-zero map), in the order of `images`.
        maps: (N, h, w) float32, the maps as `grad_cam` gives them, in the same order.
        layer: the layer the maps are from.
        seconds: wall time of "explain" (the model pass), "cluster", "interventions" (with
            what the explain pass keeps for them, `_Kept`) and "report".
        examples: {row of `clusters`: (image (H, W, 3), caption) pairs}: its example image
            with its region outlined, the region taken away, an image of another class, and
            that image with the region moved in; then its copies and its class's content
            swapped, where tested (`audit_report.intervention_examples`).
    """

    images: pd.DataFrame
    clusters: pd.DataFrame
    features: np.ndarray
    maps: np.ndarray
    layer: str
    seconds: dict[str, float] = field(default_factory=dict)
    examples: dict[int, list] = field(default_factory=dict)


def default_layer(learn: Learner, x: Tensor) -> str:
    """The deepest body layer whose map of the batch `x` has at least `MIN_CELLS` cells on its
    shorter side (fine enough to tell a corner from the centre); else the finest layer."""
    body = body_layers(learn.model)
    maps = grad_cam(learn.model, x[:1], list(body.values()))
    sides = {name: min(m.shape[-2:]) for name, m in zip(body, maps)}
    fine = [name for name, side in sides.items() if side >= MIN_CELLS]
    return fine[-1] if fine else max(sides, key=lambda name: sides[name])


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
          force: bool = False, seed: int = 0, absolute_paths: bool = False) -> Audit:
    """Cluster every class's Grad-CAM maps, test what each map's region does by intervention,
    and flag what decides a class without being its object (see the module), with no mask.

    One `explain` pass over `items` (a batch at a time) gives each image's map at `layer` for
    its true class where it lies in a `<class>/<image>` folder whose name is one of
    `learn.dls.vocab`, else for its predicted class; images are grouped the same way.
    Under `accelerate launch --num_processes N` (or `torchrun`) each process explains every
    N-th image, the maps are gathered, and the first process runs the interventions and
    writes `out` (`explaining.process_group`).

    Args:
        items: image files and folders (searched recursively, as `explain` does).
        out: a folder for `clusters.csv` and `report.html`, written whole or not at all
            (`results.written_whole`): an earlier result is replaced only with `force`.
        layer: a body layer's name or a module; default `default_layer`.
        method: a CAM method of `grad_cam`.
        grid: the maps are clustered on grid x grid cells of the image (a multiple of 4).
        max_clusters: at most this many clusters per class (the eigengap picks up to it).
        examples: images shown per cluster in the report, the nearest to its mean map (0
            to N).
        seed: draws the images regions are moved into, and where the controls go.
        absolute_paths: write the files' absolute paths in `out` (default: relative to the
            folder that holds `items`, so that the report can be shared without the
            machine's paths; `Audit.images` keeps the paths as found).

    Returns:
        An `Audit`; its `images` has one row per image: file, class, cluster, flagged (its
        cluster is, and its region shares the cluster's sign), label ("" when none),
        predicted, confidence, correct (empty without a label), cluster_size, the
        interventions (`evidence`: removed_changed, moved, their controls, same_place,
        region_area) and where its map's mass lies (`spray.mass_numbers`).

    Raises:
        ValueError: `bs` < 1, `examples` < 0, a `grid` that is not a multiple of 4, an
            unknown layer or method, a file name a CSV cannot hold, undecodable images.
        FileNotFoundError: no images in `items`.
        FileExistsError: an earlier result in `out` (without `force`), or files not ours.
        ResultInUse: another run writes to `out`.
        NotWritten: the disk is full or read-only; `out` is left as it was.
    """
    if bs < 1:
        raise ValueError(f"bs={bs!r}: pass a batch size of at least 1 (images per pass)")
    if examples < 0:
        raise ValueError(f"examples={examples!r}: pass how many images to show per cluster, "
                         "0 or more")
    regions(grid)  # checks grid before any compute
    items = [items] if isinstance(items, (str, Path)) else items
    if out is not None:
        check_inputs_outside(items, out)
    rank, _ = process_group()  # the first process holds `out` from start to end
    with holding(out, RESULTS) if out is not None and rank == 0 else nullcontext():
        if out is not None:
            check_destination(out, RESULTS, force)
        return _audit(learn, items, out=out, layer=layer, method=method, bs=bs, grid=grid,
                      max_clusters=max_clusters, examples=examples, force=force, seed=seed,
                      absolute_paths=absolute_paths)


def shown_paths(files: Sequence[str], items: Sequence[str | Path],
                absolute: bool = False) -> list[str]:
    """The files as a report to share shows them: relative to the folder that holds all of
    `items` (the folders and files the user named), or absolute. A file that is a link to a
    file outside that folder says so (`... (a link to a file outside the inputs)`): it pulled
    an image from elsewhere into the report."""
    roots = [Path(os.path.abspath(Path(i).expanduser())) for i in items]
    base = Path(os.path.commonpath([r if r.is_dir() else r.parent for r in roots]))
    real_base = Path(os.path.realpath(base))
    shown = []
    for f in files:
        path = Path(os.path.abspath(f))
        text = str(path) if absolute or not path.is_relative_to(base) \
            else str(path.relative_to(base))
        if not Path(os.path.realpath(path)).is_relative_to(real_base):
            text += " (a link to a file outside the inputs)"
        shown.append(text)
    return shown


def _audit(learn: Learner, items: Sequence[str | Path], *, out: str | Path | None,
           layer: Layer | None, method: str, bs: int, grid: int, max_clusters: int,
           examples: int, force: bool, seed: int, absolute_paths: bool) -> Audit:
    """`audit`'s work, its arguments checked and `out` held."""
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
    centres = cell_centres(learn.model, [module], size)[name]
    keep = _Kept(size, centres)
    table, ours = _explain_all(learn, files[rank::world], named, method, bs, keep)
    table, kept = gathered(table, ours, world)
    maps = kept[name]
    seconds = {"explain": time.perf_counter() - start - keep.seconds}  # an audit without tests

    start = time.perf_counter()
    features = on_grid(maps, size, centres, grid)
    images, members = _clusters(table, features, max_clusters)
    seconds["cluster"] = time.perf_counter() - start
    if rank != 0:  # the first process tests, flags and writes
        return Audit(images, pd.DataFrame(), features, maps, name, seconds)

    start = time.perf_counter() - keep.seconds  # what the explain pass kept for them
    tested, swap, copies = evidence(
        learn, [Path(f) for f in images["file"]], images["class"], images["predicted"], maps,
        centres, size, kept, groups=images["cluster"], seed=seed)
    images, clusters = _flagged(pd.concat([images, tested], axis=1), features, members)
    shown = intervention_examples(learn, images, clusters, maps, centres, size,
                                  grow=round(_cell(centres, size, maps) / 2), swap=swap,
                                  copies=copies)
    seconds["interventions"] = time.perf_counter() - start
    result = Audit(images, clusters, features, maps, name, seconds, shown)
    if out is not None:
        start = time.perf_counter()
        thumbs = example_thumbnails(learn, images, clusters, features, maps, centres, size,
                                    examples, bs)
        with written_whole(out, RESULTS, force, by="gradcam-tut audit") as tmp:
            shared = images.assign(file=shown_paths(images["file"], items, absolute_paths))
            formula_safe(shared).to_csv(tmp / "clusters.csv", index=False)
            page = report_html(shared, clusters, name, thumbs, result.examples, method, RULE)
            (tmp / "report.html").write_text(page, encoding="utf-8")
        seconds["report"] = time.perf_counter() - start
    return result


def evidence(learn: Learner, files: Sequence[Path], classes: Sequence[str],
             predicted: Sequence[str], maps: np.ndarray, centres: CellCentres | None,
             size: tuple[int, int], kept: dict[str, np.ndarray],
             groups: Sequence | None = None, bs: int = 64, seed: int = 0
             ) -> tuple[pd.DataFrame, Swap | None, list[np.ndarray] | None]:
    """What the network does when what a map points at is taken away, or moved into images
    of other classes, one row per image in the order of `files` (columns `EVIDENCE`), the
    content swap (`Swap`; None with a single class) and each image's copied colours
    (`colour_codes`; None with a single class).

    - The map's region (`interventions.map_regions`: the map placed at its cells' receptive
      fields, where it reaches half its maximum, grown by half a cell), on up to `TESTED`
      images of each group (`groups`, e.g. the clusters; default the classes) whose maps
      are not all zero, drawn with
      `seed`: taken away (`removed_*`) and moved into an image of another class (`moved*`);
      the same for the region's shape moved elsewhere in the image (`*_control`) on every
      second of them.
    - `same_place`: how much more often than by chance its class's maps peak where its map
      peaks (`interventions.same_place`), maps alone.
    - `swapped`, `swapped_chance`, `swapped_gain` (`_swap_tests`), on up to `TESTED_SWAP`
      images of each
      class: where `HOLDS_SHARE` of its class's images hold its content (what three in four
      of them hold at that place, up to mirrors, and other classes' do not:
      `interventions.fixed_content` >= `SWAP_LEVEL`, compared on copies with a `SMALL` px
      side, each other image mirrored to match the cells around the map's peak), over its
      object too, that content exchanged for `SWAPS` other classes' (the median of
      `MEDIAN_POOL` images of each), the rest kept: the share of swaps predicted as the
      other class, beside chance, and how many times as probable they make it as other
      swaps do (its log: what `content_sign` asks).
    - `copied` (`_copies`), on every image: the most by which its class's other images hold
      a colour within a cell of its map's peak, anywhere, more often than other classes'
      images do (`interventions.copied_colours`): near 1 on a copy (a tag, a logo, a
      caption pasted into every photo of a class, wherever it lies), near 0 on objects.
      On up to `TESTED_COPIES` images of each class with `copied` >= `COPY_LEVEL`, its
      pixels of those colours, grown by a pixel (`interventions.copy_pixels`), are taken
      away (`fill`), and so is their shape shifted elsewhere (the control): its class's
      probability then (`copy_removed_p`, `copy_removed_control_p`). (Moved alone into other
      images, a copy turns them too; but so does a red label on red fish, to a network that
      reads colour: the flag asks what taking it away costs, the report's example shows it
      moved.)

    NaN where a test did not run. The images regions are moved into are drawn from up to
    `POOL` images of each other class. `kept`: what the explain pass kept of every image
    (`_Kept`): as the network saw it, averaged down to `_small(size)`, its map's peak, and
    its colours near that peak and anywhere. Forward passes only.
    """
    vocab = list(learn.dls.vocab)
    label = np.asarray(classes)
    N = len(files)
    cell = _cell(centres, size, maps)
    grow = round(cell / 2)
    table = pd.DataFrame(np.nan, index=range(N), columns=list(EVIDENCE))
    peaks = torch.from_numpy(kept[PEAKS])
    table["same_place"] = same_place(peaks, classes, size, cell / 2).numpy()
    rng = np.random.default_rng(seed)
    pool = np.concatenate([rng.permutation(np.flatnonzero(label == c))[:POOL]
                           for c in np.unique(label)]).astype(int)
    others = [pool[label[pool] != c] for c in label]
    if any(len(o) == 0 for o in others):  # one class: nothing to move a region into
        return table, None, None
    pool_x = _decoded(learn, [files[i] for i in pool], bs)
    where = torch.full((N,), -1, dtype=torch.long)
    where[torch.from_numpy(pool)] = torch.arange(len(pool))
    receivers = where[torch.tensor(np.array([rng.choice(o) for o in others]))]  # one each
    target = torch.tensor([vocab.index(c) for c in classes])
    before = np.array([vocab.index(p) for p in predicted])
    group = pd.Series(label if groups is None else list(zip(label, groups)))
    points = maps.reshape(N, -1).max(1) > 0  # an all-zero map points nowhere: no test
    tested = np.sort(np.concatenate([rng.permutation(np.asarray(ix)[points[ix]])[:TESTED]
                                     for ix in group.groupby(group).indices.values()]))
    with_control = np.zeros(N, bool)
    with_control[tested] = group[tested].groupby(group[tested]).cumcount().to_numpy() % 2 == 0
    model, training = learn.model, learn.model.training
    try:
        model.eval()
        small = torch.from_numpy(kept[SMALL_INPUTS])
        held, near = _held(small, label, maps, centres, size, round(cell), seed)
        found = _region_tests(learn, files, tested, with_control, target, before, maps,
                              centres, size, grow, pool_x, receivers, bs, seed)
        columns = [c for c in found.columns if c in EVIDENCE]
        table.loc[found.index, columns] = found[columns]
        swapped, swap = _swap_tests(learn, files, label, held >= SWAP_LEVEL, near, bs, seed)
        table.loc[swapped.index, swapped.columns] = swapped
        table["copied"], colours = _copies(kept[NEAR], kept[HELD], label)
        table.loc[~points, "copied"] = np.nan  # no peak to be near
        candidates = _drawn(rng, (table["copied"] >= COPY_LEVEL).to_numpy(), label,
                            TESTED_COPIES)
        copies = _copy_tests(learn, files, candidates, target, colours, bs, seed)
        table.loc[copies.index, copies.columns] = copies
    finally:
        model.train(training)
    return table, swap, colours


def _placed(maps: np.ndarray, size: tuple[int, int], centres: CellCentres | None) -> Tensor:
    """Maps (n, h, w) placed on the image (`receptive_field.place`), (n, H, W) float32."""
    return place(torch.from_numpy(np.asarray(maps, np.float32)), size, centres)


def _small(size: tuple[int, int]) -> tuple[int, int]:
    """The size of the small copies `fixed_content` compares: `SMALL` px on the shorter side."""
    scale = SMALL / min(size)
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def _held(small: Tensor, label: np.ndarray, maps: np.ndarray, centres: CellCentres | None,
          size: tuple[int, int], grow: int, seed: int) -> tuple[Tensor, Tensor]:
    """How much each pixel of each image's small copy (`small`: (N, C, h, w)) holds its
    class's content (`interventions.fixed_content`, (N, h, w), NaN where not known; each other
    image mirrored to match the cells around the map's peak), and those cells: the pixels
    within a cell of its map's peak, (N, h, w) bool."""
    h, w = small.shape[-2:]
    near = []
    for chunk in np.array_split(maps, max(1, -(-len(maps) // 256))):  # 256 maps at a time
        peak = map_regions(_placed(chunk, size, centres), level=1.0, grow=grow)[:, None]
        near.append(F.adaptive_max_pool2d(peak.float(), (h, w))[:, 0].bool())
    at = torch.cat(near)
    return fixed_content(small.float(), at, label, seed=seed), at


@dataclass
class Swap:
    """What `_swap_tests` exchanges: each class's content, {class: (C, H, W)}, and where each
    image's class holds it, (N, h, w) bool, small."""

    held: dict[str, Tensor]
    holds: Tensor

    def __call__(self, x: Tensor, images: Sequence[int], own: Sequence[str],
                 other: Sequence[str]) -> tuple[Tensor, Tensor]:
        """The `images` (their numbers; `x`: (n, C, H, W), of the classes `own`) with their
        content swapped for the classes `other`'s, and the pixels swapped, (n, H, W) bool."""
        where = F.interpolate(self.holds[list(images)][:, None].float(), size=x.shape[-2:],
                              mode="nearest")[:, 0].bool().to(x.device)
        own_x, other_x = (torch.stack([self.held[c] for c in cs]).to(x.device)
                          for cs in (own, other))
        return swap_content(x, own_x, other_x, where), where


def _swap_tests(learn: Learner, files: Sequence[Path], label: np.ndarray, holds: Tensor,
                near: Tensor, bs: int, seed: int) -> tuple[pd.DataFrame, Swap | None]:
    """On up to `TESTED_SWAP` images of each class, the content its class holds at each place
    exchanged, where `HOLDS_SHARE` of its images hold it (`holds`: (N, h, w) bool, small,
    where each does), for `SWAPS` other classes' (`interventions.swap_content`; what a class
    holds: the median of `MEDIAN_POOL` of its images); the rest is kept. Where its class
    holds it, not where the image does: a watermark over the object, or a mark the object
    covers in part, is swapped whole. `swapped`: the share of its swaps predicted
    as the other class; `swapped_chance`: for the same classes, the share of all swaps not
    of their content predicted as them (what a picture changed that much is called anyway).
    `swapped_gain`: how much more probable the other class is after its swaps than after
    swaps not of that class's content, into images not of that class: the mean difference
    of their log probabilities (each at least `P_FLOOR`); with two classes, the other
    class's images as they are instead.
    NaN where its class holds nothing (no pixel to swap: not tested). On every image,
    `swapped_at_peak`: 1 where its map peaks within a cell (`near`, (N, h, w) bool, small)
    of a pixel the swap changes much (where its class holds its content, and that content
    differs from other classes' by at least `CHANGED` of the most it differs anywhere)."""
    vocab, classes = list(learn.dls.vocab), np.unique(label)
    out = pd.DataFrame(np.nan, index=range(len(files)),
                       columns=["swapped", "swapped_chance", "swapped_gain", "swapped_at_peak"])
    if len(classes) < 2:
        return out, None
    rng = np.random.default_rng(seed + 1)  # apart from `evidence`'s draws
    drawn = {c: rng.permutation(np.flatnonzero(label == c)) for c in classes}
    by_class = {c: holds[torch.from_numpy(label == c)].float().mean(0) >= HOLDS_SHARE
                for c in classes}
    holds = torch.stack([by_class[c] for c in label])
    held = {c: _decoded(learn, [files[i] for i in drawn[c][:MEDIAN_POOL]], bs).median(0).values
            for c in classes}
    swap = Swap(held, holds)
    changed = {}  # per class, (h, w): where its content differs much from other classes'
    for c in classes:
        spread = torch.stack([(held[d] - held[c]).abs().amax(0) for d in classes if d != c])
        spread = F.adaptive_max_pool2d(spread.mean(0)[None, None], holds.shape[-2:])[0, 0]
        changed[c] = spread >= CHANGED * spread.max()
    where_changed = holds & torch.stack([changed[c] for c in label])
    out["swapped_at_peak"] = (where_changed & near).flatten(1).any(1).float().numpy()
    tested = np.sort(np.concatenate([[], *(d[:TESTED_SWAP] for c, d in drawn.items()
                                            if by_class[c].any())]).astype(int))
    if not len(tested):  # no class holds anything: nothing to swap
        return out, swap
    contents = {i: rng.permutation(classes[classes != label[i]])[:SWAPS] for i in tested}
    swaps = [(i, d) for i in tested for d in contents[i]]
    probs, before, done, model = [], [], 0, learn.model
    for (xb,) in learn.dls.test_dl([files[i] for i in tested], bs=bs):
        xb, ix = xb.as_subclass(Tensor), tested[done:done + len(xb)]
        mine = [(k, i, d) for k, i in enumerate(ix) for d in contents[i]]
        k, i, d = (list(t) for t in zip(*mine))
        batch, _ = swap(xb[k], i, list(label[i]), d)
        probs.append(probabilities(model, batch, bs))
        if len(classes) == 2:  # no swap of a third class's content to compare with
            before.append(probabilities(model, xb[k], bs))
        done += len(xb)
    found = pd.DataFrame(swaps, columns=["image", "content"])
    receiver = label[found["image"].to_numpy()]
    log_p = torch.cat(probs).clamp_min(P_FLOOR).log().numpy()  # (swaps, vocab)
    found["said"] = [vocab[p] for p in log_p.argmax(1)]
    found["log_p"] = log_p[np.arange(len(found)), [vocab.index(c) for c in found["content"]]]
    other = {c: ((found["content"] != c) & (receiver != c)).to_numpy() for c in classes}
    called = {c: (found["said"][other[c]] == c).mean() for c in classes}
    if before:  # two classes: no third class's content; the other class's images as they are
        log_p = torch.cat(before).clamp_min(P_FLOOR).log().numpy()
        other = {c: receiver != c for c in classes}
    usual = {c: log_p[other[c], vocab.index(c)].mean() for c in classes}
    found["hit"] = found["said"] == found["content"]
    found["chance"] = found["content"].map(called)
    found["gain"] = found["log_p"] - found["content"].map(usual)
    per = found.groupby("image")[["hit", "chance", "gain"]].mean()
    for column, value in (("swapped", "hit"), ("swapped_chance", "chance"),
                          ("swapped_gain", "gain")):
        out.loc[per.index, column] = per[value].to_numpy(float)
    return out, swap


def _decoded(learn: Learner, files: Sequence[Path], bs: int) -> Tensor:
    """The images as the network sees them, (N, C, H, W), on its device."""
    return torch.cat([xb.as_subclass(Tensor) for (xb,) in learn.dls.test_dl(files, bs=bs)])


def _region_tests(learn, files, tested, with_control, target, before, maps, centres, size,
                  grow, pool_x, receiver, bs, seed) -> pd.DataFrame:
    """The map's region taken away and moved into `receiver`'s image, on the `tested` images,
    and its control on those `with_control` (see `evidence`)."""
    rows, done, model = [], 0, learn.model
    if not len(tested):  # every map all zero; fastai's test_dl cannot be empty
        return pd.DataFrame(columns=["region_area"])
    for (xb,) in learn.dls.test_dl([files[i] for i in tested], bs=bs):
        xb, ix = xb.as_subclass(Tensor), tested[done:done + len(xb)]
        regions = map_regions(_placed(maps[ix], size, centres), grow=grow)
        cls, rec = target[ix].to(xb.device), pool_x[receiver[ix]]
        part = pd.DataFrame({k: v.numpy() for k, v in intervene(
            model, xb, cls, regions.to(xb.device), rec, bs=bs).items()}, index=ix)
        c = torch.from_numpy(with_control[ix])  # the control
        if c.any():
            controls = elsewhere(regions[c], seed=seed + done)
            ctl = intervene(model, xb[c], cls[c], controls.to(xb.device), rec[c], bs=bs)
            for k, v in ctl.items():
                part.loc[ix[c.numpy()], _control(k)] = v.numpy()
        rows.append(part.assign(region_area=regions.flatten(1).float().mean(1).numpy()))
        done += len(xb)
    found = pd.concat(rows) if rows else pd.DataFrame(columns=["removed_pred"])
    for tag in ("", "_control"):  # 1 where taking the region away changed the prediction
        pred = found.pop(f"removed{tag}_pred") if f"removed{tag}_pred" in found else None
        if pred is not None:
            found[f"removed{tag}_changed"] = np.where(pred.isna(), np.nan,
                                                      pred != before[found.index])
    return found


def _drawn(rng: np.random.Generator, where: np.ndarray, label: np.ndarray, k: int
           ) -> np.ndarray:
    """Up to `k` of each class's images where `where` holds, drawn with `rng`, in order."""
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(where & (label == c)))[:k]
                                   for c in np.unique(label)])).astype(int)


def _colours(shown: Tensor, peaks: Tensor, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's colours (`colour_codes` of `shown`, (N, C, H, W) as decoded) within
    `radius` px of its map's peak (`peaks`: (N, 2) pixels) and anywhere, unique: two (N,)
    arrays of arrays."""
    codes, bits = colour_codes(shown), 3 * COPY_BITS
    near, held = np.empty(len(shown), object), np.empty(len(shown), object)
    for k, (code, (y, x)) in enumerate(zip(codes, peaks.long().tolist())):
        near[k] = np.unique(code[max(0, y - radius):y + radius + 1,
                                 max(0, x - radius):x + radius + 1].numpy())
    numbered = torch.unique(torch.arange(len(codes))[:, None, None] << bits | codes)  # one sort
    per_image = torch.bincount(numbered >> bits, minlength=len(codes)).tolist()
    for k, part in enumerate((numbered & ((1 << bits) - 1)).split(per_image)):
        held[k] = part.numpy()
    return near, held


@dataclass
class _Kept:
    """What the audit keeps of each batch of the explain pass (`explain_maps(keep=)`) for its
    interventions: the inputs averaged down to `_small(size)` (`SMALL_INPUTS`), each map's
    peak in pixels (`PEAKS`, (b, 2)) and each image's colours near it and anywhere (`NEAR`,
    `HELD`: `_colours`), and the
    `seconds` that took (the interventions' time, not the explain pass's)."""

    size: tuple[int, int]
    centres: CellCentres | None
    seconds: float = 0.0

    def __call__(self, batch: Tensor, shown: Tensor, maps: list[Tensor]
                 ) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        heat = maps[0].float().cpu().numpy()
        peaks = torch.stack(peak_points(_placed(heat, self.size, self.centres)), dim=1)
        near, held = _colours(shown.cpu(), peaks, round(_cell(self.centres, self.size, heat)))
        small = F.adaptive_avg_pool2d(batch.float(), _small(self.size)).cpu().numpy()
        self.seconds += time.perf_counter() - start
        return {SMALL_INPUTS: small, PEAKS: peaks.numpy(), NEAR: near, HELD: held}


def _copies(near: np.ndarray, held: np.ndarray, label: np.ndarray
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each image's `copied` (see `evidence`; NaN where its class or the rest has no other
    image) and its colours `near` its map's peak that are copies (`copied_colours` >=
    `COPY_LEVEL`); `held`: its colours anywhere (`_colours`)."""
    lifts = copied_colours(near, held, label)
    copied = np.array([np.nan if np.isnan(lift).all() else np.nanmax(lift) for lift in lifts])
    return copied, [c[lift >= COPY_LEVEL] for c, lift in zip(near, lifts)]


def _copy_tests(learn: Learner, files: Sequence[Path], candidates: np.ndarray, target: Tensor,
                colours: Sequence[np.ndarray], bs: int, seed: int) -> pd.DataFrame:
    """Each candidate's pixels of its copied `colours` (`copy_pixels`) taken away
    (`interventions.fill`), and the same shape shifted elsewhere (`interventions.elsewhere`):
    its class's probability then, `copy_removed_p` and `copy_removed_control_p`."""
    rows, done, model = [], 0, learn.model
    if not len(candidates):  # fastai's test_dl cannot be empty
        return pd.DataFrame(columns=["copy_removed_p", "copy_removed_control_p"])
    dl = learn.dls.test_dl([files[i] for i in candidates], bs=bs)
    for (xb,) in dl:
        ix = candidates[done:done + len(xb)]
        part = copy_pixels(dl.decode((xb,))[0].as_subclass(Tensor).cpu(), [colours[i] for i in ix])
        xb, shifted = xb.as_subclass(Tensor), elsewhere(part, seed=seed + done)
        probs = probabilities(model, torch.cat([fill(xb, part.to(xb.device)),
                                                fill(xb, shifted.to(xb.device))]), bs)
        p = probs.gather(1, target[ix].repeat(2)[:, None])[:, 0].view(2, -1)
        rows.append(pd.DataFrame({"copy_removed_p": p[0].numpy(),
                                  "copy_removed_control_p": p[1].numpy()}, index=ix))
        done += len(xb)
    return pd.concat(rows)


def _cell(centres: CellCentres | None, size: tuple[int, int], maps: np.ndarray) -> float:
    """A cell's side in pixels: the layer's stride."""
    return centres.stride[0] if centres is not None else size[0] / maps.shape[-2]


def _control(name: str) -> str:
    """removed_p -> removed_control_p, moved -> moved_control."""
    head, _, tail = name.partition("_")
    return f"{head}_control" + (f"_{tail}" if tail else "")


def _explain_all(learn: Learner, files: list[Path], named: dict, method: str, bs: int,
                 keep: _Kept) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """`explain`'s batches over `files`, the true class's map for the labelled ones (one call
    per class) and the prediction's for the rest: the table with a `label` column, and the
    maps (N, h, w) at the one layer beside what `keep` kept, all in the order of `files`."""
    vocab = list(learn.dls.vocab)
    labels = [class_name(f) if class_name(f) in vocab else "" for f in files]
    tables, parts, order = [], [], []
    for label in sorted(set(labels)):
        pos = [i for i, lab in enumerate(labels) if lab == label]
        cls = vocab.index(label) if label else None
        t, m = explain_maps(learn, [files[i] for i in pos], named, cls, method, bs, keep=keep)
        tables.append(t.assign(label=label))
        parts.append(m)
        order += pos
    back = np.argsort(order)
    table = pd.concat(tables, ignore_index=True).iloc[back].reset_index(drop=True)
    return table, {k: np.concatenate([m[k] for m in parts])[back] for k in parts[0]}


def _clusters(table: pd.DataFrame, features: np.ndarray, max_clusters: int
              ) -> tuple[pd.DataFrame, dict[tuple[str, int], np.ndarray]]:
    """The per-image rows of `clusters.csv` so far (cluster found, nothing flagged yet), and
    each (class, cluster)'s members."""
    labelled = table["label"] != ""
    images = pd.DataFrame({"file": table["file"],
                           "class": table["label"].where(labelled, table["predicted"]),
                           "cluster": 0, "flagged": 0, "why": "", "label": table["label"],
                           "predicted": table["predicted"],
                           "confidence": table["confidence"].round(4),
                           "correct": pd.array(np.where(labelled,
                                                        table["label"] == table["predicted"],
                                                        pd.NA), dtype="Int64")})
    members: dict[tuple[str, int], np.ndarray] = {}
    for cls in sorted(images["class"].unique()):
        pos = np.flatnonzero(images["class"] == cls)
        labels, _ = cluster_maps(features[pos], max_clusters)
        images.loc[pos, "cluster"] = labels
        members |= {(cls, c): pos[labels == c] for c in range(labels.max() + 1)}
    images["cluster_size"] = images.groupby(["class", "cluster"])["file"].transform("size")
    return pd.concat([images, mass_numbers(features).round(4)], axis=1), members


def cluster_numbers(images: pd.DataFrame) -> pd.DataFrame:
    """One row per (class, cluster) of `images` (`Audit.images`): its size, accuracy, and
    the interventions' numbers: `removed` and `moved` (the shares of its images whose
    prediction changed when the region was taken away, and of the images of other classes
    turned into its class when it was moved in), their controls, the median `same_place`,
    `swapped`, `swapped_chance` and `swapped_gain` (its images' content swapped for other
    classes', `evidence`), and `copy_removed_p` and `copy_removed_control_p` (its class's
    probability with its copies, and their controls, taken away). A number whose column
    `images` lacks (an older `clusters.csv`) is NaN: not measured.
    """
    images = images.assign(**{c: np.nan for c in EVIDENCE if c not in images})
    groups = images.groupby(["class", "cluster"], sort=True)
    numbers = groups.agg(size=("file", "size"), moved=("moved", "mean"),
                         moved_control=("moved_control", "mean"),
                         removed=("removed_changed", "mean"),
                         removed_control=("removed_control_changed", "mean"),
                         same_place=("same_place", "median"),
                         swapped=("swapped", "mean"),
                         swapped_chance=("swapped_chance", "mean"),
                         swapped_gain=("swapped_gain", "mean"),
                         copy_removed_p=("copy_removed_p", "mean"),
                         copy_removed_control_p=("copy_removed_control_p", "mean"),
                         accuracy=("correct", lambda c: c.astype(float).mean()),
                         labelled=("correct", "count"))
    return numbers.reset_index()


def content_lift(images: pd.DataFrame) -> pd.Series:
    """Per image, how much its class's content decides: exchanged for another class's where
    its class's images hold it (the rest kept), how much more probable that makes the other
    class than other swaps do (`swapped_gain`: the log of the ratio), averaged over the
    class's tested images. Its probability, not the share of answers it wins: a network
    that never saw a tint, shown a picture tinted all over, is unsure of it, and a tint
    tips it to the class of that colour without making it sure."""
    gain = images.reindex(columns=["swapped_gain"])["swapped_gain"]
    return gain.groupby(images["class"]).transform("mean")


def content_sign(images: pd.DataFrame, rule: dict = RULE) -> pd.Series:
    """Per image, 1 where its class's content decides at least `rule["content"]`
    (`content_lift`: exchanged for another class's, the other class at least e ** that times
    as probable as other swaps make it) and its own map peaks within a cell of what the swap
    changes (`swapped_at_peak`): a backdrop, a tint, a caption, a watermark decides,
    wherever it lies."""
    at_peak = images.reindex(columns=["swapped_at_peak"])["swapped_at_peak"]
    return ((content_lift(images) >= rule["content"]) & (at_peak >= 1)).astype(int)


def copy_lift(images: pd.DataFrame) -> pd.Series:
    """Per image, by how much its class needs its copies (`evidence`: colours its class's
    images hold anywhere, pixel for pixel, and other classes' do not): how much more its
    probability falls when they are taken away than when the same shapes elsewhere are, the
    lower one-sided `COPY_CONFIDENCE` bound of the mean over its class's tested images (a
    class with few proves little); NaN with fewer than two tested. A network that reads a
    copy's colour as its class's (a red label on red fish) is moved by the copy but does not
    need it: the fish still says the class."""
    tested = images.reindex(columns=["copy_removed_p", "copy_removed_control_p"])
    fall = tested["copy_removed_control_p"] - tested["copy_removed_p"]
    by_class = fall.groupby(images["class"])
    n, sd = by_class.transform("count"), by_class.transform("std")
    margin = stats.t.ppf(COPY_CONFIDENCE, (n - 1).where(n > 1)) * sd / np.sqrt(n)
    return by_class.transform("mean") - margin


def copy_sign(images: pd.DataFrame, rule: dict = RULE) -> pd.Series:
    """Per image, 1 where its class needs its copies by at least `rule["copies"]`
    (`copy_lift`) and its own map peaks on a copy (`copied` >= `COPY_LEVEL`): a tag, a logo
    or a caption decides, wherever it lies."""
    copied = images.reindex(columns=["copied"])["copied"]
    return ((copy_lift(images) >= rule["copies"]) & (copied >= COPY_LEVEL)).astype(int)


def content_reason(images: pd.DataFrame, cls: str) -> str:
    """Why the images of `cls` are flagged by `content_sign`."""
    own = images.reindex(columns=["swapped", "swapped_chance", "swapped_gain"])[
        images["class"] == cls].assign(**{"class": cls})
    lift = content_lift(own).iloc[0]
    return (f"Its map peaks on what {cls} images hold there and other classes' do not; "
            f"exchanged for another class's content where at least half the {cls} images hold "
            f"it, the rest kept as it was, {cls} images became that class "
            f"{_percent(own['swapped'].mean())} of the time (chance: "
            f"{_percent(own['swapped_chance'].mean())}), and that class {times(np.exp(lift))} "
            "times as probable as other swaps made it (geometric mean).")


def copy_reason(images: pd.DataFrame, cls: str) -> str:
    """Why the images of `cls` whose maps peak on a copy are flagged (`copy_sign`)."""
    own = images[images["class"] == cls]
    fall = (own["copy_removed_control_p"] - own["copy_removed_p"]).mean()
    return (f"Its map peaks on colours that other {cls} images hold too, pixel for pixel, "
            f"somewhere in the picture, and other classes' do not (a copy in every photo: a "
            f"tag, a logo, a caption); taken away, those pixels lowered the probability of "
            f"{cls} by {fall:.2f} more than the same shapes elsewhere did (at least "
            f"{copy_lift(own).iloc[0]:.2f}, {COPY_CONFIDENCE:.0%} confidence, over "
            f"{own['copy_removed_p'].count()} {cls} images).")


REASONS = {"content": content_reason, "copies": copy_reason}


def apply_rule(images: pd.DataFrame, clusters: pd.DataFrame, rule: dict = RULE
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`images` and `clusters` (`cluster_numbers`) with `flagged` and `why` by `rule`: the
    images whose maps peak on what their class holds there, of a class whose content
    exchanged for others' makes those classes far more probable than other swaps do
    (`content_sign`), or on a copy, of a class that needs its copies (taken away, its
    probability falls beyond their controls: `copy_sign`). A cluster is flagged when any of
    its images is; its `why` gives how many of its images each reason flagged, and `look_for`
    what to look at."""
    images, clusters = images.copy(), clusters.copy()
    signs = {"content": content_sign(images, rule), "copies": copy_sign(images, rule)}
    images["flagged"] = signs["content"] | signs["copies"]
    sign = np.select([v == 1 for v in signs.values()], list(signs), "")
    reasons = {(c, s): REASONS[s](images, c) for c, s in set(zip(images["class"], sign)) if s}
    images["why"] = [reasons.get((c, s), "") for c, s in zip(images["class"], sign)]
    clusters["why"], clusters["look_for"] = "", ""
    for k, row in clusters.iterrows():
        own = (images["class"] == row["class"]) & (images["cluster"] == row["cluster"])
        if (own & (images["flagged"] == 1)).any():
            whys = images["why"][own & (images["flagged"] == 1)].value_counts()  # by sign
            clusters.loc[k, "why"] = " ".join(f"{n} of its {row['size']} images: {why}"
                                              for why, n in whys.items())
            clusters.loc[k, "look_for"] = (
                f"Look at that place in its flagged images: is it the {row['class']} itself, "
                f"or something every {row['class']} photo has there (a mark, a caption, a "
                "border, a watermark, a tint)?")
    clusters["flagged"] = (clusters["why"] != "").astype(int)
    return images, clusters


def _percent(value: float) -> str:
    return "not measured" if np.isnan(value) else f"{value:.0%}"


def _flagged(images: pd.DataFrame, features: np.ndarray,
             members: dict[tuple[str, int], np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`apply_rule` with `RULE`, and each cluster's mean map, members and example (the image
    nearest its mean map) for the report."""
    images, clusters = apply_rule(images, cluster_numbers(images))
    means, pos, examples = [], [], []
    for cls, c in zip(clusters["class"], clusters["cluster"]):
        p = members[(cls, c)]
        mean = features[p].mean(0)
        means.append(mean)
        pos.append(p)
        examples.append(int(p[np.argmin(((features[p] - mean) ** 2).sum(axis=(1, 2)))]))
    clusters["mean_map"], clusters["members"], clusters["example"] = means, pos, examples
    return images, clusters
