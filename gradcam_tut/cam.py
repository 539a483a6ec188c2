"""Grad-CAM for many layers from one forward and one backward pass; body layers by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import HookForwardMany

Layer = str | nn.Module
Targets = int | Sequence[int] | Tensor | None

# torchvision ResNet children up to the global pool; fastai's `create_body` keeps them unnamed
RESNET_BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_RESNET_TYPES = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] + [nn.Sequential] * 4
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)


def body_layers(learn_or_model) -> dict[str, nn.Module]:
    """The body's children in order, by name: the layers whose Grad-CAM maps are worth a look.

    For a fastai vision learner (`Sequential(body, head)`) on a resnet these are conv1, bn1,
    relu, maxpool, layer1..layer4; other fastai bodies are named "0", "1", .... For a plain
    model (a torchvision resnet) they are its named children before the global pool.
    """
    model = getattr(learn_or_model, "model", learn_or_model)
    first = next(iter(model.children()), None)
    if isinstance(model, nn.Sequential) and isinstance(first, nn.Sequential):  # fastai
        mods = list(first.children())
        names = (RESNET_BODY if [type(m) for m in mods] == _RESNET_TYPES
                 else [str(i) for i in range(len(mods))])
        return dict(zip(names, mods))
    layers = {}
    for name, m in model.named_children():
        if isinstance(m, _HEAD_TYPES):
            break
        layers[name] = m
    return layers


def resolve_layers(model: nn.Module,
                   layers: Layer | Sequence[Layer] | None) -> dict[str, nn.Module]:
    """Turn modules and names into an ordered name -> module mapping; None: every body layer.

    A name is one of `body_layers(model)` ("layer4") or a dotted path in `model` ("0.7.2").
    Raises:
        ValueError: no layers, a name that is neither (the message lists the body's names), or
            the same layer twice.
    """
    if layers is None:
        return body_layers(model)
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("layers is empty: pass modules or names, e.g. list(body_layers(model))")
    body = body_layers(model)
    path_of = {id(m): path for path, m in model.named_modules()}
    name_of = {id(m): name for name, m in body.items()}
    out = {}
    for layer in layers:
        if isinstance(layer, nn.Module):
            name, module = name_of.get(id(layer)) or path_of.get(id(layer)), layer
            name = name or type(layer).__name__
        elif layer in body:
            name, module = layer, body[layer]
        else:
            try:
                name, module = layer, model.get_submodule(layer)
            except AttributeError as exc:
                raise ValueError(f"no layer named {layer!r}: use one of {list(body)} "
                                 "or a dotted path from model.named_modules()") from exc
        if name in out or any(m is module for m in out.values()):
            raise ValueError(f"layer {name!r} is asked for twice: pass each layer once")
        out[name] = module
    return out


def class_indices(targets: Targets, logits: Tensor) -> Tensor:
    """One class index per image, shape (B,): the prediction when `targets` is None.

    Raises:
        ValueError: targets of the wrong length or out of range for the number of classes.
    """
    B, C = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    if isinstance(targets, Tensor):
        targets = targets.as_subclass(Tensor)  # fastai's TensorCategory from a batch
    try:
        idx = torch.as_tensor(targets, device=logits.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"targets {targets!r} are not class indices: pass ints; for a class "
                         "name use learn.dls.vocab.o2i[name]") from exc
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"targets must be integer class indices, got {idx.dtype}: "
                         "for a class name use learn.dls.vocab.o2i[name]")
    idx = idx.long()
    if idx.ndim == 0:
        idx = idx.expand(B)
    if idx.shape != (B,):
        raise ValueError(f"got {idx.numel()} targets for a batch of {B} images: "
                         f"pass one int for all, or exactly {B}")
    bad = idx[(idx < 0) | (idx >= C)]
    if len(bad):
        raise ValueError(f"target {bad[0].item()} is out of range: the model has {C} classes, "
                         f"so a target is in 0..{C - 1}")
    return idx


@torch.enable_grad()  # also inside a user's `torch.no_grad()` block
def grad_cam(model: nn.Module, x: Tensor, layers: Layer | Sequence[Layer],
             targets: Targets = None, contrast: Targets = None) -> list[Tensor]:
    """Grad-CAM maps for several layers from ONE forward and ONE backward pass.

    For a layer with activations A (B, K, h, w) and class score y_c (the logit):
        alpha_k = mean_{i,j} dy_c/dA_k[i,j]        map = ReLU(sum_k alpha_k * A_k)
    Equal to captum's `LayerGradCam(model, layer).attribute(x, targets, relu_attributions=True)`.
    With `contrast` the score is y_c - y_d, "why c rather than d": the map shows where the
    evidence for c exceeds that for d (the same pass; the gradient is linear in the score).
    The model runs in eval mode, its mode is restored afterwards, every hook is removed (also
    when the forward raises) and parameters' `.grad` is left untouched.

    Args:
        model: a classifier returning logits (B, C); fastai's `learn.model`.
        x: a batch (B, 3, H, W) on the model's device; fastai's `TensorImage` too.
        layers: modules of `model`, or names from `body_layers(model)` or dotted paths.
        targets: None for each image's predicted class, one int for every image, or B ints
            (a list, a tensor, or fastai's `TensorCategory` from `dls.one_batch()`).
        contrast: the class d to contrast with, in the same forms; None for plain Grad-CAM.

    Returns:
        One float32 map per layer, plain `torch.Tensor` (B, h_l, w_l), on x's device; not
        normalised or upsampled.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be a batch (B, C, H, W), got shape {tuple(x.shape)}: "
                         "add the batch dimension with x[None]")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("grad_cam needs autograd, which torch.inference_mode() switches "
                           "off: call it outside that block (torch.no_grad() is fine)")
    param = next(model.parameters(), None)
    if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled():
        raise ValueError(f"x is {x.dtype} but the model's weights are {param.dtype}: pass "
                         f"x.to({param.dtype}) (images as floats, normalised as in training)")
    x = x.as_subclass(Tensor)  # a plain tensor: fastai's types would follow into every map
    named = resolve_layers(model, layers)
    modes = {m: m.training for m in model.modules()}  # each one: frozen BatchNorms included
    try:
        with HookForwardMany(list(named.values())) as hook:
            logits = model.eval()(x)
    finally:
        for m, training in modes.items():
            m.training = training
    for name, out in zip(named, hook.stored):
        if out is None:
            raise ValueError(f"layer {name!r} did not run in the forward pass: "
                             "pick a layer of this model, e.g. from body_layers(model)")
        if out.ndim != 4:
            raise ValueError(f"layer {name!r} outputs shape {tuple(out.shape)}, not "
                             "(B, C, h, w): Grad-CAM needs a spatial layer, e.g. from "
                             "body_layers(model), not one of the head")
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model returned {got}; expected logits (B, C): wrap the model so "
                         "that it returns the class scores as one tensor")
    idx = class_indices(targets, logits)
    score = logits.float().gather(1, idx[:, None]).sum()  # images are independent: sum is fine
    if contrast is not None:
        score = score - logits.float().gather(1, class_indices(contrast, logits)[:, None]).sum()
    grads = torch.autograd.grad(score, hook.stored)  # no parameter .grad is touched
    maps = []
    for act, grad in zip(hook.stored, grads):
        act, grad = act.detach().float(), grad.float()  # float32 also under autocast
        alpha = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        maps.append(F.relu((alpha * act).sum(dim=1)))  # (B, h, w)
    return maps


