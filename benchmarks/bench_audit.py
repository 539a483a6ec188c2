"""Does the audit catch notebook 06's planted shortcut, and what does it cost?

(1) Trains (or reuses) notebook 06's shortcut model (every training image its class's corner
mark) and its reference (no marks), with `shortcut.shortcut_recipe()`, side by side, one thread
each, and audits the marked test set of `shortcut.counterfactual_sets` with each (no mask given).
Where each cluster's maps really lie is measured apart from the audit, with `mini_fish.mark_mask`:
the share of each map's mass on the mark (maps placed at their receptive fields, as
`shortcut.map_shares` does) and whether its peak is on the mark.
(2) Times `audit` on 1,008 mini fish at 128 px (resnet34, random weights: the time does not
depend on what the network learned), split into the explain pass, the clustering and the report.
(3) Times `cluster_maps` on 1k, 5k and 20k synthetic 8x8 maps, each size in a fresh process for
its peak memory, with the dense affinity and with the sparse nearest-neighbour one.
(4) Times `gradcam-tut explain` and `audit` of (2)'s images with one process and with two
(torchrun).

    .venv/bin/python benchmarks/bench_audit.py             # all four, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_audit.py --only shortcut   # or: time, scaling, processes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "bench_audit"
SETS = HERE.parent / "data" / "bench_shortcut"  # bench_shortcut.py's mini fish, drawn once
SEED = 42


def train_one(kind: str, data: Path) -> Path:
    """Notebook 06's recipe on the "marked" (shortcut) or "clean" (reference) training set,
    exported to `data/<kind>.pkl`; reused when there (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from gradcam_tut.shortcut import shortcut_recipe, training_sets
    from gradcam_tut.train import train_fish

    model = data / f"{kind}.pkl"
    if not model.is_file():
        train = training_sets(SETS, 72, SEED)
        train_fish(train[kind], **shortcut_recipe(), seed=SEED, export_to=model)
    return model


def shortcut_rows(data: Path) -> None:
    import pandas as pd

    from gradcam_tut.audit import audit
    from gradcam_tut.shortcut import counterfactual_sets, where_maps_lie
    from gradcam_tut.train import load_fish_learner

    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        models = dict(zip(("marked", "clean"),
                          pool.map(train_one, ("marked", "clean"), (data, data))))
    marked = counterfactual_sets(SETS / "test")["marked"]
    folder = Path(marked[0]).parents[2]  # .../Fish_Dataset/Fish_Dataset
    for kind, name in (("marked", "shortcut"), ("clean", "reference")):
        learn = load_fish_learner(models[kind])
        result = audit(learn, [folder], out=data / f"audit-{name}", force=True)
        truth = where_maps_lie(learn, result.images["file"], result.maps, result.layer)
        images = pd.concat([result.images, truth], axis=1)
        flagged = images[images["flagged"] == 1]
        rest = images[images["flagged"] == 0]
        per = images.groupby(["class", "cluster"]).agg(
            size=("file", "size"), flagged=("flagged", "first"),
            accuracy=("correct", "mean"), corners=("corners", "mean"),
            mark_energy=("mark energy", "mean"), on_mark=("on mark", "mean"))
        print(f"\n== {name} model ({models[kind].name}): {len(images)} marked test images, "
              f"layer {result.layer}, {len(per)} clusters, {int(per['flagged'].sum())} flagged "
              f"({len(flagged)} images); report: {data / f'audit-{name}' / 'report.html'}")
        print(per.round(3).to_string())
        on = images["on mark"] == 1
        print(f"images whose map peaks on the mark: {int(on.sum())}"
              f" ({on.mean():.3f}); of them in flagged clusters: "
              f"{(on & (images['flagged'] == 1)).sum() / max(on.sum(), 1):.3f}")
        for what, part in (("flagged", flagged), ("not flagged", rest)):
            if len(part):
                print(f"{what:>12}: {len(part):4d} images, peak on the mark "
                      f"{part['on mark'].mean():.3f}, mass on the mark "
                      f"{part['mark energy'].mean():.3f} (the mark's area: "
                      f"{part['mark area'].mean():.3f})")


def time_rows(data: Path, per_class: int = 112) -> None:
    import torch
    from torchvision.models import resnet34

    from gradcam_tut.audit import audit
    from gradcam_tut.data import fish_dataloaders
    from gradcam_tut.mini_fish import MiniFishSpec, make_mini_fish
    from gradcam_tut.train import fish_learner

    torch.manual_seed(0)
    root = make_mini_fish(data / f"time-{per_class}", MiniFishSpec(per_class=per_class, seed=3),
                          progress=False)  # .../Fish_Dataset/Fish_Dataset
    learn = fish_learner(fish_dataloaders(root, size=128, bs=16), resnet34, pretrained=False)[0]
    start = time.perf_counter()
    result = audit(learn, [root], out=data / "audit-time", force=True)
    total = time.perf_counter() - start
    n, s = len(result.images), result.seconds
    per_1000 = {k: v * 1000 / n for k, v in s.items()}
    print(f"\n== audit of {n} images at 128 px, resnet34, layer {result.layer}, "
          f"{torch.get_num_threads()} threads: {total:.1f} s")
    print("per 1,000 images: " + ", ".join(f"{k} {v:.1f} s" for k, v in per_1000.items())
          + f", total {total * 1000 / n:.1f} s")


def process_rows(data: Path, per_class: int = 112) -> None:
    """`gradcam-tut explain` and `gradcam-tut audit` of the same 1,008 images with one process
    (2 threads, then 1) and under torchrun with two (1 thread each), wall clock including
    start-up; the results of one single-threaded process and of two compared."""
    import pandas as pd
    import torch
    from torchvision.models import resnet34

    from gradcam_tut.data import fish_dataloaders
    from gradcam_tut.mini_fish import MiniFishSpec, make_mini_fish
    from gradcam_tut.train import fish_learner

    root = make_mini_fish(data / f"time-{per_class}", MiniFishSpec(per_class=per_class, seed=3),
                          progress=False)
    model = data / "random34-128.pkl"
    if not model.is_file():
        torch.manual_seed(0)
        dls = fish_dataloaders(root, size=128, bs=16)
        fish_learner(dls, resnet34, pretrained=False)[0].export(model)
    runs = {"1 process, 2 threads": ([], "2"), "1 process, 1 thread": ([], "1"),
            "2 processes, 1 thread each": ([sys.executable, "-m", "torch.distributed.run",
                                            "--nproc_per_node", "2", "-m", "gradcam_tut.cli"],
                                           "1")}
    for command, layer in (("explain", ["--layers", "layer3"]), ("audit", ["--layer", "layer3"])):
        outs = {}
        for name, (launch, threads) in runs.items():
            out = data / f"{command}-{len(launch) > 0}-{threads}"
            cmd = (launch or [sys.executable, "-m", "gradcam_tut.cli"]) + [
                command, str(root), "--learner", str(model), "--out", str(out), "--force",
                *layer]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": threads})
            print(f"{command}, {name}: {time.perf_counter() - start:.1f} s", flush=True)
            outs[name] = out
        one, *_, two = outs.values()
        if command == "audit":
            a, b = (pd.read_csv(o / "clusters.csv") for o in (one, two))
            keys = ["file", "class", "cluster", "flagged"]
            print(f"same files, classes, clusters and flags: {a[keys].equals(b[keys])}")
        else:
            with np.load(one / "maps.npz") as m1, np.load(two / "maps.npz") as m2:
                same = list(m1["files"]) == list(m2["files"])
                diff = float(np.abs(m1["layer3"] - m2["layer3"]).max())
            print(f"same files in the same order: {same}; largest map difference {diff:.1e}")


def synthetic_maps(n: int, grid: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n maps in three families: a blob near the centre, a blob in a corner, a band along an
    edge; positions, widths and noise drawn at random. Returns the maps (n, grid, grid),
    scaled to a maximum of 1, and each map's family."""
    rng = np.random.default_rng(seed)
    family = rng.integers(3, size=n)
    pos = (np.arange(grid) + 0.5) / grid
    y, x = np.meshgrid(pos, pos, indexing="ij")
    cy, cx = rng.uniform(0.35, 0.65, (2, n))
    corner = rng.integers(2, size=(2, n)) * 0.85 + 0.075 + rng.normal(0, 0.03, (2, n))
    cy = np.where(family == 1, corner[0], cy)
    cx = np.where(family == 1, corner[1], cx)
    width = rng.uniform(0.1, 0.2, n)[:, None, None]
    maps = np.exp(-((y - cy[:, None, None]) ** 2 + (x - cx[:, None, None]) ** 2) / width ** 2)
    edge = np.exp(-(y[None] - rng.choice([0.06, 0.94], n)[:, None, None]) ** 2 / 0.01)
    maps = np.where(family[:, None, None] == 2, edge, maps)
    maps = np.clip(maps + rng.normal(0, 0.05, maps.shape), 0, None)
    return (maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.float32), family


def scale_one(n: int, dense: bool) -> dict:
    """One clustering of n synthetic maps (run in a fresh process: its peak memory)."""
    from sklearn.metrics import adjusted_rand_score, homogeneity_score

    from gradcam_tut.audit import cluster_maps, flag_reason, mass_numbers

    maps, family = synthetic_maps(n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    labels, eigenvalues = cluster_maps(maps, dense_max=n if dense else 0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    means = np.stack([maps[labels == c].mean(0) for c in range(labels.max() + 1)])
    flagged = np.array([bool(flag_reason(r)) for _, r in mass_numbers(means).iterrows()])
    away = family > 0  # the corner and edge families
    return {"n": n, "affinity": "dense" if dense else "sparse 15-NN", "seconds": seconds,
            "clusters": int(labels.max() + 1),
            "homogeneity": homogeneity_score(family, labels),
            "ARI": adjusted_rand_score(family, labels),
            "corner/edge maps flagged": flagged[labels][away].mean(),
            "centre maps flagged": flagged[labels][~away].mean(),
            "peak MB over start": (peak - base) / 1024}


def scaling_rows(sizes: tuple[int, ...] = (1000, 5000, 20000), dense_up_to: int = 5000) -> None:
    import pandas as pd

    rows = []
    for n in sizes:
        for dense in (True, False):
            if dense and n > dense_up_to:
                continue
            out = subprocess.run([sys.executable, __file__, "--scale-one", str(n),
                                  "--dense" if dense else "--sparse"], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print("\n== clustering one class of n synthetic 8x8 maps (3 families)")
    print(table.round(3).to_string(index=False))
    dense = table[table["affinity"] == "dense"].set_index("n")["peak MB over start"]
    if len(dense) >= 2:
        n0 = dense.index.max()
        print(f"dense at 20,000 maps, extrapolated as n^2 from {n0}: "
              f"{dense[n0] * (20000 / n0) ** 2 / 1024:.1f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["shortcut", "time", "scaling", "processes"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--scale-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.scale_one:
        print(json.dumps(scale_one(args.scale_one, args.dense)))
        return
    args.data.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "shortcut"):
        shortcut_rows(args.data)
    if args.only in (None, "time"):
        time_rows(args.data)
    if args.only in (None, "scaling"):
        scaling_rows()
    if args.only in (None, "processes"):
        process_rows(args.data)


if __name__ == "__main__":
    main()
