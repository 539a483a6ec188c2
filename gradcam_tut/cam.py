"""Grad-CAM for many layers from one forward and one backward pass, and the methods that weigh
the same activations and gradients otherwise; which layers to explain is `layers.py`'s job."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import HookForwardMany
from .layers import RESNET_BODY as RESNET_BODY  # re-exported: layer finding moved to layers.py
from .layers import Layer, Reshape, default_reshape, resolve_layers
from .layers import body_layers as body_layers  # re-exported, as RESNET_BODY
from .layers import channels_last as channels_last  # re-exported
from .layers import vit_reshape as vit_reshape  # re-exported

ScoreFn = Callable[[Tensor], Tensor]  # logits (B, C) -> one score per image (B,)
Targets = int | str | Sequence[int | str] | Tensor | ScoreFn | None


def _index_of(name: str, vocab: Sequence[str] | None) -> int:
    """A class name's index in `vocab`; digits that are not a class name are an index."""
    if vocab is not None and name in vocab:
        return list(vocab).index(name)
    if name.isdigit():
        return int(name)
    if vocab is None:
        raise ValueError(f"targets {name!r} are not class indices: pass ints, or class names "
                         "with vocab=learn.dls.vocab (the index is learn.dls.vocab.o2i[name])")
    raise ValueError(f"no class named {name!r}: use one of {list(vocab)}")


def class_indices(targets: Targets, logits: Tensor,
                  vocab: Sequence[str] | None = None) -> Tensor:
    """The one place targets become classes: one class index per image, shape (B,).

    Args:
        targets: None for each image's prediction; one class for every image (an int, or a
            name in `vocab`); or one per image (a list of B ints or names, a tensor, fastai's
            `TensorCategory` from a batch).
        logits: (B, C), the model's output for the batch.
        vocab: the class names (`learn.dls.vocab`), for targets given by name; a string of
            digits that is not a class name is an index ("3", as typed on a command line).

    Raises:
        ValueError: a bool, a float or a callable (it gives scores, not classes), an unknown
            name, targets of the wrong length or out of range for the number of classes.
    """
    B, C = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    if callable(targets) and not isinstance(targets, Tensor):
        raise ValueError("a callable target gives a score per image, not a class: pass class "
                         "indices or names here (grad_cam takes either)")
    if isinstance(targets, Tensor):
        targets = targets.as_subclass(Tensor)  # fastai's TensorCategory from a batch
    elif isinstance(targets, str):
        targets = _index_of(targets, vocab)
    elif isinstance(targets, Sequence) and any(isinstance(t, str) for t in targets):
        targets = [_index_of(t, vocab) if isinstance(t, str) else t for t in targets]
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
    if idx.ndim > 1:  # (B, 1) has the right count and still is not a target per image
        raise ValueError(f"targets of shape {tuple(idx.shape)}: pass one int for all images, "
                         f"or a flat list of {B} ints, one per image (e.g. .flatten())")
    if idx.shape != (B,):
        raise ValueError(f"got {idx.numel()} targets for a batch of {B} images: "
                         f"pass one int for all, or exactly {B}")
    bad = idx[(idx < 0) | (idx >= C)]
    if len(bad):
        raise ValueError(f"target {bad[0].item()} is out of range: the model has {C} classes, "
                         f"so a target is in 0..{C - 1}")
    return idx


def class_index(vocab: Sequence[str], target: int | str) -> int:
    """`target` (a class name, an index, or digits) as an index into `vocab`, by the one
    resolver `cam.class_indices`: an unknown name is listed, a bool or a float refused."""
    return int(class_indices(target, torch.zeros(1, len(vocab)), vocab)[0])


