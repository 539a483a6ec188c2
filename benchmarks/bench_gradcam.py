"""Per-layer Grad-CAM for all 8 resnet34 body layers: one pass against one pass per layer.

    python benchmarks/bench_gradcam.py [--batch 8] [--size 224] [--repeats 3]

Prints the median seconds of each way, measured side by side in this run, and their ratios:
(a) one forward + backward, (b) the source article's loop (hooks on one layer, one forward and
backward per layer), (c) pytorch-grad-cam's GradCAM once per layer, (d) `grad_cam` over all
layers in one pass. With --methods also all five CAM methods for all 8 layers: (e) `grad_cam`
in one pass, (f) pytorch-grad-cam once per method and layer (40 passes). With --guidance, one
training epoch of resnet34 on the mini fish set at 128 px (bs 16) with `MaskGuidance` at
layer4 against the same epoch without its penalty.
"""

import argparse
import statistics
import time

import torch
import torchvision
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from gradcam_tut import HookBwd, HookForward, body_layers, grad_cam
from gradcam_tut.cam import METHODS

PGC = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
       "xgradcam": XGradCAM, "layercam": LayerCAM}


def one_pass(model, x, cls):
    out = model(x)
    out[torch.arange(len(x)), cls].sum().backward()


def article_loop(model, x, cls):
    maps = []
    for layer in body_layers(model).values():
        with HookBwd(layer) as hookg:
            with HookForward(layer) as hook:
                output = model(x)
                act = hook.stored
            output[torch.arange(len(x)), cls].sum().backward()
            grad = hookg.stored
        w = grad.mean(dim=(2, 3), keepdim=True)
        maps.append((w * act).sum(1).relu())
    return maps


def pytorch_grad_cam_per_layer(model, x, cls):
    targets = [ClassifierOutputTarget(int(c)) for c in cls]
    for layer in body_layers(model).values():
        with GradCAM(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=x, targets=targets)


def single_pass(model, x, cls):
    return grad_cam(model, x, list(body_layers(model).values()), cls)


def pytorch_grad_cam_methods(model, x, cls):
    targets = [ClassifierOutputTarget(int(c)) for c in cls]
    for cam_class in PGC.values():
        for layer in body_layers(model).values():
            with cam_class(model=model, target_layers=[layer]) as cam:
                cam(input_tensor=x, targets=targets)


def methods_single_pass(model, x, cls):
    return grad_cam(model, x, list(body_layers(model).values()), cls, method=list(METHODS))


def guidance_epochs():
    """Seconds for one epoch without and with the penalty, same data, same seed; each timed
    twice, interleaved, and the faster kept (the first epoch of a process pays its warm-up)."""
    import fastai.callback.progress  # noqa: F401  adds Learner.no_bar
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed
    from fastai.vision.learner import vision_learner

    from gradcam_tut.guidance import MaskGuidance
    from gradcam_tut.tool.data import DATA_DIR, fish_dataloaders
    from gradcam_tut.tool.mini_fish import make_mini_fish

    root = make_mini_fish(DATA_DIR / "mini_fish", progress=False)
    secs = {0: [], 1: []}
    for weight in (0, 1, 0, 1):
        set_seed(42, reproducible=True)
        dls = fish_dataloaders(root, size=128, bs=16, with_masks=True)
        learn = vision_learner(dls, torchvision.models.resnet34, pretrained=False, n_out=9,
                               loss_func=CrossEntropyLossFlat(), cbs=MaskGuidance(weight=weight))
        with learn.no_bar(), learn.no_logging():
            start = time.perf_counter()
            learn.fit(1, 5e-3)
            secs[weight].append(time.perf_counter() - start)
    return min(secs[0]), min(secs[1])


def median_seconds(fn, repeats, *args):
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", action="store_true", help="also (e) and (f): all five methods")
    p.add_argument("--guidance", action="store_true",
                   help="only MaskGuidance's training cost per epoch")
    args = p.parse_args()
    if args.guidance:
        plain, guided = guidance_epochs()
        print(f"one epoch, resnet34, 128 px: plain {plain:.1f} s, MaskGuidance(layer4) "
              f"{guided:.1f} s, {guided / plain:.2f}x")
        return
    assert list(PGC) == list(METHODS)
    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=9).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    cls = torch.arange(args.batch) % 9
    ways = {
        "(a) one forward + backward": one_pass,
        "(b) article loop, 8 passes": article_loop,
        "(c) pytorch-grad-cam x 8 layers": pytorch_grad_cam_per_layer,
        "(d) grad_cam, 8 layers, 1 pass": single_pass,
    }
    if args.methods:
        ways |= {"(e) grad_cam, 5 methods x 8, 1 pass": methods_single_pass,
                 "(f) pytorch-grad-cam 5 x 8 layers": pytorch_grad_cam_methods}
    print(f"resnet34, batch {args.batch} x 3x{args.size}x{args.size}, {torch.get_num_threads()}"
          f" threads, torch {torch.__version__}, median of {args.repeats}")
    secs = {}
    for name, fn in ways.items():
        secs[name[:3]] = s = median_seconds(fn, args.repeats, model, x, cls)
        model.zero_grad(set_to_none=True)
        print(f"{name:38s} {s:8.3f} s")
    a, b, c, d = (secs[k] for k in ("(a)", "(b)", "(c)", "(d)"))
    print(f"(d)/(a) = {d / a:.2f}x  (target <= 1.0)")
    print(f"(b)/(d) = {b / d:.2f}x  (target >= 8)")
    print(f"(c)/(d) = {c / d:.2f}x  (target >= 8)")
    if args.methods:
        e, f = secs["(e)"], secs["(f)"]
        print(f"(e)/(d) = {e / d:.2f}x  (four more methods from the same pass)")
        print(f"(f)/(e) = {f / e:.2f}x")


if __name__ == "__main__":
    main()
