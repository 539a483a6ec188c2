"""Grad-CAM for many layers from one forward and one backward pass; body layers found by
running the model."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import HookForwardMany

Layer = str | nn.Module
ScoreFn = Callable[[Tensor], Tensor]  # logits (B, C) -> one score per image (B,)
Targets = int | str | Sequence[int | str] | Tensor | ScoreFn | None
Reshape = Callable[[Tensor], Tensor]

# torchvision ResNet children up to the global pool; fastai's `create_body` keeps them unnamed
RESNET_BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_RESNET_TYPES = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] + [nn.Sequential] * 4
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_DEFAULT_SIZE = (224, 224)


def _fastai_body(model: nn.Module) -> nn.Module | None:
    """The body of a fastai vision model (`Sequential(body, head)`), else None."""
    if isinstance(model, nn.Sequential) and len(model) == 2:
        body = model[0]
        if isinstance(body, nn.Sequential) or type(body).__name__ == "TimmBody":
            return body
    return None


def _renames(model: nn.Module) -> dict[str, str]:
    """Path prefixes in a fastai model -> the names the architecture gives them, since fastai's
    `create_body` keeps a torchvision model's children unnamed ("0.7" is resnet's "layer4");
    {} for a plain model, whose names are its paths."""
    body = _fastai_body(model)
    if body is None:
        return {}
    if type(body).__name__ == "TimmBody":
        return {"0.model": ""}
    mods = list(body.children())
    if [type(m) for m in mods] == _RESNET_TYPES:
        return {f"0.{i}": name for i, name in enumerate(RESNET_BODY)}
    if len(mods) == 1 and isinstance(mods[0], nn.Sequential) and len(mods[0]) > 3:
        return {"0.0": "features"}  # densenet, vgg, mobilenet, efficientnet, convnext
    if len(mods) == 2 and type(mods[0]).__name__ == "SimpleStemIN":  # regnet
        return {"0.0": "stem", "0.1": "trunk_output"}
    return {"0": ""}  # anything else: named as in the body, "0", "1", ...


def _display_name(model: nn.Module, path: str) -> str:
    """The name of the module at dotted `path` in `model`, as `body_layers` gives it."""
    for prefix, name in _renames(model).items():
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            return f"{name}.{rest}" if name else rest
        if path == prefix and name:
            return name
    return path


def _module_path(model: nn.Module, name: str) -> str | None:
    """The dotted path in `model` of a name `body_layers` gives, or of a path; None if neither."""
    paths = [name]
    for prefix, new in _renames(model).items():
        if not new:
            paths.insert(0, f"{prefix}.{name}")
        elif name == new or name.startswith(new + "."):
            paths.insert(0, prefix + name[len(new):])
    for path in paths:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def _input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a model declares (a ViT's `image_size`, timm's `img_size` or pretrained
    config), else 224 x 224."""
    for m in model.modules():
        size = getattr(m, "image_size", None)  # torchvision's ViT
        if isinstance(size, int):
            return size, size
        size = getattr(m, "img_size", None)  # timm's patch embeddings
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
    for m in model.modules():  # the config's size, where no patch embedding says otherwise
        cfg = getattr(m, "pretrained_cfg", None)
        if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
            return tuple(cfg["input_size"][1:])
    return _DEFAULT_SIZE


def _map_side(out, reshape: Reshape | None) -> tuple[int, int] | None:
    """(h, w) when `out` is a spatial map (B, C, h, w) with more than one cell, as a
    transformer's tokens are once reshaped; None for anything else (pooled, flat, a tuple)."""
    if not isinstance(out, Tensor):
        return None
    if reshape is channels_last and out.ndim == 4 or reshape is not None and out.ndim == 3:
        try:
            out = reshape(out)
        except (ValueError, RuntimeError):  # tokens that make no square grid: not a map
            return None
    if out.ndim != 4 or out.shape[-2] * out.shape[-1] < 2:
        return None
    return tuple(out.shape[-2:])


_RUNS: WeakKeyDictionary = WeakKeyDictionary()  # model -> (structure, size, what ran)


@torch.no_grad()
def _what_runs(model: nn.Module, size: tuple[int, int]) -> dict[int, tuple]:
    """Run `model` once, in eval mode, on zeros (1, 3, H, W): for each module that runs, by its
    id, (the order it starts in, (h, w) of its output as a map or None). Every submodule's mode is
    restored and every hook removed, also when the forward raises; cached per model and size
    while its modules stay the same."""
    structure = tuple(map(id, model.modules()))
    cached = _RUNS.get(model)
    if cached is not None and cached[:2] == (structure, size):
        return cached[2]
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, *size, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None else torch.float32)
    reshape, seen = default_reshape(model), {}

    def started(m, args):
        seen.setdefault(id(m), [len(seen), None])

    def finished(m, args, out):
        seen[id(m)][1] = _map_side(out, reshape)

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for m in model.modules():
            handles += [m.register_forward_pre_hook(started), m.register_forward_hook(finished)]
        model.eval()(x)
    except Exception as exc:  # any model's own error: say what was run and how to fix it
        raise ValueError(f"body_layers runs the model once on zeros of shape {tuple(x.shape)} "
                         f"to find its layers, and it failed ({type(exc).__name__}: {exc}): "
                         "pass size=(H, W) the model takes, or layers by name") from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    found = {i: tuple(v) for i, v in seen.items()}  # by id: no reference to the model
    _RUNS[model] = (structure, size, found)
    return found