def target_scores(targets: Targets, logits: Tensor,
                  vocab: Sequence[str] | None = None) -> Tensor:
    """The score per image whose gradient the maps follow, float32 (B,).

    Class targets (anything `class_indices` takes) give each image's logit y_c. A callable
    gives what it makes of the logits, pytorch-grad-cam's convention: `targets(logits)` with
    logits (B, C) returns (B,), e.g. `lambda z: z[:, 3] - z[:, 5]` or `contrast_target(3, 5)`.

    Raises:
        ValueError: as `class_indices`; a callable that does not return B scores.
    """
    if callable(targets) and not isinstance(targets, Tensor):
        scores = targets(logits.float())
        if not isinstance(scores, Tensor) or scores.shape != (len(logits),):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a target callable returned {got}: it must return one score per "
                             f"image, shape ({len(logits)},), e.g. lambda z: z[:, 3]")
        return scores.float()
    return logits.float().gather(1, class_indices(targets, logits, vocab)[:, None])[:, 0]


def contrast_target(targets: Targets, other: Targets,
                    vocab: Sequence[str] | None = None) -> ScoreFn:
    """"Why c rather than d" as a target: logits (B, C) -> y_c - y_d (B,), where c and d are
    any targets `target_scores` takes (grad_cam's `contrast=d` is this)."""
    def difference(logits: Tensor) -> Tensor:
        return target_scores(targets, logits, vocab) - target_scores(other, logits, vocab)

    return difference


# Each method weighs the activations A (B, K, h, w) of a layer by the gradient G = dy/dA of
# the score (same shape); the map is ReLU of the sum over the channels (`weighted_map`). They
# differ only in the weights, as pytorch-grad-cam's classes do, and all equal its maps.


