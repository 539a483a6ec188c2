"""A sanity check for saliency maps (Adebayo et al., 2018, model-parameter randomisation):
re-initialise the network from the top, step by step, and see whether the maps change. Maps
that stay the same do not depend on what the network learned: they show the image, not the
model."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from .cam import Targets, class_indices, grad_cam
from .layers import Layer, body_layers, resolve_layers
from .receptive_field import cell_centres, place


def randomization_steps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """What to re-initialise, top first: a fastai model's head, then its body layers that have
    weights, last to first (for a plain model, its children with weights, last to first)."""
    if isinstance(model, nn.Sequential) and len(model) == 2:  # fastai: (body, head)
        steps = [("head", model[1])] + list(reversed(body_layers(model).items()))
    else:
        steps = list(reversed(list(model.named_children())))
    return [(name, m) for name, m in steps if any(True for _ in m.parameters())]


def randomized(model: nn.Module, what: str = "all", seed: int = 0) -> nn.Module:
    """A copy of `model` with new random weights: "all" (the same architecture, untrained: the
    baseline of a network that learned nothing) or "head" (a fastai model's head, or a plain
    model's last child with weights: the first step of `cascading_randomization`)."""
    if what not in ("all", "head"):
        raise ValueError(f"what={what!r}: randomise 'all' the weights or the 'head'")
    copy_ = copy.deepcopy(model)
    torch.manual_seed(seed)
    _reinit(copy_ if what == "all" else randomization_steps(copy_)[0][1])
    return copy_


def _reinit(module: nn.Module) -> None:
    for m in module.modules():
        for reset in ("reset_parameters", "reset_running_stats"):
            if hasattr(m, reset):
                getattr(m, reset)()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two maps (ties averaged); 0 when either is constant."""
    a, b = a.flatten().cpu(), b.flatten().cpu()
    if a.min() == a.max() or b.min() == b.max():  # an all-zero map: no ranking to compare
        return 0.0
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def _cascade(model: nn.Module, x: Tensor, layers, targets: Targets, seed: int, method: str):
    """Yield (step, maps of every layer placed on the image at their receptive fields' centres,
    (B, H, W) each) for the trained model, then after each re-initialisation, top first and
    cumulatively, on a copy."""
    x = x.as_subclass(Tensor)
    work = copy.deepcopy(model)  # the model, its weights and its mode stay as they were
    idx = class_indices(targets, work.eval()(x))
    names = list(resolve_layers(model, layers))  # a module of `model` by its name in `work`
    size = (x.shape[-2], x.shape[-1])
    centres = cell_centres(work, names, size)  # each cell at its receptive field
    torch.manual_seed(seed)

    def maps() -> list[Tensor]:  # every layer from one grad_cam pass, placed on the image
        cams = cast(list[Tensor], grad_cam(work, x, names, idx, method=method))
        return [place(cam, size, centres[n]) for n, cam in zip(names, cams)]

    yield "trained", names, maps()
    for step, module in randomization_steps(work):
        _reinit(module)
        yield step, names, maps()


@torch.no_grad()
def cascading_randomization(model: nn.Module, x: Tensor, layer: Layer = "layer4",
                            targets: Targets = None, seed: int = 0, method: str = "gradcam"
                            ) -> tuple[pd.DataFrame, dict[str, Tensor]]:
    """Grad-CAM maps at `layer` as the layers above it and then below it are re-initialised,
    top first and cumulatively, on a copy of `model` (the model itself is left as it was).

    The targets stay those of the trained model (its predictions by default). Each map is
    placed on the image (each cell at its receptive field's centre) and compared with the
    trained model's by Spearman rank correlation.

    Returns:
        A DataFrame with one row per step ("trained", "head", "layer4", ...): the mean and
        the smallest correlation over the images; and the maps per step, (B, H, W).
    """
    found, rows = {}, []
    for step, _, (m,) in _cascade(model, x, layer, targets, seed, method):
        found[step] = m
        rhos = [spearman(a, b) for a, b in zip(found["trained"], m)]
        rows.append({"step": step, "spearman": sum(rhos) / len(rhos), "spearman_min": min(rhos)})
    return pd.DataFrame(rows).set_index("step"), found


@torch.no_grad()
def randomization_by_layer(model: nn.Module, x: Tensor, layers: Sequence[Layer] | None = None,
                           targets: Targets = None, seed: int = 0,
                           method: str = "gradcam") -> pd.DataFrame:
    """`cascading_randomization` for every layer at once (one `grad_cam` pass per step): the
    mean Spearman correlation with the trained model's maps, one row per step, one column per
    layer (default every layer of `body_layers(model)`)."""
    trained, rows = None, {}
    for step, names, maps in _cascade(model, x, layers, targets, seed, method):
        trained = maps if trained is None else trained
        rows[step] = {name: sum(spearman(a, b) for a, b in zip(t, m)) / len(m)
                      for name, t, m in zip(names, trained, maps)}
    return pd.DataFrame(rows).T.rename_axis("step")