def _ran_children(module: nn.Module, prefix: str, ran: dict) -> list[tuple[str, nn.Module]]:
    """The children of `module` that ran, in the order they started; a container that never
    runs itself (a ModuleList iterated in `forward`) stands for its children that did."""
    out = []
    for name, child in module.named_children():
        if id(child) in ran:
            out.append((prefix + name, child))
        else:
            out += _ran_children(child, f"{prefix}{name}.", ran)
    return sorted(out, key=lambda pc: ran[id(pc[1])][0])


def _spatial_stages(module: nn.Module, prefix: str, ran: dict) -> dict[str, nn.Module]:
    """The children of `module` whose outputs are spatial maps, in running order, up to the
    first global pool, flatten or linear; a non-spatial child (a head, an aux head) is never
    one. One such child alone is looked into; a flat list of single layers (VGG) gives its
    pools."""
    stages = {}
    for path, child in _ran_children(module, prefix, ran):
        if isinstance(child, _HEAD_TYPES) and stages:
            break
        if ran[id(child)][1] is not None and not isinstance(child, _HEAD_TYPES):
            stages[path] = child
    if len(stages) == 1:
        (path, child), = stages.items()
        inner = _spatial_stages(child, path + ".", ran)
        if inner:
            return inner
    if stages and not any(next(m.children(), None) for m in stages.values()):
        pools = {p: m for p, m in stages.items() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))}
        return pools or stages
    return stages


def _known_stages(model: nn.Module) -> dict[str, nn.Module] | None:
    """The stages of a known layout, by path: timm's `feature_info`, regnet's trunk, a
    torchvision ViT's encoder layers, Swin's `features`; None for any other model."""
    body = _fastai_body(model)
    prefix = "0." if body is not None else ""
    if body is not None and type(body).__name__ == "TimmBody":
        body, prefix = body.model, "0.model."
    body = model if body is None else body
    info = getattr(body, "feature_info", None)
    if isinstance(info, list) and info and "module" in info[0]:  # timm
        return {prefix + d["module"]: body.get_submodule(d["module"]) for d in info}
    children = dict(body.named_children())
    if "trunk_output" in children or _renames(model).get("0.1") == "trunk_output":
        stem, trunk = ("stem", "trunk_output") if "trunk_output" in children else ("0", "1")
        return {prefix + stem: children[stem]} | {
            f"{prefix}{trunk}.{n}": m for n, m in children[trunk].named_children()}
    encoder = children.get("encoder")
    if encoder is not None and isinstance(getattr(encoder, "layers", None), nn.Sequential):
        return {f"encoder.layers.{n}": m for n, m in encoder.layers.named_children()}
    if isinstance(children.get("features"), nn.Sequential) and default_reshape(model):  # Swin
        return {f"features.{n}": m for n, m in children["features"].named_children()}
    return None