def gradcam(A: Tensor, G: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017, "Grad-CAM: Visual Explanations from Deep
    Networks via Gradient-based Localization"): one weight per channel, its mean gradient.

        alpha_k = mean_{i,j} G_k[i,j]        map = ReLU(sum_k alpha_k * A_k)

    Args:
        A: activations (B, K, h, w).
        G: the gradient of the score with respect to A, (B, K, h, w).

    Returns:
        The weighted activations alpha_k * A_k, (B, K, h, w).
    """
    return G.mean(dim=(2, 3), keepdim=True) * A


def gradcam_pp(A: Tensor, G: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, "Grad-CAM++: Improved Visual Explanations
    for Deep Convolutional Networks"): each pixel's positive gradient weighted by alpha, so
    that several instances of a class each count, where Grad-CAM's mean favours the largest.

        alpha_k[i,j] = G^2 / (2 G^2 + sum_{a,b} A_k[a,b] * G^3)
        w_k = sum_{i,j} alpha_k[i,j] * ReLU(G_k[i,j])        map = ReLU(sum_k w_k * A_k)

    The closed form with Y = exp(y_c) and y_c piecewise linear in A: Y's 2nd and 3rd
    derivatives are Y*G^2 and Y*G^3, so Y cancels in alpha; the factor Y left in the weights
    scales each image's map and is dropped, as pytorch-grad-cam does. Its 1e-6 is kept: where
    gradients are tiny it decides alpha.

    Args:
        A: activations (B, K, h, w).
        G: the gradient of the score with respect to A, (B, K, h, w).

    Returns:
        The weighted activations w_k * A_k, (B, K, h, w).
    """
    g2 = G * G  # where G is 0 alpha is 0 too: 0 / 1e-6, no masking needed
    alpha = g2 / (2 * g2 + A.sum(dim=(2, 3), keepdim=True) * g2 * G + 1e-6)
    return (alpha * G.relu()).sum(dim=(2, 3), keepdim=True) * A


def hirescam(A: Tensor, G: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks"): no average, the gradient times the
    activation element by element, so the map shows where the score really came from.

        map = ReLU(sum_k G_k * A_k)        (captum's gradient x activation, summed)

    Args:
        A: activations (B, K, h, w).
        G: the gradient of the score with respect to A, (B, K, h, w).

    Returns:
        G * A, (B, K, h, w).
    """
    return G * A


def xgradcam(A: Tensor, G: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization
    and Explanation of CNNs"): each channel's gradient averaged with its activations as
    weights, which makes the map satisfy sensitivity and conservation.

        w_k = sum_{i,j} G_k[i,j] * A_k[i,j] / (sum_{i,j} A_k[i,j] + 1e-7)
        map = ReLU(sum_k w_k * A_k)

    Args:
        A: activations (B, K, h, w).
        G: the gradient of the score with respect to A, (B, K, h, w).

    Returns:
        The weighted activations w_k * A_k, (B, K, h, w).
    """
    return ((G * A).sum(dim=(2, 3), keepdim=True)
            / (A.sum(dim=(2, 3), keepdim=True) + 1e-7) * A)


def layercam(A: Tensor, G: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., IEEE TIP 2021, "LayerCAM: Exploring Hierarchical Class
    Activation Maps for Localization"): the positive gradient as a weight at every pixel, so
    that the early layers' fine maps are usable too.

        map = ReLU(sum_k ReLU(G_k) * A_k)

    Args:
        A: activations (B, K, h, w).
        G: the gradient of the score with respect to A, (B, K, h, w).

    Returns:
        ReLU(G) * A, (B, K, h, w).
    """
    return G.relu() * A


# the weightings by name (`grad_cam(..., method=name)`); help(METHODS[name]) gives its paper
METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": gradcam, "gradcam++": gradcam_pp, "hirescam": hirescam,
    "xgradcam": xgradcam, "layercam": layercam,
}


def weighted_map(act: Tensor, grad: Tensor, method: str = "gradcam") -> Tensor:
    """A layer's map (B, h, w) from its activations and gradient (B, K, h, w): ReLU of the
    channels' sum, weighted as `method` says."""
    return F.relu(METHODS[method](act, grad).sum(dim=1))


def _hooked_forward(model: nn.Module, x: Tensor, modules: list[nn.Module]):
    """`model` in eval mode on `x`, keeping the outputs of `modules` in the graph; the mode of
    every submodule is restored exactly (frozen BatchNorms stay in eval), also on an error."""
    modes = {m: m.training for m in model.modules()}
    try:
        with HookForwardMany(modules) as hook:
            logits = model.eval()(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return logits, hook.stored


@torch.enable_grad()  # also inside a user's `torch.no_grad()` block
def grad_cam(model: nn.Module, x: Tensor, layers: Layer | Sequence[Layer],
             targets: Targets = None, contrast: Targets = None,
             method: str | Sequence[str] = "gradcam", reshape: Reshape | None = None,
             vocab: Sequence[str] | None = None, return_logits: bool = False
             ) -> list[Tensor] | dict[str, list[Tensor]] | tuple:
    """Grad-CAM maps for several layers from ONE forward and ONE backward pass.

    For a layer with activations A (B, K, h, w) and class score y_c (the logit):
        alpha_k = mean_{i,j} dy_c/dA_k[i,j]        map = ReLU(sum_k alpha_k * A_k)
    Equal to captum's `LayerGradCam(model, layer).attribute(x, targets, relu_attributions=True)`.
    With `contrast` the score is y_c - y_d, "why c rather than d": the map shows where the
    evidence for c exceeds that for d (the same pass; the gradient is linear in the score).
    `method` picks another weighting of the same activations and gradients (`METHODS`):
    "gradcam++", "hirescam", "xgradcam" or "layercam", equal to pytorch-grad-cam's; several
    methods come from the same single pass.
    The model runs in eval mode, its mode is restored afterwards, every hook is removed (also
    when the forward raises) and parameters' `.grad` is left untouched.

    Args:
        model: a classifier returning logits (B, C); fastai's `learn.model`.
        x: a batch (B, 3, H, W) on the model's device; fastai's `TensorImage` too.
        layers: modules of `model`, or names from `body_layers(model)` or dotted paths.
        targets: None for each image's predicted class, one int (or a name of `vocab`) for
            every image, or B of them (a list, a tensor, or fastai's `TensorCategory` from
            `dls.one_batch()`); or a callable on the logits, (B, C) -> one score per image
            (B,), as pytorch-grad-cam's targets (`target_scores`).
        contrast: the class d to contrast with, in the same forms; None for plain Grad-CAM.
            The same as targets=contrast_target(targets, contrast).
        method: a key of `METHODS`, or a sequence of them.
        reshape: turns a layer's output into (B, C, h, w), applied to activations and
            gradients alike, as pytorch-grad-cam's `reshape_transform`: `vit_reshape` for a
            ViT's tokens, `channels_last` for Swin; None picks it from the model
            (`default_reshape`).
        vocab: the class names (`learn.dls.vocab`), for targets given by name.
        return_logits: also return the logits (B, C) of this pass, detached (no second
            forward to get the predictions).

    Returns:
        One float32 map per layer, plain `torch.Tensor` (B, h_l, w_l), on x's device; not
        normalised or upsampled. For a sequence of methods: {method: that list}. With
        `return_logits`: (those maps, logits).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x is a {type(x).__name__}, not a torch tensor: pass "
                        "torch.as_tensor(x) (a batch (B, C, H, W), normalised as in training)")
    if x.ndim == 4 and len(x) == 0:
        raise ValueError("x is an empty batch (0 images): pass at least one image")
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
    methods = [method] if isinstance(method, str) else list(method)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method {m!r} is not one of {list(METHODS)}")
    x = x.as_subclass(Tensor)  # a plain tensor: fastai's types would follow into every map
    named = resolve_layers(model, layers)
    reshape = reshape or default_reshape(model) or (lambda t: t)
    logits, stored = _hooked_forward(model, x, list(named.values()))
    for name, out in zip(named, stored):
        if out is None:
            raise ValueError(f"layer {name!r} did not run in the forward pass: "
                             "pick a layer of this model, e.g. from body_layers(model)")
        if reshape(out).ndim != 4:
            raise ValueError(f"layer {name!r} outputs {tuple(out.shape)}, not (B, C, h, w): "
                             "Grad-CAM needs a spatial layer, e.g. from body_layers(model), not "
                             "one of the head; for tokens (B, N, C) pass reshape=vit_reshape, "
                             "for (B, H, W, C) reshape=channels_last")
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"model returned {got}; expected logits (B, C): wrap the model so "
                         "that it returns the class scores as one tensor")
    if contrast is not None:
        targets = contrast_target(targets, contrast, vocab)
    score = target_scores(targets, logits, vocab).sum()  # images are independent: sum is fine
    grads = torch.autograd.grad(score, stored)  # no parameter .grad is touched
    maps: dict[str, list[Tensor]] = {m: [] for m in methods}
    for act, grad in zip(stored, grads):  # float32 also under autocast
        act, grad = reshape(act.detach()).float(), reshape(grad).float()  # (B, K, h, w)
        for m in methods:
            maps[m].append(weighted_map(act, grad, m))  # (B, h, w)
    out = maps[method] if isinstance(method, str) else maps
    return (out, logits.detach()) if return_logits else out


@torch.no_grad()
def class_activation_map(model: nn.Module, x: Tensor, layer: Layer, linear: nn.Linear,
                         targets: Targets = None) -> Tensor:
    """Plain CAM (Zhou et al., 2016), (B, h, w): the class's row of `linear`'s weights over the
    channels of `layer`'s activations, sum_k w_ck A_k, no ReLU, no gradient.

    It means something only when `linear` comes straight after a global average pool of
    `layer` (a torchvision resnet's `fc`; fastai's `create_head(nf, n, lin_ftrs=[],
    concat_pool=False, first_bn=False)`). Then Grad-CAM at `layer` is ReLU(CAM) / (h * w):
    the gradient of y_c is w_ck / (h * w) at every pixel.
    """
    logits, (act,) = _hooked_forward(model, x.as_subclass(Tensor),
                                     list(resolve_layers(model, layer).values()))
    idx = class_indices(targets, logits)
    return torch.einsum("bk,bkhw->bhw", linear.weight[idx].float(), act.float())


def upsample(maps: Tensor | Sequence[Tensor], size: int | Sequence[int],
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
