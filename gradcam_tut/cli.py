"""The `gradcam-tut` command: run the notebooks, make the mini fish set, draw a grid, explain a
folder.

A user error (a wrong path, a file that would be overwritten, a bad value, a full disk or a
read-only folder) prints one line, `gradcam-tut: error: ...`, and exits with 2; `--debug` shows
the traceback instead. Results are written whole or not at all (`results.py`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .results import (
    ResultInUse,
    check_destination,
    check_writable,
    os_error_message,
    written_file,
)

# torch and fastai are imported where a command needs them: `--help` answers at once
REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RUNS_DIR = Path("runs")  # under the current folder, never inside an installed package
# skipped for your own data, which has no masks: why, to print
FISH_ONLY = {"05_does_it_look_at_the_fish.ipynb": "it needs GT masks, and {data} has none",
             "06_catching_a_shortcut.ipynb": "it trains on mini fish of its own, not on {data}; "
                                             "run it without --data"}
# trains on data of its own, not on 01's model: runs beside 01
INDEPENDENT = {"06_catching_a_shortcut.ipynb"}
DOCS = REPO / "docs" / "notebooks"  # executed copies, committed, for reading on GitHub
# a FutureWarning torch prints when fastai is imported: the kernels need not show it
QUIET = "ignore:`torch.jit.script` is deprecated:FutureWarning"
METHOD_NAMES = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")  # cam.METHODS
USER_ERRORS = (OSError, ResultInUse, ValueError)  # OSError: read-only, disk full, no such file


class NotebookFailed(RuntimeError):
    """A notebook raised while `gradcam-tut run` executed it."""


def new_run_dir(root: Path, name: str | None = None) -> Path:
    """A new folder for one run under `root`, named `name` or by the time. An existing run is
    never reused; `root/latest` is pointed at it only once it finished (`point_latest`).

    Raises:
        FileExistsError: `root/name` exists.
    """
    root.mkdir(parents=True, exist_ok=True)
    if name:
        run = root / name
        try:
            run.mkdir()  # one step: two runs started at once never share a folder
        except FileExistsError as exc:
            raise FileExistsError(f"{run} exists and a run is never replaced: pick another "
                                  "--name") from exc
        return run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        run = root / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
    raise FileExistsError(f"999 runs named {root / stamp}: pass --name")


def point_latest(root: Path, run: Path) -> None:
    """Point `root/latest` at `run`, a finished run, in one step: a new link renamed over the
    old one, so `latest` always names a finished run. A folder of yours named latest stays."""
    latest = root / "latest"
    if latest.exists() and not latest.is_symlink():
        return
    link = root / f".latest.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(run.name, target_is_directory=True)
    os.replace(link, latest)


def notebook_files() -> list[Path]:
    """The numbered notebooks, in order.

    Raises:
        FileNotFoundError: none (a package installed without its repository).
    """
    notebooks = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {NOTEBOOKS}: the installed package does not "
                                "carry them; run `make run` in a clone of the repository")
    return notebooks


def run_notebooks(out: Path, smoke: bool | None = None, data: Path | None = None,
                  parameters: dict | None = None) -> list[Path]:
    """Execute every notebook top to bottom with papermill into `out/notebooks/`. With `data`
    (or `$FISH_DATASET`) a folder without masks, 05 (it scores maps against masks) and 06 (its
    own data) are skipped, with a line saying so.

    Two notebooks run at a time, the cores shared between their kernels (`OMP_NUM_THREADS`,
    unless you set it): 01, which trains and exports the model, beside 06, which needs no model
    of 01; then 02-05, which load it. 01 alone (no 06) gets every core. On 2 cores two
    one-thread trainings get ~15% more done than one two-thread training, and one notebook's
    imports and plots fill the other's idle core. (A model trained with another number of
    threads differs slightly: float sums are taken in another order.)

    From a script of your own, call it under `if __name__ == "__main__":`, as for any spawned
    worker process. Figures land in `out/figures/`. Returns the executed notebooks' paths, in
    order.

    Raises:
        FileNotFoundError: no notebooks (a package installed without its repository).
        NotebookFailed: a cell raised; says which notebook, which cell and what.
    """
    notebooks, out = notebook_files(), out.resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    params = {"out_dir": str(out), **(parameters or {})}
    if smoke is not None:
        params["smoke"] = smoke
    data = data or os.environ.get("FISH_DATASET")
    if data:
        from .data import is_fish_layout

        params["data_path"] = str(Path(data).resolve())
        if not is_fish_layout(data):
            for nb in [nb for nb in notebooks if nb.name in FISH_ONLY]:
                print(f"skipping {nb.name}: {FISH_ONLY[nb.name].format(data=data)}")
                notebooks.remove(nb)
    first = [notebooks[0], *(nb for nb in notebooks[1:] if nb.name in INDEPENDENT)]
    rest = [nb for nb in notebooks if nb not in first]

    def submit(nbs: list[Path]) -> dict:  # the cores shared among the notebooks running at once
        share = max(1, (os.cpu_count() or 2) // max(1, min(2, len(nbs))))
        threads = os.environ.get("OMP_NUM_THREADS") or str(share)
        env = {"OMP_NUM_THREADS": threads, "PYTHONWARNINGS": ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET]))}
        return {nb: pool.submit(_execute, nb, out, params, env) for nb in nbs}

    # processes, not threads: papermill changes the working directory of its process
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = submit(first)
        try:
            runs[notebooks[0]].result()  # the model the others load
        except NotebookFailed:
            if len(first) > 1:
                print(f"{notebooks[0].name} failed: waiting for "
                      f"{', '.join(nb.name for nb in first[1:])} to finish", flush=True)
            raise
        runs |= submit(rest)
        return [runs[nb].result() for nb in notebooks]


def _execute(nb: Path, out: Path, params: dict, env: dict[str, str]) -> Path:
    """Run one notebook with papermill into `out/notebooks/`, its kernel with `env` set (in a
    worker process of `run_notebooks`)."""
    import papermill as pm

    os.environ.update(env)
    print(f"running {nb.name}\n", end="", flush=True)  # one write: two workers print at once
    target = out / "notebooks" / nb.name
    try:
        pm.execute_notebook(nb, target, parameters=params, cwd=NOTEBOOKS,
                            progress_bar=False)
    except pm.PapermillExecutionError as exc:
        first = (exc.evalue.strip().splitlines() or [""])[0]
        raise NotebookFailed(f"{nb.name} failed in cell {exc.exec_count}: {exc.ename}: "
                             f"{first} (the whole error: {target})") from exc
    return target


def publish_notebooks(notebooks: list[Path], run: Path, dest: Path = DOCS,
                      width: int = 960, quality: int = 85) -> list[Path]:
    """Copies of executed notebooks to read without running them: machine paths replaced by
    `runs/latest`, `.` and `~`, papermill's timings dropped, each figure a JPEG at most
    `width` pixels wide (a heat map as PNG is ~650 kB). Returns the copies' paths."""
    import base64
    import io
    import json

    from PIL import Image

    def small(png: str) -> str:
        im = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        return base64.b64encode(buf.getvalue()).decode()

    def unplaced(text: str | list[str]) -> str | list[str]:
        """`text` (a string or nbformat's list of lines) with machine paths replaced."""
        if isinstance(text, list):
            return [unplaced(line) for line in text]
        for path, shown in ((run.resolve(), "runs/latest"), (REPO, "."), (Path.home(), "~")):
            text = text.replace(str(path), shown)
        return text

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for meta in [nb["metadata"], *(c["metadata"] for c in nb["cells"])]:
            meta.pop("papermill", None)
            meta.pop("execution", None)
        for cell in nb["cells"]:
            cell["source"] = unplaced(cell["source"])
            for out in cell.get("outputs", []):
                for key in ("text", "evalue", "traceback"):
                    if key in out:
                        out[key] = unplaced(out[key])
                data = out.get("data", {})
                for kind in [k for k in data if not k.startswith("image/")]:  # not base64
                    data[kind] = unplaced(data[kind])
                if "image/png" in data:
                    data["image/jpeg"] = small(data.pop("image/png"))
                    out.get("metadata", {}).pop("image/png", None)
        written.append(dest / nb_path.name)
        written[-1].write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return written


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


