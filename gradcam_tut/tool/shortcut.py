"""Does a network use a shortcut? Ask the network, not its map: counterfactual test images.

Mini fish can carry a planted shortcut, a corner mark in the colour of the class
(`MiniFishSpec(mark=1.0)`). Three test sets of new fish (a seed no training uses) ask what the
network does with it: *clean* (no mark), *marked* (the true class's mark) and *swapped* (another
class's mark on every image, which one recorded: `mini_fish.mark_class`). A network that reads
the mark fails on swapped images and follows the mark; one that reads the fish scores about its
clean accuracy on them, and follows the mark by chance only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from fastai.data.transforms import parent_label
from fastai.learner import Learner
from fastcore.foundation import L
from torch import Tensor
from torchvision.models import resnet18, resnet34

from ..cam import Layer
from ..learner import localization_report, mask_dl
from ..metrics import energy_in_mask, pointing_game
from ..receptive_field import CellCentres, cell_centres, place
from .interventions import paste, probabilities
from .layout import image_files
from .mini_fish import MiniFishSpec, make_mini_fish, mark_class, mark_mask

TEST_SPEC = MiniFishSpec(per_class=24, seed=7)  # new fish: the training sets use other seeds


def shortcut_recipe(cuda: bool | None = None) -> dict:
    """`train_fish`'s arguments for every model of notebook 06 and `bench_shortcut.py`: 4 epochs
    of `fit_one_cycle` from random weights, so that all a network knows comes from its data; a
    resnet18 at 64 px on a CPU (under a minute a model on one core), notebook 01's resnet34 at
    128 px on a CUDA GPU."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return {"arch": resnet34 if cuda else resnet18, "size": 128 if cuda else 64, "bs": 16,
            "epochs": 4, "lr": 5e-3, "pretrained": False}


def training_sets(dest: str | Path, per_class: int = 72, seed: int = 42,
                  kind: str = "corner") -> dict[str, Path]:
    """Three training sets of the same fish, drawn once into `dest/<set>-<per_class>-<seed>`
    (`dest/<kind>-<set>-...` for a `kind` of shortcut other than the corner mark, one of
    `mini_fish.SHORTCUT_KINDS`) and reused: "clean" (no mark: the reference), "marked" (every
    image its class's mark: the shortcut) and "shuffled" (every image a random class's mark:
    the shortcut broken in the data)."""
    dest = Path(dest)
    spec = MiniFishSpec(per_class=per_class, seed=seed, mark=1.0, mark_kind=kind)
    sets = {"clean": replace(spec, mark=0.0, mark_kind="corner"), "marked": spec,
            "shuffled": replace(spec, shuffle_marks=True)}
    prefix = "" if kind == "corner" else f"{kind}-"
    return {k: make_mini_fish(dest / f"{prefix * (k != 'clean')}{k}-{per_class}-{seed}", s,
                              progress=False)
            for k, s in sets.items()}


def counterfactual_sets(dest: str | Path, spec: MiniFishSpec = TEST_SPEC,
                        kind: str = "corner") -> dict[str, L]:
    """The image files of three test sets drawn from `spec` under `dest` (drawn once, reused):
    "clean" (no mark), "marked" (each image its class's mark of `kind`) and "swapped" (each
    image another class's mark). The same fish in each: only the mark differs."""
    dest = Path(dest)
    sets = {"clean": replace(spec, mark=0.0),
            "marked": replace(spec, mark=1.0, mark_kind=kind),
            "swapped": replace(spec, mark=1.0, mark_kind=kind, swap_marks=True)}
    prefix = "" if kind == "corner" else f"{kind}-"
    return {k: image_files(make_mini_fish(dest / f"{prefix * (k != 'clean')}{k}", s,
                                          progress=False))
            for k, s in sets.items()}


@torch.no_grad()
def shortcut_scores(learn: Learner, sets: dict[str, L], bs: int = 64) -> dict[str, float]:
    """Accuracy on each test set, and `follows mark`: the share of the swapped images whose
    prediction is the class of their mark rather than their fish (chance: 1/number of classes
    for a network that ignores the mark; a network that reads the fish scores less).

    Args:
        learn: a trained vision Learner (its `dls` give the validation transforms).
        sets: {name: image files} from `counterfactual_sets`; labels from the parent folder.
    """
    vocab, scores = learn.dls.vocab, {}
    for name, files in sets.items():
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(files, bs=bs))
        pred = preds.argmax(dim=1)
        truth = torch.tensor([vocab.o2i[parent_label(f)] for f in files])
        scores[f"{name} accuracy"] = (pred == truth).float().mean().item()
        if name == "swapped":
            marks = torch.tensor([vocab.o2i[mark_class(f)] for f in files])
            scores["follows mark"] = (pred == marks).float().mean().item()
    return scores


