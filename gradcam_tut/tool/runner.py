"""Run the notebooks: a new folder per run, the settings decided once and written whole to its
`settings.json`, every notebook executed top to bottom by papermill with that file's path as
its one parameter, `latest` pointed at the run once it finished; and readable copies of the
executed notebooks (`publish_notebooks`).

torch and fastai are imported when a run decides its settings (`run`), not with this module:
`gradcam-tut --help` answers at once.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # gradcam_tut/tool/runner.py
NOTEBOOKS = REPO / "notebooks"
SETTINGS_FILE = "settings.json"  # in each run folder: the settings every notebook reads
# skipped for your own data, which has no masks: why, to print
FISH_ONLY = {"05_does_it_look_at_the_fish.ipynb": "it needs GT masks, and {data} has none",
             "06_catching_a_shortcut.ipynb": "it trains on mini fish of its own, not on {data}; "
                                             "run it without --data"}
# trains on data of its own, not on 01's model: runs beside 01
INDEPENDENT = {"06_catching_a_shortcut.ipynb"}
# of those that load 01's model, the longest (it scores every layer over the validation set five
# times): started first, so that the short ones fill both cores once 06 is done
LONGEST_FIRST = {"05_does_it_look_at_the_fish.ipynb"}
DOCS = REPO / "docs" / "notebooks"  # executed copies, committed, for reading on GitHub
# a FutureWarning torch prints when fastai is imported: the kernels need not show it
QUIET = "ignore:`torch.jit.script` is deprecated:FutureWarning"
# the kernels' malloc (glibc; other C libraries ignore these): by default it gives large freed
# blocks back to the system and faults them in again, zeroed, at the next batch, a large share
# of a small network's training time on a CPU; these keep them. Yours, when set, are kept
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


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


def run_notebooks(settings_file: Path) -> list[Path]:
    """Execute every notebook top to bottom with papermill into `<run>/notebooks/`, where
    `settings_file` (written by `RunSettings.save`) lies in the run folder `<run>`; its path
    is every notebook's one parameter, `settings`. For data without masks (your own folder),
    05 (it scores maps against masks) and 06 (its own data) are skipped, with a line saying so.

    Two notebooks run at a time, the cores shared between their kernels (`OMP_NUM_THREADS`,
    unless you set it), each kernel's malloc keeping the memory it frees (`MALLOC`): 01,
    which trains and exports the model, beside 06, which needs no model of 01; then 02-05,
    which load it, 05 (the longest) first, so that the others fill both cores once 06 is
    done. 01 alone (no 06) gets every core. On 2 cores two
    one-thread trainings get more done than one two-thread training, and one notebook's
    imports and plots fill the other's idle core. (A model trained with another number of
    threads differs slightly: float sums are taken in another order.)

    The first notebook that fails ends the run: the one running beside it is stopped, and
    the error says which failed, where, and where its output is. From a script of your own,
    call it under `if __name__ == "__main__":`, as for any spawned worker process. Figures
    land in `<run>/figures/`; each executed notebook is saved without what the progress bars
    left (`drop_bar_leftovers`). Returns the executed notebooks' paths, in order.

    Raises:
        FileNotFoundError: no notebooks (a package installed without its repository).
        NotebookFailed: a cell raised; says which notebook, which cell and what, and which
            notebook was stopped beside it.
    """
    from .settings import RunSettings  # torch: only once a run starts

    notebooks, settings_file = notebook_files(), Path(settings_file).resolve()
    s = RunSettings.load(settings_file)
    out = settings_file.parent
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    if not s.masks:
        for nb in [nb for nb in notebooks if nb.name in FISH_ONLY]:
            print(f"skipping {nb.name}: {FISH_ONLY[nb.name].format(data=s.data)}")
            notebooks.remove(nb)
    params = {"settings": str(settings_file)}
    first = [notebooks[0], *(nb for nb in notebooks[1:] if nb.name in INDEPENDENT)]
    rest = sorted((nb for nb in notebooks if nb not in first),
                  key=lambda nb: nb.name not in LONGEST_FIRST)  # stable: then in order

    def submit(nbs: list[Path]) -> dict:  # the cores shared among the notebooks running at once
        share = max(1, (os.cpu_count() or 2) // max(1, min(2, len(nbs))))
        threads = os.environ.get("OMP_NUM_THREADS") or str(share)
        env = {"OMP_NUM_THREADS": threads, "PYTHONWARNINGS": ",".join(
            filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET])),
            **{k: os.environ.get(k) or v for k, v in MALLOC.items()}}
        return {nb: pool.submit(_execute, nb, out, params, env) for nb in nbs}

    # processes, not threads: papermill changes the working directory of its process
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = submit(first)
        running = set(runs.values())
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            error = next((e for f in done if (e := f.exception()) is not None), None)
            if error is not None:  # the first failure ends the run: the others are stopped
                beside = [nb.name for nb, f in runs.items() if f in running]
                _stop(pool)
                if not beside:
                    raise error
                raise NotebookFailed(f"{error}; stopped {', '.join(beside)}, "
                                     "which ran beside it") from error
            if runs[notebooks[0]] in done and rest:  # the model the others load is there
                more = submit(rest)
                runs |= more
                running |= set(more.values())
        return [runs[nb].result() for nb in notebooks]


def _stop(pool: ProcessPoolExecutor) -> None:
    """Stop what `pool` runs: the notebooks not started are dropped, the worker processes
    killed (each kernel exits with its worker: ipykernel watches its parent)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public way
    pool.shutdown(wait=False, cancel_futures=True)  # (which forgets them) before Python 3.14's
    for process in workers:  # pool.terminate_workers()
        process.terminate()


