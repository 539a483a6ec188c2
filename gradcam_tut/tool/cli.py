"""The `gradcam-tut` command: run the notebooks, make the mini fish set, draw a grid, explain a
folder, audit a folder. It reads the arguments and hands them on (`runner.run` runs the
notebooks).

A user error (a wrong path, a file that would be overwritten, a bad value, a full disk or a
read-only folder) prints one line, `gradcam-tut: error: ...`, and exits with 2; `--debug` shows
the traceback instead. Results are written whole or not at all (`results.py`), under Ctrl-C
(exit 130) and SIGTERM (143) too. On several processes (`torchrun`, `accelerate launch`) the
first process speaks for all: the others' errors reach it (`explaining.agreed`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from . import runner
from .results import (
    ProcessFailed,
    ResultInUse,
    Stopped,
    check_destination,
    check_writable,
    error_message,
    holding,
    sigterm_as_interrupt,
    written_file,
)
from .runner import NotebookFailed

if TYPE_CHECKING:  # fastai is imported where a command needs it
    from fastai.learner import Learner

# torch and fastai are imported where a command needs them: `--help` answers at once
METHOD_NAMES = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")  # cam.METHODS
USER_ERRORS = (OSError, ResultInUse, ValueError, ProcessFailed)  # OSError: disk full, ...
# Importing fastai 2.8 with this torch and pandas warns about fastai's code, which a user of the
# command cannot act on: silenced while a command runs, matched by message, category and module
# (the notebooks' kernels: runner.QUIET). The package itself leaves the warning filters alone.
FASTAI_IMPORT_WARNINGS = (("`torch.jit.script` is deprecated", FutureWarning, "torch.jit._script"),
                          ("The 'mode.chained_assignment' option", Warning, "fastai.tabular"))


def grid_path(out: str | Path, image: Path, force: bool = False) -> Path:
    """Where `grid` writes: `out` (".png" added when it has no suffix), or
    `out/<image>_gradcam.png` when `out` is a folder or ends with "/" (made when missing).

    Raises:
        FileExistsError: that is the input image, or a file that exists (without `force`).
        NotADirectoryError: `out` ends with "/" but is a file.
        PermissionError: its folder cannot be written in.
        ValueError: `out` names another format than PNG.
    """
    folder = str(out).endswith(("/", os.sep))
    out = Path(out).expanduser()
    if folder and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}/ is a file, not a folder: drop the / to write "
                                 "to it, or pick a folder")
    if folder or out.is_dir():
        out = out / f"{image.stem}_gradcam.png"
    elif not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the grid is written as PNG, name it *.png")
    if out.resolve() == image.resolve():
        raise FileExistsError(f"--out {out} is the input image: pick another name")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pick another --out, or add --force to replace it")
    check_writable(out)
    return out


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


TRUST_HELP = ("load the learner file without checking it first. Loading a learner unpickles "
              "it, which can run any code the file names: by default a file that would "
              "import anything a fastai learner is not made of is refused. Pass this only "
              "for a file you trust")


def parser() -> argparse.ArgumentParser:
    from .mini_fish import add_mini_fish_arguments  # numpy and PIL, not torch

    p = argparse.ArgumentParser(prog="gradcam-tut", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run every notebook into a new folder OUT/<time>")
    run.add_argument("--out", type=Path, help="where run folders go (default: runs/ of the "
                     "clone the package runs from, else ./runs; OUT/latest is the newest)")
    run.add_argument("--name", help="the run folder's name instead of the time")
    run.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                     help="force smoke (or full) mode; default: decide from GPU, data, weights")
    run.add_argument("--data", type=Path, help="the Fish Dataset, or your own folder of class "
                     "folders (<class>/<image>; default: $FISH_DATASET, data/, mini fish)")
    run.add_argument("--epochs", type=positive_int,
                     help="epochs to train 01's model for (default: the mode's)")
    run.add_argument("--publish", type=Path, metavar="DEST", help="also write copies of the "
                     "executed notebooks to read on GitHub, no machine paths, JPEG figures "
                     "(`make docs`: docs/notebooks)")
    add_mini_fish_arguments(sub.add_parser("mini-fish", help="write the synthetic mini fish set"))
    grid = sub.add_parser("grid", help="per-layer Grad-CAM grid of one image to a PNG")
    grid.add_argument("model", type=Path, help="a learner exported by learn.export")
    grid.add_argument("image", type=Path)
    grid.add_argument("--target", help="class name or index; default the predicted class")
    grid.add_argument("--out", default="gradcam_grid.png",  # a str: Path drops a final "/"
                      help="a .png file, or a folder (or a name ending in /) for "
                      "<image>_gradcam.png")
    grid.add_argument("--force", action="store_true", help="replace an existing --out file")
    grid.add_argument("--trust-learner", action="store_true", help=TRUST_HELP)
    grid.add_argument("--method", default="gradcam", choices=METHOD_NAMES,
                      help="the CAM method (all from the same pass; default gradcam)")
    ex = sub.add_parser("explain", help="Grad-CAM for every image in files and folders, a "
                        "batch at a time: a CSV, the maps (.npz), grids on request")
    ex.add_argument("paths", nargs="+", type=Path, help="images and folders of images")
    ex.add_argument("--learner", type=Path, required=True, help="a learner saved by learn.export")
    ex.add_argument("--layers", nargs="+", help="layer names; default the whole body")
    ex.add_argument("--target", help="class name or index; default each image's prediction")
    ex.add_argument("--method", default="gradcam", choices=METHOD_NAMES)
    ex.add_argument("--out", type=Path, default=Path("explained"),
                    help="folder for explain.csv, maps.npz and grids/ (default ./explained), "
                    "written whole: it appears only when every file is in it")
    ex.add_argument("--grids", action="store_true", help="also a grid PNG per image")
    ex.add_argument("--bs", type=positive_int, default=16, help="images per grad_cam pass")
    ex.add_argument("--force", action="store_true",
                    help="replace an earlier result in --out, as a whole")
    ex.add_argument("--trust-learner", action="store_true", help=TRUST_HELP)
    au = sub.add_parser("audit", help="cluster every class's maps, test each map's region by "
                        "taking it away and moving it into other images, and flag what decides "
                        "a class without being its object (no masks): clusters.csv, report.html")
    au.add_argument("paths", nargs="+", type=Path, help="images and folders of images "
                    "(<class>/<image> folders named like the learner's classes: labelled)")
    au.add_argument("--learner", type=Path, required=True, help="a learner saved by learn.export")
    au.add_argument("--out", type=Path, required=True, help="folder for clusters.csv and "
                    "report.html, written whole: it appears only when both are in it")
    au.add_argument("--layer", help="one layer's name; default the deepest with >= 7x7 cells")
    au.add_argument("--method", default="gradcam", choices=METHOD_NAMES)
    au.add_argument("--bs", type=positive_int, default=16, help="images per grad_cam pass")
    au.add_argument("--force", action="store_true",
                    help="replace an earlier result in --out, as a whole")
    au.add_argument("--trust-learner", action="store_true", help=TRUST_HELP)
    au.add_argument("--absolute-paths", action="store_true", help="write the images' "
                    "absolute paths in clusters.csv and report.html (default: relative to the "
                    "folder that holds the paths given, to share without this machine's)")
    return p


def run(args: argparse.Namespace) -> None:
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data} is not a folder: pass the Fish Dataset or a "
                                "folder of class folders (<class>/<image>)")
    runner.run(args.out, args.name, args.smoke, args.data, args.publish, epochs=args.epochs)


def grid(args: argparse.Namespace) -> None:
    from ..learner import gradcam_grid
    from .decode_check import damaged_images
    from .train import load_fish_learner

    if not args.image.is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    for f, why in damaged_images([args.image]).items():
        raise ValueError(f"cannot read {f} as an image ({why}): pass a PNG or JPEG file")
    out = grid_path(args.out, args.image, args.force)
    learn = load_fish_learner(args.model, trust=args.trust_learner)
    fig = gradcam_grid(learn, args.image, target=args.target, method=args.method)
    with written_file(out) as part:  # whole: never half a PNG under the name
        fig.savefig(part, dpi=100, format="png")
    print(out)


def _first_process() -> int:
    """This process's rank, the group started first under a launcher (`process_group`): a
    user error is then the same on every process, and only the first says it."""
    from .explaining import process_group

    return process_group()[0]


@contextmanager
def _loaded(args: argparse.Namespace, results: Collection[str], *,
            first: bool) -> Iterator[Learner]:
    """The learner `args.learner` (`--trust-learner`), loaded for a command that writes
    `results` into `args.out`, while the folder is held from start to end (by the first
    process only: `first`); `args.out` is checked (`--force`) before the learner is loaded."""
    from .train import load_fish_learner

    with holding(args.out, results) if first else nullcontext():
        check_destination(args.out, results, args.force)
        yield load_fish_learner(args.learner, trust=args.trust_learner)


def explain(args: argparse.Namespace) -> None:
    from .explaining import RESULTS
    from .explaining import explain as explain_images

    rank = _first_process()
    with _loaded(args, RESULTS, first=rank == 0) as learn:
        table = explain_images(learn, args.paths, layers=args.layers, target=args.target,
                               method=args.method, bs=args.bs, out=args.out, grids=args.grids,
                               force=args.force)
    if rank != 0:  # under accelerate launch: the first process says it
        return
    print(f"{len(table)} images: {args.out / 'explain.csv'}, {args.out / 'maps.npz'}"
          + (f", {args.out / 'grids'}/" if args.grids else ""))


def audit(args: argparse.Namespace) -> None:
    from .auditing import RESULTS
    from .auditing import audit as audit_images

    rank = _first_process()
    with _loaded(args, RESULTS, first=rank == 0) as learn:
        result = audit_images(learn, args.paths, out=args.out, layer=args.layer,
                              method=args.method, bs=args.bs, force=args.force,
                              absolute_paths=args.absolute_paths)
    clusters = result.clusters
    if rank != 0:  # under accelerate launch: the first process says it
        return
    print(f"{len(result.images)} images, {len(clusters)} clusters at {result.layer}, "
          f"{int(clusters['flagged'].sum())} flagged: {args.out / 'clusters.csv'}, "
          f"{args.out / 'report.html'}")


def speaks() -> bool:
    """Whether this process prints errors: alone, or the first of a group started by a
    launcher (the others' errors reach it); a group not started speaks for itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a user error (one line), 1 on a failed notebook."""
    args = parser().parse_args(argv)
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
            for message, category, module in FASTAI_IMPORT_WARNINGS:
                warnings.filterwarnings("ignore", message, category, module)
            command(args)
    except (*USER_ERRORS, NotebookFailed) as exc:
        if args.debug:
            raise
        if speaks():
            print(f"gradcam-tut: error: {error_message(exc)}", file=sys.stderr)
        return 1 if isinstance(exc, NotebookFailed) else 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as `Stopped`
        if args.debug:
            raise
        stopped = isinstance(exc, Stopped)
        if speaks():
            print(f"gradcam-tut: {'stopped (SIGTERM)' if stopped else 'interrupted'}",
                  file=sys.stderr)
        return 143 if stopped else 130
    return 0


def command(args: argparse.Namespace) -> None:
    """Run the command `args` names."""
    if args.cmd == "run":
        run(args)
    elif args.cmd == "mini-fish":
        from . import mini_fish

        mini_fish.run(args)
    elif args.cmd == "explain":
        explain(args)
    elif args.cmd == "audit":
        audit(args)
    else:
        grid(args)


if __name__ == "__main__":
    sys.exit(main())