@torch.no_grad()
def mark_decides(learn: Learner, sets: dict[str, L], bs: int = 64) -> np.ndarray:
    """Per image of `sets["marked"]`, 1 when its prediction changes with its mark made another
    class's (the same fish in `sets["swapped"]`): the mark decides it, what a map on the mark
    only hints at."""
    marked, swapped = (learn.get_preds(dl=learn.dls.test_dl(sets[k], bs=bs))[0].argmax(dim=1)
                       for k in ("marked", "swapped"))
    return (marked != swapped).float().numpy()


@torch.no_grad()
def mark_moved(learn: Learner, files: Sequence[str | Path], receivers: int = 3,
               seed: int = 0, bs: int = 64) -> float:
    """The mark alone, cut out by its own mask (`mark_mask`, which no audit sees), pasted at
    its place into `receivers` images of other classes among `files` (marked images): the
    share then predicted as the mark's class. The most a region moved can show of the mark;
    a network that never saw the mark gives the control."""
    batches = [(xb.as_subclass(Tensor), yb.as_subclass(Tensor), mb.as_subclass(Tensor).bool())
               for xb, yb, mb in mask_dl(learn, list(files), mark_mask, bs=bs)]
    x, y, marks = (torch.cat(t) for t in zip(*batches))
    return moved_alone(learn.model.eval(), x, y, marks, receivers, seed, bs)


def moved_alone(model: torch.nn.Module, x: Tensor, y: Tensor, regions: Tensor,
                receivers: int = 3, seed: int = 0, bs: int = 64) -> float:
    """`mark_moved` on tensors: each of the images `x` (N, C, H, W) of classes `y` (N,) with
    its `regions` (N, H, W) bool pasted into `receivers` images of other classes; the share
    of those predicted as its class."""
    gen = torch.Generator().manual_seed(seed)
    into = torch.cat([torch.nonzero(y != c)[:, 0][torch.randint(int((y != c).sum()),
                                                                   (receivers,), generator=gen)]
                      for c in y.tolist()])
    pasted = paste(x[into], x.repeat_interleave(receivers, 0),
                   regions.repeat_interleave(receivers, 0))
    said = probabilities(model, pasted, bs).argmax(1)
    return (said == y.repeat_interleave(receivers).cpu()).float().mean().item()


def map_shares(learn: Learner, sets: dict[str, L], layer: Layer = "layer2") -> dict[str, float]:
    """Where the true class's Grad-CAM maps at `layer` lie: on the fish (clean images, GT
    masks) and on the mark (marked images, `mark_mask`). Pointing: the map's peak is inside;
    energy: its share of the map's mass inside (`metrics.localization_report`)."""
    shares: dict[str, float] = {}
    for what, files, get_mask in (("fish", sets["clean"], None),
                                  ("mark", sets["marked"], mark_mask)):
        dl = mask_dl(learn, files) if get_mask is None else mask_dl(learn, files, get_mask)
        row = localization_report(learn, dl, layers=[layer]).iloc[0]
        shares |= {f"{what}: pointing": float(row["pointing"]),
                   f"{what}: energy": float(row["energy"])}
    return shares


def where_maps_lie(learn: Learner, files: Sequence[str | Path], maps: np.ndarray,
                   layer: str, tolerance: float | None = None) -> pd.DataFrame:
    """Per image, where its map at `layer` (N, h, w; as `audit.Audit.maps` holds them) really
    lies, measured with the mark's square (`mini_fish.mark_mask`), which the audit never sees:
    `mark energy`, the share of the map's mass on the mark, `on mark`, 1 when its peak is on
    it, and `mark area`, the mark's share of the image (what a flat map would put on it). The
    maps are placed at their cells' receptive fields, as `map_shares` places them. `near mark`
    is 1 when the peak is within `tolerance` pixels of the mark (default: one cell of `layer`,
    the map's own resolution: a coarse map peaks beside a thin mark as often as on it)."""
    masks = torch.cat([mb.as_subclass(Tensor).cpu()
                       for _, _, mb in mask_dl(learn, list(files), mark_mask, bs=64)])
    size = (masks.shape[-2], masks.shape[-1])
    centres = cell_centres(learn.model, [layer], size)[layer]
    heat = place(torch.from_numpy(np.asarray(maps, np.float32)), size, centres)  # (N, H, W)
    if tolerance is None:  # a resnet's layer: its cells' centres are traced
        tolerance = cast(CellCentres, centres).stride[0]
    return pd.DataFrame({"mark energy": energy_in_mask(heat, masks).numpy(),
                         "on mark": pointing_game(heat, masks).float().numpy(),
                         "near mark": pointing_game(heat, masks, tolerance).float().numpy(),
                         "mark area": masks.bool().flatten(1).float().mean(1).numpy()})