def _execute(nb: Path, out: Path, params: dict, env: dict[str, str]) -> Path:
    """Run one notebook with papermill into `out/notebooks/`, its kernel with `env` set (in a
    worker process of `run_notebooks`)."""
    import papermill as pm

    os.environ.update(env)
    print(f"running {nb.name}\n", end="", flush=True)  # one write: two workers print at once
    target = out / "notebooks" / nb.name
    try:
        executed = pm.execute_notebook(nb, target, parameters=params, cwd=NOTEBOOKS,
                                       progress_bar=False)
    except pm.PapermillExecutionError as exc:
        first = (exc.evalue.strip().splitlines() or [""])[0]
        raise NotebookFailed(f"{nb.name} failed in cell {exc.exec_count}: {exc.ename}: "
                             f"{first} (the whole error: {target})") from exc
    if executed is not None:  # written again without what the progress bars left
        import nbformat

        nbformat.write(drop_bar_leftovers(executed), target)
    return target


def run(root: Path | None = None, name: str | None = None, smoke: bool | None = None,
        data: Path | None = None, publish: Path | None = None, **overrides) -> Path:
    """One run of every notebook: the settings decided once (`run_settings`, its line printed
    once), a new folder `root/<name or time>` with them in `settings.json`, the notebooks
    executed into it (`run_notebooks`), `root/latest` pointed at it once all finished, the
    figures listed, and with `publish` readable copies there. A failed run keeps its folder.

    Args:
        root: where run folders go; None: the project's runs/ (`settings.RUNS_DIR`).
        smoke, data, overrides: as for `run_settings` (overrides: epochs, seed, ...).

    Returns the run folder.
    """
    notebook_files()  # before deciding or making a folder: fails at once from an installed package
    from .settings import RUNS_DIR, run_settings  # torch: only once a run starts

    s = run_settings(smoke, data, **overrides)  # the data's layout checked before any kernel
    root = Path(root) if root is not None else RUNS_DIR
    folder = new_run_dir(root, name)
    print(f"run folder: {folder}", flush=True)
    settings_file = replace(s, out=folder).save(folder / SETTINGS_FILE)
    executed = run_notebooks(settings_file)
    point_latest(root, folder)
    figures = sorted((folder / "figures").glob("*.png"))
    print(f"{len(figures)} figures in {folder / 'figures'}:")
    print("\n".join(f"  {f.name}" for f in figures))
    if publish:
        copies = publish_notebooks(executed, folder, publish)
        print(f"{len(copies)} notebooks to read in {publish}")
    return folder


def bar_leftover(output: dict) -> bool:
    """Whether a notebook output is only what fastprogress's bars leave behind: an empty HTML
    display (a bar with `leave=False`, done) or the stylesheet a kernel's first bar displays
    (a `<style>` alone). The table of a training's epochs is kept."""
    data = output.get("data", {})
    if (set(data) != {"text/html", "text/plain"}
            or "".join(data["text/plain"]) != "<IPython.core.display.HTML object>"):
        return False
    html = "".join(data["text/html"]).strip()
    return html == "" or (html.startswith("<style>") and html.endswith("</style>")
                          and html.count("<style>") == 1)


def drop_bar_leftovers(nb: dict) -> dict:
    """`nb` (an executed notebook, as JSON or nbformat reads it) without the outputs the
    progress bars left (`bar_leftover`): on GitHub an empty box or a page of CSS each."""
    for cell in nb["cells"]:
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if not bar_leftover(o)]
    return nb


def publish_notebooks(notebooks: list[Path], run: Path, dest: Path = DOCS,
                      width: int = 960, quality: int = 85) -> list[Path]:
    """Copies of executed notebooks to read without running them: machine paths replaced by
    `runs/latest`, `.` and `~`, papermill's timings dropped, each figure a JPEG at most
    `width` pixels wide (a heat map compresses badly as PNG), what fastprogress's bars leave
    dropped (`drop_bar_leftovers`). Returns the copies' paths."""
    import base64
    import io
    import json

    from PIL import Image

    def small(png: str) -> str:
        im = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, optimize=True)
        return base64.b64encode(buf.getvalue()).decode()

    def unplaced_line(text: str) -> str:
        for path, shown in ((run.resolve(), "runs/latest"), (REPO, "."), (Path.home(), "~")):
            text = text.replace(str(path), shown)
        return text

    def unplaced(text: str | list[str]) -> str | list[str]:
        """`text` (a string or nbformat's list of lines) with machine paths replaced."""
        if isinstance(text, list):
            return [unplaced_line(line) for line in text]
        return unplaced_line(text)

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for meta in [nb["metadata"], *(c["metadata"] for c in nb["cells"])]:
            meta.pop("papermill", None)
            meta.pop("execution", None)
        for cell in drop_bar_leftovers(nb)["cells"]:
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


