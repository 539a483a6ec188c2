"""Which layers of a classifier to explain, for any architecture: `body_layers` names the stages
of a body (found by running the model once, never the pool or the classifier), `resolve_layers`
turns names and modules into `{name: module}`, and the reshapes lay a transformer's outputs out as
maps (B, C, h, w). Torch only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from .hooks import HookEach

Layer = str | nn.Module
Reshape = Callable[[Tensor], Tensor]  # a layer's output -> (B, C, h, w)


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
    reshape = default_reshape(model)
    seen: dict[int, list] = {}  # id -> [start order, (h, w) or None]

    def started(m, args):
        seen.setdefault(id(m), [len(seen), None])

    def finished(m, args, out):
        seen[id(m)][1] = _map_side(out, reshape)

    modes = {m: m.training for m in model.modules()}
    try:
        with HookEach(model.modules(), forward=finished, pre=started):
            model.eval()(x)
    except Exception as exc:  # any model's own error: say what was run and how to fix it
        raise ValueError(f"body_layers runs the model once on zeros of shape {tuple(x.shape)} "
                         f"to find its layers, and it failed ({type(exc).__name__}: {exc}): "
                         "pass size=(H, W) the model takes, or layers by name") from exc
    finally:
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
    stages: dict[str, nn.Module] = {}
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
        pools: dict[str, nn.Module] = {
            p: m for p, m in stages.items() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))}
        return pools or stages
    return stages


def _known_stages(model: nn.Module) -> dict[str, nn.Module] | None:
    """The stages of a known layout, by path: timm's `feature_info`, regnet's trunk, a
    torchvision ViT's encoder layers, Swin's `features`; None for any other model."""
    body = _fastai_body(model)
    prefix = "0." if body is not None else ""
    if body is not None and type(body).__name__ == "TimmBody":
        body, prefix = body.get_submodule("model"), "0.model."
    body = model if body is None else body
    info = getattr(body, "feature_info", None)
    if isinstance(info, list) and info and "module" in info[0]:  # timm
        return {prefix + d["module"]: body.get_submodule(d["module"]) for d in info}
    children = dict(body.named_children())
    if "trunk_output" in children or _renames(model).get("0.1") == "trunk_output":
        stem, trunk = ("stem", "trunk_output") if "trunk_output" in children else ("0", "1")
        return {prefix + stem: children[stem]} | {
            f"{prefix}{trunk}.{n}": m for n, m in children[trunk].named_children()}
    blocks = getattr(children.get("encoder"), "layers", None)  # torchvision's ViT
    if isinstance(blocks, nn.Sequential):
        return {f"encoder.layers.{n}": m for n, m in blocks.named_children()}
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
    ran = _what_runs(model, (size[0], size[1]) if size is not None else _input_size(model))
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
    out: dict[str, nn.Module] = {}
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