def parser() -> argparse.ArgumentParser:
    from .mini_fish import add_mini_fish_arguments  # numpy and PIL, not torch

    p = argparse.ArgumentParser(prog="gradcam-tut", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run every notebook into a new folder OUT/<time>")
    run.add_argument("--out", type=Path, default=RUNS_DIR,
                     help="where run folders go (default ./runs; OUT/latest is the newest)")
    run.add_argument("--name", help="the run folder's name instead of the time")
    run.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=None,
                     help="force smoke (or full) mode; default: decide from GPU, data, weights")
    run.add_argument("--data", type=Path, help="the Fish Dataset, or your own folder of class "
                     "folders (<class>/<image>; default: $FISH_DATASET, data/, mini fish)")
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
    au = sub.add_parser("audit", help="cluster every class's maps and flag the clusters that "
                        "look away from the object (no masks): clusters.csv and report.html")
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
    return p


def _target(target: str | None, vocab) -> int | None:
    """--target as a class index, by the one resolver (`cam.class_indices`): a class name, or
    digits that are not a class name."""
    from .cam import class_index  # torch only once a command needs it

    return None if target is None else class_index(vocab, target)


def run(args: argparse.Namespace) -> None:
    notebook_files()  # before making a run folder: fails at once from an installed package
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data} is not a folder: pass the Fish Dataset or a "
                                "folder of class folders (<class>/<image>)")
    data = args.data or os.environ.get("FISH_DATASET")
    if data:  # the layout in a second, before any kernel starts (images decode in 01)
        from .data import validate_layout

        validate_layout(data, check_images=False)
    folder = new_run_dir(args.out, args.name)
    print(f"run folder: {folder}", flush=True)
    executed = run_notebooks(folder, args.smoke, args.data)  # a failed run keeps its folder
    point_latest(args.out, folder)
    figures = sorted((folder / "figures").glob("*.png"))
    print(f"{len(figures)} figures in {folder / 'figures'}:")
    print("\n".join(f"  {f.name}" for f in figures))
    if args.publish:
        copies = publish_notebooks(executed, folder, args.publish)
        print(f"{len(copies)} notebooks to read in {args.publish}")


