"""GPU check: resnet34 training speed with and without `to_fp16`, and Grad-CAM after fp16 training.

    python benchmarks/gpu_check.py [--per-class 1000] [--epochs 2] [--data /tmp/mini_fish_full]

1. Writes the full-size mini fish set (590x445, `--per-class` images per class).
2. Trains resnet34 at 224 px from random weights (nothing downloaded) with fastai,
   once with `to_fp16()` and once in fp32, and prints images/s of the last epoch side by side.
3. On the fp16-trained learner, computes every body layer's Grad-CAM for a validation batch in
   fp32 and under fp16 autocast (how the learner ran while training) and checks the maps are
   finite and agree: cosine >= 0.999 per layer. Exits 1 if not.
Without CUDA it runs the fp32 half only, to check the script (use tiny --per-class and --size).
"""

import argparse
import os
import time

import fastai.callback.fp16  # noqa: F401  Learner.to_fp16
import fastai.callback.schedule  # noqa: F401  Learner.fit_one_cycle
import torch
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torchvision.models import resnet34

from gradcam_tut import body_layers, grad_cam
from gradcam_tut.tool.data import fish_dataloaders
from gradcam_tut.tool.mini_fish import MiniFishSpec, make_mini_fish


class EpochTimer(Callback):
    """Seconds and images of each training epoch (after the GPU has finished its work)."""

    def before_epoch(self):
        self.n = 0
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.start = time.perf_counter()

    def after_batch(self):
        if self.training:
            self.n += len(self.xb[0])

    def after_train(self):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self.rates = [*getattr(self, "rates", []), self.n / (time.perf_counter() - self.start)]


def train(root, fp16, args):
    dls = fish_dataloaders(root, size=args.size, bs=args.bs, num_workers=args.workers)
    learn = vision_learner(dls, resnet34, metrics=accuracy, pretrained=False)
    if fp16:
        learn = learn.to_fp16()
    timer = EpochTimer()
    learn.fit_one_cycle(args.epochs, 2e-3, cbs=timer)
    return learn, timer.rates[-1], float(learn.recorder.values[-1][2])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/mini_fish_full")
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (no CUDA: fp32 only)'}; "
          f"torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True

    start = time.perf_counter()
    spec = MiniFishSpec(per_class=args.per_class, width=590, height=445)
    root = make_mini_fish(args.data, spec, n_workers=args.workers, progress=False)
    print(f"mini fish {args.per_class} x 9 at 590x445 in {time.perf_counter() - start:.0f} s")

    results = {}
    for fp16 in ([True, False] if cuda else [False]):
        learn, rate, acc = train(root, fp16, args)
        results["fp16" if fp16 else "fp32"] = (learn, rate, acc)
        print(f"{'to_fp16' if fp16 else 'fp32':8s} {rate:8.0f} images/s (epoch {args.epochs}), "
              f"valid accuracy {acc:.3f}")
    if cuda:
        print(f"to_fp16 speed-up: {results['fp16'][1] / results['fp32'][1]:.2f}x")

    learn = results["fp16" if cuda else "fp32"][0]
    model, xb = learn.model.eval(), learn.dls.valid.one_batch()[0]
    layers = body_layers(learn)
    with torch.no_grad():
        targets = model(xb).argmax(dim=1)
    full = grad_cam(model, xb, list(layers.values()), targets)
    with torch.autocast("cuda" if cuda else "cpu", enabled=cuda, dtype=torch.float16):
        half = grad_cam(model, xb, list(layers.values()), targets)
    ok = True
    print(f"Grad-CAM on {len(xb)} validation images, fp32 vs fp16 autocast, per layer:")
    for name, a, b in zip(layers, full, half):
        finite = bool(torch.isfinite(b).all())
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        cos = 1.0 if a.max() == 0 and b.max() == 0 else cos  # both empty: the same map
        ok &= finite and cos >= 0.999
        print(f"  {name:8s} {tuple(b.shape[1:])!s:10s} dtype {b.dtype} finite {finite} "
              f"cosine {cos:.5f}")
    print("Grad-CAM check:", "PASS" if ok else "FAIL (cosine < 0.999 or non-finite)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
