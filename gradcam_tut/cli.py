"""The `gradcam-tut` command: run the notebooks, make the mini fish set, draw a grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# torch and fastai are imported where a command needs them: `--help` answers at once
REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RUNS_DIR = REPO / "runs"


def run_notebooks(out: Path = RUNS_DIR, smoke: bool | None = None,
                  parameters: dict | None = None) -> list[Path]:
    """Execute every notebook top to bottom with papermill into `out/notebooks/`, in order
    (01 trains and exports the model the others load).

    Figures land in `out/figures/`. Returns the executed notebooks' paths. Raises papermill's
    PapermillExecutionError, naming the failing cell, if one fails. (Running two notebooks at
    once was measured slower on 2 cores: their torch threads fight over the same cores.)
    """
    import papermill as pm

    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    params = {"out_dir": str(out.resolve()), **(parameters or {})}
    if smoke is not None:
        params["smoke"] = smoke

    def execute(nb: Path) -> Path:
        print(f"running {nb.name}", flush=True)
        target = out / "notebooks" / nb.name
        pm.execute_notebook(nb, target, parameters=params, cwd=NOTEBOOKS, progress_bar=False)
        return target

    return [execute(nb) for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))]


def add_mini_fish_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `gradcam-tut mini-fish`, and of `python -m gradcam_tut.mini_fish`."""
    p.add_argument("dest", type=Path)
    p.add_argument("--full", action="store_true", help="1000 per class at 590x445")
    p.add_argument("--per-class", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gradcam-tut", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run every notebook; figures go to OUT/figures")
    run.add_argument("--out", type=Path, default=RUNS_DIR)
    run.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                     help="force smoke (or full) mode; default: decide from GPU, data, weights")
    add_mini_fish_arguments(sub.add_parser("mini-fish", help="write the synthetic mini fish set"))
    grid = sub.add_parser("grid", help="per-layer Grad-CAM grid of one image to a PNG")
    grid.add_argument("model", type=Path, help="a learner exported by learn.export")
    grid.add_argument("image", type=Path)
    grid.add_argument("--target", help="class name; default the predicted class")
    grid.add_argument("--out", type=Path, default=Path("gradcam_grid.png"))
    args = p.parse_args(argv)

    if args.cmd == "run":
        run_notebooks(args.out, args.smoke)
        figures = sorted((args.out / "figures").glob("*.png"))
        print(f"{len(figures)} figures in {args.out / 'figures'}:")
        print("\n".join(f"  {f.name}" for f in figures))
    elif args.cmd == "mini-fish":
        from . import mini_fish

        mini_fish.run(args)
    else:
        from .plot import gradcam_grid
        from .train import load_fish_learner

        gradcam_grid(load_fish_learner(args.model), args.image, target=args.target,
                     save=args.out)
        print(args.out)


if __name__ == "__main__":
    sys.exit(main())
