"""Where a layer's cells sit on the image: the centres of their receptive fields, and maps
upsampled so that each cell's value lands there.

A cell (i, j) of a layer with stride S sees a patch of the input centred at pixel
(offset + S * i, offset + S * j). Bilinear upsampling (`F.interpolate`, align_corners=False,
as pytorch-grad-cam's cv2.resize and captum do it) puts cell i's value at the middle of the
pixel block it covers, (S - 1) / 2 + S * i. For networks whose convolutions and pools pad
(k - 1) / 2 ("same" padding: resnets, efficientnets) the receptive field is centred at S * i,
and the interpolated map is drawn (S - 1) / 2 pixels below and right of where the layer saw
it: 15.5 px for a resnet's `layer4`. Networks without padding in their strided layers (VGG's
pools, a patchify stem) are centred at the block's middle, where interpolation puts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .cam import upsample
from .hooks import HookEach
from .layers import Layer, resolve_layers


@dataclass(frozen=True)
class CellCentres:
    """Cell (i, j) of a layer's map is centred at input pixel (offset[0] + stride[0] * i,
    offset[1] + stride[1] * j), pixel centres at integers."""

    stride: tuple[float, float]
    offset: tuple[float, float]


SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _shift(m: nn.Module, size_in: tuple[int, int]) -> tuple[tuple, tuple]:
    """A conv's or pool's stride per axis and where its output cell 0 is centred on its input:
    d * (k - 1) / 2 - padding (TensorFlow's "same" padding, as timm's *Same layers compute it
    at run time, puts the odd pixel after)."""
    k, s = _pair(m.kernel_size), _pair(m.stride)
    d = _pair(getattr(m, "dilation", 1))
    pad = getattr(m, "padding", 0)
    if type(m).__name__.endswith("Same") or pad == "same":
        total = [max((-(-n // si) - 1) * si + (ki - 1) * di + 1 - n, 0)
                 for n, ki, si, di in zip(size_in, k, s, d)]
        pad = [t // 2 for t in total]
    elif pad == "valid":
        pad = 0
    p = _pair(pad)
    return s, tuple(di * (ki - 1) / 2 - pi for ki, di, pi in zip(k, d, p))


class _Trace:
    """Follow the chain of strided layers through one forward: each conv or pool whose input has
    the size the chain has reached moves the chain on (a parallel branch, such as a resnet's
    downsample, sees an input of another size and is skipped; for "same"-padded networks every
    branch maps cells to the same centres). `step` hooks the convs and pools, `snapshot(name)`
    each layer, after them where a layer is itself one."""

    def __init__(self, size: tuple[int, int]):
        self.stride, self.offset, self.size = [1.0, 1.0], [0.0, 0.0], tuple(size)
        self.found: dict[str, CellCentres | None] = {}

    def step(self, module: nn.Module, inputs, output: Tensor) -> None:
        size_in = tuple(inputs[0].shape[-2:])
        if size_in != self.size:
            return
        s, o = _shift(module, size_in)
        for a in range(2):
            self.offset[a] += self.stride[a] * o[a]
            self.stride[a] *= s[a]
        self.size = tuple(output.shape[-2:])

    def snapshot(self, name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            spatial = isinstance(output, Tensor) and output.ndim == 4
            if spatial and tuple(output.shape[-2:]) == self.size:
                self.found[name] = CellCentres((self.stride[0], self.stride[1]),
                                               (self.offset[0], self.offset[1]))
            else:  # tokens, channels last, a stride no conv or pool shows: not traced
                self.found[name] = None
        return hook


@torch.no_grad()
def cell_centres(model: nn.Module, layers: Layer | Sequence[Layer] | None,
                 size: tuple[int, int] | int) -> dict[str, CellCentres | None]:
    """The centres of each layer's cells on an input of `size` (H, W), from one forward of a
    zero image: the product of the strides, and the offsets d(k-1)/2 - padding of the
    convolutions and pools on the way, scaled by the stride before each. None for a layer
    whose output the chain of convolutions and pools does not explain (a transformer's tokens,
    Swin's channels-last maps, a stride made by reshaping): `place` interpolates those.

    Args:
        layers: modules or names, as for `grad_cam`; None: `body_layers(model)`.
        size: the input's (H, W), or one int for a square input.
    """
    size = _pair(size)
    named = resolve_layers(model, layers)
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, *size, device=getattr(param, "device", None),
                    dtype=getattr(param, "dtype", None))
    modes = {m: m.training for m in model.modules()}
    trace = _Trace(size)
    try:
        with ExitStack() as hooks:
            hooks.enter_context(HookEach([m for m in model.modules() if isinstance(m, SPATIAL)],
                                         forward=trace.step))
            for name, m in named.items():
                hooks.enter_context(HookEach([m], forward=trace.snapshot(name)))
            model.eval()(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return {name: trace.found[name] for name in named}


def interpolation_matrix(n_out: int, n_in: int, stride: float, offset: float) -> Tensor:
    """(n_out, n_in) weights that linearly interpolate n_in cells centred at offset + stride*i
    onto n_out pixels; pixels beyond the first or last cell centre take that cell's value."""
    u = ((torch.arange(n_out) - offset) / stride).clamp(0, n_in - 1)  # in cell units
    i0 = u.floor().long().clamp(max=max(n_in - 2, 0))
    frac = (u - i0) if n_in > 1 else torch.zeros(n_out)
    weights = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    weights[rows, i0] = 1 - frac
    weights[rows, (i0 + 1).clamp(max=n_in - 1)] += frac
    return weights


def place(maps: Tensor | Sequence[Tensor], size: tuple[int, int],
          centres: CellCentres | Sequence[CellCentres | None] | None) -> Tensor:
    """Upsample maps with each cell's value at its receptive field's centre, bilinear in
    between; plain interpolation (`cam.upsample`) where a map's centres are None. With
    stride H/h and offset (stride - 1)/2 this equals `F.interpolate(..., "bilinear",
    align_corners=False)`.

    Args:
        maps: one map batch (B, h, w) with one `CellCentres`, or a sequence of L of them (one
            per layer) with a sequence of L `CellCentres` (or None).
        size: the image's (H, W).

    Returns:
        (B, H, W) for one map batch, (B, L, H, W) for a sequence.
    """
    if not isinstance(maps, Tensor):
        per_map = [None] * len(maps) if centres is None else centres
        per_map = cast(Sequence[CellCentres | None], per_map)  # maps in a sequence: centres too
        return torch.stack([place(m, size, c) for m, c in zip(maps, per_map)], dim=1)
    if centres is None:
        return upsample(maps, size)
    (H, W), (h, w) = size, maps.shape[-2:]
    one = cast(CellCentres, centres)  # one map batch: one CellCentres
    ry = interpolation_matrix(H, h, one.stride[0], one.offset[0]).to(maps)
    rx = interpolation_matrix(W, w, one.stride[1], one.offset[1]).to(maps)
    return torch.einsum("Yh,bhw,Xw->bYX", ry, maps, rx)