def grid(args: argparse.Namespace) -> None:
    from .data import damaged_images
    from .plot import gradcam_grid
    from .train import load_fish_learner

    if not args.image.is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    for f, why in damaged_images([args.image]).items():
        raise ValueError(f"cannot read {f} as an image ({why}): pass a PNG or JPEG file")
    out = grid_path(args.out, args.image, args.force)
    learn = load_fish_learner(args.model)
    fig = gradcam_grid(learn, args.image, target=_target(args.target, learn.dls.vocab),
                       method=args.method)
    with written_file(out) as part:  # whole: never half a PNG under the name
        fig.savefig(part, dpi=100, format="png")
    print(out)


def explain(args: argparse.Namespace) -> None:
    from .explain import RESULTS
    from .explain import explain as explain_images
    from .train import load_fish_learner

    check_destination(args.out, RESULTS, args.force)  # before loading the learner
    learn = load_fish_learner(args.learner)
    table = explain_images(learn, args.paths, args.layers, _target(args.target, learn.dls.vocab),
                           args.method, args.bs, args.out, args.grids, args.force)
    print(f"{len(table)} images: {args.out / 'explain.csv'}, {args.out / 'maps.npz'}"
          + (f", {args.out / 'grids'}/" if args.grids else ""))


def audit(args: argparse.Namespace) -> None:
    from .audit import RESULTS
    from .audit import audit as audit_images
    from .train import load_fish_learner

    check_destination(args.out, RESULTS, args.force)  # before loading the learner
    learn = load_fish_learner(args.learner)
    result = audit_images(learn, args.paths, args.out, args.layer, args.method, args.bs,
                          force=args.force)
    clusters = result.clusters
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch: the first process says it
        return
    print(f"{len(result.images)} images, {len(clusters)} clusters at {result.layer}, "
          f"{int(clusters['flagged'].sum())} flagged: {args.out / 'clusters.csv'}, "
          f"{args.out / 'report.html'}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on a user error (one line), 1 on a failed notebook."""
    args = parser().parse_args(argv)
    try:
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
    except (*USER_ERRORS, NotebookFailed) as exc:
        if args.debug:
            raise
        msg = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
        print(f"gradcam-tut: error: {msg.strip()}", file=sys.stderr)  # a list stays whole
        return 1 if isinstance(exc, NotebookFailed) else 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("gradcam-tut: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