def upsample(maps: Tensor | Sequence[Tensor], size: int | tuple[int, int],
             mode: str = "bilinear") -> Tensor:
    """Resize maps to `size` (H, W) with `F.interpolate`.

    Args:
        maps: one map batch (B, h, w), or a sequence of L of them, one per layer.
    Returns:
        (B, H, W) for one map batch, (B, L, H, W) for a sequence.
    """
    def resize(m: Tensor) -> Tensor:
        corners = False if mode in ("bilinear", "bicubic") else None
        return F.interpolate(m[:, None], size=size, mode=mode, align_corners=corners)[:, 0]

    if isinstance(maps, Tensor):
        return resize(maps)
    return torch.stack([resize(m) for m in maps], dim=1)


def normalize_maps(maps: Tensor, shared_scale: bool = False, eps: float = 1e-12) -> Tensor:
    """Scale maps into [0, 1] by dividing by their max, so 0 still means "no evidence".

    Args:
        maps: (..., H, W); (B, L, H, W) from `upsample` for L layers.
        shared_scale: one max per image across the layers (dim -3) instead of one per map.
    All-zero maps stay zero (no NaN).
    """
    dims = (-3, -2, -1) if shared_scale else (-2, -1)
    return maps / maps.amax(dim=dims, keepdim=True).clamp_min(eps)