def body_layers(learn_or_model, size: int | tuple[int, int] | None = None
                ) -> dict[str, nn.Module]:
    """The body's stages in order, by name: the layers whose Grad-CAM maps are worth a look.

    Found by running the model once (as torchcam's `locate_candidate_layer`): a forward on
    zeros (1, 3, H, W), in eval mode, without gradients, records which modules run and the
    shape of their outputs. The stages are the modules whose outputs are spatial maps
    (B, C, h, w) with h * w > 1, in the order they run, before the last of them feeds the
    head: never a module that does not run (an aux head in eval mode, a ModuleList itself),
    never a global pool, a flattened output or the classifier. The run is kept for the model
    while its modules stay the same (a new head runs it again). For a fastai learner or a
    plain model:
    - torchvision resnets: conv1, bn1, relu, maxpool, layer1..layer4;
    - densenet, mobilenet, efficientnet, convnext, swin: the children of `features`
      ("features.denseblock3", "features.7"); vgg: its pools ("features.43");
    - timm models (`vision_learner(dls, "convnext_atto")`): their `feature_info` stages that
      run ("layer4", "stages.3", "blocks.6", ...);
    - regnet: "stem" and "trunk_output.block1".."block4"; torchvision's ViT: its encoder
      layers ("encoder.layers.encoder_layer_11");
    - anything else: the children that give maps before the head ("layers.16" in mnasnet,
      "blocks.3" in maxvit, "inception5b" in googlenet; "0", "1", ... in a fastai body), and
      when one child holds the whole body, that child's children.

    Args:
        learn_or_model: a fastai `Learner` or an `nn.Module` classifier.
        size: (H, W) of the dummy input; default the model's own (a ViT's image size, timm's
            config), else 224.

    Returns:
        {name: module}, in running order; a name works in `grad_cam(..., layers=name)`.

    Raises:
        ValueError: the model fails on the dummy input (the message says to pass `size`).
    """
    model = getattr(learn_or_model, "model", learn_or_model)
    if isinstance(size, int):
        size = (size, size)
    ran = _what_runs(model, tuple(size) if size is not None else _input_size(model))
    known = _known_stages(model)
    if known is not None:  # a known layout, checked against the run
        known = {p: m for p, m in known.items()
                 if id(m) in ran and ran[id(m)][1] is not None and not isinstance(m, _HEAD_TYPES)}
    body = _fastai_body(model)
    stages = known or _spatial_stages(body if body is not None else model,
                                      "0." if body is not None else "", ran)
    return {_display_name(model, path): m for path, m in stages.items()}


def resolve_layers(model: nn.Module,
                   layers: Layer | Sequence[Layer] | None) -> dict[str, nn.Module]:
    """Turn modules and names into an ordered name -> module mapping; None: every body layer.

    A name is one of `body_layers(model)` ("layer4", also "layer4.1.conv2" below it) or a
    dotted path in `model` ("0.7.2"). A module of `model` is named as `body_layers` names it.
    Raises:
        ValueError: no layers (or no body layer found), a name that is neither (the message
            lists the body's names), or the same layer twice.
    """
    if layers is None:
        body = body_layers(model)
        if not body:
            raise ValueError(f"no module of {type(model).__name__} outputs a spatial map "
                             "(B, C, h, w): pass layers= by name (dotted paths from "
                             "model.named_modules()) and a reshape= for other shapes")
        return body
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("layers is empty: pass modules or names, e.g. list(body_layers(model))")
    path_of = {id(m): path for path, m in model.named_modules()}
    out = {}
    for layer in layers:
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"layers holds {layer!r}, a {type(layer).__name__}: pass modules "
                            "or names such as 'layer4' (list(body_layers(model)) lists them)")
        if isinstance(layer, nn.Module):
            path, module = path_of.get(id(layer)), layer
            name = _display_name(model, path) if path else type(layer).__name__
        else:
            path = _module_path(model, layer)
            if path is None:
                raise ValueError(f"no layer named {layer!r}: use one of "
                                 f"{list(body_layers(model))} or a dotted path from "
                                 "model.named_modules()")
            name, module = layer, model.get_submodule(path)
        if name in out or any(m is module for m in out.values()):
            raise ValueError(f"layer {name!r} is asked for twice: pass each layer once")
        out[name] = module
    return out


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


def vit_reshape(tokens: Tensor, prefix: int = 1) -> Tensor:
    """A ViT block's tokens (B, N, C) as a map (B, C, h, w): the first `prefix` tokens (class,
    distillation or register tokens) dropped, the patch tokens laid back on their square grid."""
    patches = tokens[:, prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens after dropping {prefix} do not make "
                         "a square grid: pass prefix=<number of class/register tokens>")
    return patches.transpose(1, 2).reshape(len(tokens), -1, side, side)


def channels_last(t: Tensor) -> Tensor:
    """A (B, H, W, C) output, as Swin's stages give, as (B, C, H, W)."""
    return t.permute(0, 3, 1, 2)


def default_reshape(model: nn.Module) -> Reshape | None:
    """The reshape a transformer needs, chosen by its class name: Swin's channels-last maps,
    a ViT's tokens (with its number of prefix tokens); None for convolutional networks."""
    for m in model.modules():
        name = type(m).__name__
        if name.startswith("Swin"):
            return channels_last
        if name in ("VisionTransformer", "Eva", "Deit", "VisionTransformerDistilled"):
            prefix = getattr(m, "num_prefix_tokens", 1)  # timm; torchvision's has 1 class token
            return lambda t: vit_reshape(t, prefix)
    return None


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
    maps = {m: [] for m in methods}
    for act, grad in zip(stored, grads):  # float32 also under autocast
        act, grad = reshape(act.detach()).float(), reshape(grad).float()  # (B, K, h, w)
        for m in methods:
            maps[m].append(weighted_map(act, grad, m))  # (B, h, w)
    maps = maps[method] if isinstance(method, str) else maps
    return (maps, logits.detach()) if return_logits else maps


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
