"""Which fix of a planted shortcut changes what the network does? Every row over several seeds.

Each row trains notebook 06's recipe (`shortcut.shortcut_recipe()`) on mini fish drawn with the
seed, then asks the network on counterfactual test images (`shortcut.counterfactual_sets`: the
same new fish clean, with their own mark, with another class's mark) and measures where its
Grad-CAM maps lie (`shortcut.map_shares`). Two rows train at a time, one thread each, as
`gradcam-tut run` does. Writes one CSV row per (row, seed) and prints mean ± sd per row.

    .venv/bin/python benchmarks/bench_shortcut.py                 # 5 rows x seeds 42 43 44
    .venv/bin/python benchmarks/bench_shortcut.py --extra         # + other candidates
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ["reference", "shortcut", "data fix", "MaskGuidance", "BackgroundSwap"]
EXTRA = ["MaskGuidance x10", "MaskGuidance layer4", "input gradients 1e-3",
         "input gradients 1e-4"]
LAYER = "layer2"  # the layer MaskGuidance guides and the maps are measured at


def input_gradient_penalty(weight: float):
    """Ross et al. (2017), "right for the right reasons": `weight` x the squared input gradient
    of the summed log-probabilities outside the mask, trained through (double backprop).
    A candidate measured here; not kept in the package (see benchmarks/README.md)."""
    import torch
    import torch.nn.functional as F
    from fastai.callback.core import Callback

    from gradcam_tut.guidance import take_masks

    class InputGradients(Callback):
        order = 60

        def before_batch(self):
            self.masks = take_masks(self)
            if self.training:
                self.learn.xb = (self.xb[0].detach().requires_grad_(),)

        def after_loss(self):
            if not self.training:
                return
            logp = F.log_softmax(self.pred.float(), dim=1).sum()
            (g,) = torch.autograd.grad(logp, self.xb[0], create_graph=True)
            outside = ~self.masks.bool()[:, None]  # (B, 1, H, W)
            penalty = (g * outside).pow(2).sum() / len(g)
            self.learn.loss_grad = self.loss_grad + weight * penalty

    return InputGradients()


def train_row(row: str, seed: int, per_class: int, data: Path) -> dict:
    """Train one row with one seed and measure it (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from gradcam_tut.guidance import BackgroundSwap, MaskGuidance
    from gradcam_tut.tool.shortcut import (
        counterfactual_sets,
        map_shares,
        shortcut_recipe,
        shortcut_scores,
        training_sets,
    )
    from gradcam_tut.tool.train import train_fish

    train = training_sets(data, per_class, seed)
    tests = counterfactual_sets(data / "test")
    on, cbs = {"reference": "clean", "data fix": "shuffled"}.get(row, "marked"), None
    if row.startswith("MaskGuidance"):
        weight = 10.0 if "x10" in row else 1.0
        cbs = [MaskGuidance("layer4" if "layer4" in row else LAYER, weight)]
    elif row == "BackgroundSwap":
        cbs = [BackgroundSwap()]
    elif row.startswith("input gradients"):
        cbs = [input_gradient_penalty(float(row.split()[-1]))]
    recipe = shortcut_recipe()
    start = time.perf_counter()
    learn = train_fish(train[on], **recipe, seed=seed, cbs=cbs, with_masks=cbs is not None)
    seconds = (time.perf_counter() - start) / recipe["epochs"]
    valid = learn.recorder.values[-1][learn.recorder.metric_names.index("accuracy") - 1]
    return {"row": row, "seed": seed, "images per class": per_class, "valid accuracy": valid,
            **shortcut_scores(learn, tests), **map_shares(learn, tests, LAYER),
            "seconds per epoch": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--per-class", type=int, default=72)
    p.add_argument("--extra", action="store_true", help="also the other candidates")
    p.add_argument("--rows", nargs="+", help="only these rows")
    p.add_argument("--data", type=Path, default=HERE.parent / "data" / "bench_shortcut")
    p.add_argument("--csv", type=Path, default=HERE / "results" / "shortcut.csv")
    args = p.parse_args()
    import pandas as pd

    rows = args.rows or ROWS + EXTRA * args.extra
    jobs = [(r, s) for s in args.seeds for r in rows]
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_row, r, s, args.per_class, args.data) for r, s in jobs]
        results = []
        for f in futures:
            results.append(f.result())
            print({k: round(v, 3) if isinstance(v, float) else v
                   for k, v in results[-1].items()}, flush=True)
    table = pd.DataFrame(results)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    part = args.csv.with_suffix(".part")
    table.to_csv(part, index=False)
    os.replace(part, args.csv)  # whole or not at all
    numbers = table.drop(columns=["seed", "images per class"]).groupby("row", sort=False)
    summary = numbers.mean().round(3).astype(str) + " ± " + numbers.std().round(3).astype(str)
    print(f"\n{len(args.seeds)} seeds {args.seeds}, {args.per_class} images per class; "
          f"{args.csv}\n")
    print(summary.T.to_string())


if __name__ == "__main__":
    main()
