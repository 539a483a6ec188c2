"""A whole folder: `explain` against `grad_cam` alone and the per-image ways, in images/s.

    python benchmarks/bench_explain.py [--images 64] [--size 128] [--bs 16]

resnet34 (random weights, fastai's head) at the smoke size on the mini fish set's images, all 8
body layers. Side by side in one run: (a) `grad_cam` alone over ready-made batches, (b)
`explain` (decoding, transforms, predictions, CSV and maps.npz), (c) a per-image
`learn.gradcam(..., save=png)` loop, (d) pytorch-grad-cam per image, once per layer. (c) and (d)
run on the first 8 images only: they are slow.
"""

import argparse
import tempfile
import time
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401  adds Learner.to_channelslast
import torch
from fastai.vision.learner import vision_learner
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision.models import resnet34

import gradcam_tut.learner  # noqa: F401  adds Learner.gradcam
from gradcam_tut import body_layers, grad_cam
from gradcam_tut.tool.data import DATA_DIR, fish_dataloaders
from gradcam_tut.tool.explaining import explain
from gradcam_tut.tool.layout import image_files
from gradcam_tut.tool.mini_fish import make_mini_fish


def rate(fn, n):
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bs", type=int, default=16)
    args = p.parse_args()
    root = make_mini_fish(DATA_DIR / "mini_fish", progress=False)
    torch.manual_seed(0)
    learn = vision_learner(fish_dataloaders(root, size=args.size, bs=args.bs), resnet34,
                           pretrained=False).to_channelslast(use_amp=False)
    files = image_files(root)[:: max(1, len(image_files(root)) // args.images)][: args.images]
    layers = list(body_layers(learn).values())
    batches = [b[0] for b in learn.dls.test_dl(files, bs=args.bs)]
    few = files[:8]
    out = Path(tempfile.mkdtemp())

    def alone():
        for xb in batches:
            grad_cam(learn.model, xb, layers)

    def folder():
        explain(learn, files, bs=args.bs, out=out / "explained", force=True)

    def per_image():
        for i, f in enumerate(few):
            learn.gradcam(f, save=out / f"{i}.png")

    def pgc_per_image():
        for xb in learn.dls.test_dl(few, bs=1):
            x = xb[0].as_subclass(torch.Tensor)
            target = [ClassifierOutputTarget(int(learn.model.eval()(x).argmax()))]
            for layer in layers:
                with GradCAM(model=learn.model, target_layers=[layer]) as cam:
                    cam(input_tensor=x, targets=target)

    alone()  # warm-up
    print(f"resnet34, {len(files)} images at {args.size} px, batch {args.bs}, 8 layers, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    a = rate(alone, len(files))
    b = rate(folder, len(files))
    c = rate(per_image, len(few))
    d = rate(pgc_per_image, len(few))
    for name, r in [("(a) grad_cam alone", a), ("(b) explain, CSV + maps.npz", b),
                    ("(c) learn.gradcam per image, PNG", c),
                    ("(d) pytorch-grad-cam per image x 8", d)]:
        print(f"{name:38s} {r:7.1f} images/s")
    print(f"(b)/(a) = {b / a:.2f}x  (goal >= 0.7)")
    print(f"(b)/(c) = {b / c:.1f}x   (b)/(d) = {b / d:.1f}x")


if __name__ == "__main__":
    main()
