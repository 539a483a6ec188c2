"""`gradcam-tut`: one-line errors with exit code 2, nothing of the user's overwritten."""

import json
import os
import pickle
import subprocess
import sys

import pytest

from gradcam_tut.tool import runner
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.runner import new_run_dir, point_latest
from gradcam_tut.tool.settings import RunSettings


@pytest.fixture
def fish(mini_root):
    return sorted((mini_root / "Shrimp" / "Shrimp").iterdir())[0]


def error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradcam-tut: error: "), err
    return err


def test_grid_writes_where_it_says(tiny_model_file, fish, tmp_path, capsys):
    assert main(["grid", str(tiny_model_file), str(fish), "--target", "Shrimp",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert main(["grid", str(tiny_model_file), str(fish), "--out", str(tmp_path / "noext")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "noext.png")
    assert main(["grid", str(tiny_model_file), str(fish), "--out", str(tmp_path),
                 "--target", "3"]) == 0  # a folder, and a class index
    assert capsys.readouterr().out.strip() == str(tmp_path / f"{fish.stem}_gradcam.png")


def test_grid_never_overwrites(tiny_model_file, fish, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(fish.read_bytes())
    before = photo.read_bytes()
    assert main(["grid", str(tiny_model_file), str(photo), "--out", str(photo)]) == 2
    assert "is the input image" in error_line(capsys)
    assert main(["grid", str(tiny_model_file), str(photo), "--out", str(photo), "--force"]) == 2
    assert "is the input image" in error_line(capsys) and photo.read_bytes() == before
    other = tmp_path / "mine.png"
    other.write_bytes(b"my picture")
    assert main(["grid", str(tiny_model_file), str(fish), "--out", str(other)]) == 2
    assert "exists: pick another --out, or add --force" in error_line(capsys)
    assert other.read_bytes() == b"my picture"
    assert main(["grid", str(tiny_model_file), str(fish), "--out", str(other), "--force"]) == 0
    assert other.stat().st_size > 1000


def test_user_errors_are_one_line(tiny_model_file, fish, mini_root, tmp_path, capsys):
    assert main(["grid", str(tiny_model_file), str(tmp_path / "none.png")]) == 2
    assert "no image at" in error_line(capsys)
    assert main(["grid", str(tmp_path / "none.pkl"), str(fish), "--out", str(tmp_path)]) == 2
    assert "run notebook 01" in error_line(capsys)
    assert main(["grid", str(tiny_model_file), str(fish), "--out", str(tmp_path / "g.jpg")]) == 2
    assert "name it *.png" in error_line(capsys)
    assert main(["grid", str(tiny_model_file), str(fish), "--target", "Tuna",
                 "--out", str(tmp_path)]) == 2
    assert "no class named 'Tuna'" in error_line(capsys)
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"not": "a learner"}))
    assert main(["grid", str(tmp_path / "dict.pkl"), str(fish), "--out", str(tmp_path)]) == 2
    assert "is not a learner saved by learn.export" in error_line(capsys)
    (tmp_path / "text.png").write_text("not an image")
    assert main(["grid", str(tiny_model_file), str(tmp_path / "text.png"),
                 "--out", str(tmp_path)]) == 2
    assert "as an image (UnidentifiedImageError" in error_line(capsys)
    assert main(["mini-fish", str(mini_root)]) == 2  # not a folder it may write into
    assert "was not made by make_mini_fish" in error_line(capsys)
    with pytest.raises(FileNotFoundError):
        main(["--debug", "grid", str(tiny_model_file), str(tmp_path / "none.png")])


def test_each_run_gets_a_new_folder(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert not (tmp_path / "latest").exists()  # pointed at a run only once it finished
    point_latest(tmp_path, second)
    assert (tmp_path / "latest").resolve() == second.resolve()
    named = new_run_dir(tmp_path, "baseline")
    point_latest(tmp_path, named)
    assert (tmp_path / "latest").resolve() == named.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, second.name, "baseline", "latest"])  # no link left half-made
    with pytest.raises(FileExistsError, match="never replaced"):
        new_run_dir(tmp_path, "baseline")
    mine = tmp_path / "other"
    (mine / "latest").mkdir(parents=True)  # a folder of the user's named latest
    point_latest(mine, new_run_dir(mine))
    assert (mine / "latest").is_dir() and not (mine / "latest").is_symlink()


def test_run_without_notebooks_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "NOTEBOOKS", tmp_path / "site-packages" / "notebooks")
    assert main(["run", "--out", str(tmp_path / "runs")]) == 2
    assert "run `make run` in a clone" in error_line(capsys)
    assert not (tmp_path / "runs").exists()  # no empty run folder left behind


def test_help_does_not_import_torch():
    code = "import sys, gradcam_tut.tool.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_explain_a_folder(tiny_model_file, mini_root, tmp_path, capsys):
    """A folder and a file, batched: a CSV row and maps per image, grids on request."""
    import numpy as np
    import pandas as pd

    trout = mini_root / "Trout" / "Trout"
    shrimp = sorted((mini_root / "Shrimp" / "Shrimp").iterdir())[0]
    out = tmp_path / "ex"
    assert main(["explain", str(trout), str(shrimp), "--learner", str(tiny_model_file),
                 "--out", str(out), "--bs", "4", "--layers", "layer3", "layer4"]) == 0
    assert "7 images:" in capsys.readouterr().out
    table = pd.read_csv(out / "explain.csv")
    assert list(table.columns) == ["file", "predicted", "confidence", "target",
                                   "max_layer3", "max_layer4"]
    assert len(table) == 7 and (table["predicted"] == table["target"]).all()
    maps = np.load(out / "maps.npz")
    assert maps["layer4"].shape[0] == 7 and list(maps["files"]) == list(table["file"])
    assert np.allclose(maps["layer4"].max(axis=(1, 2)), table["max_layer4"])
    assert main(["explain", str(trout), "--learner", str(tiny_model_file), "--out",
                 str(out)]) == 2  # never over an earlier result without --force
    assert "holds an earlier result: pick another --out, or add --force" in error_line(capsys)
    assert main(["explain", str(shrimp), "--learner", str(tiny_model_file), "--out", str(out),
                 "--target", "Trout", "--grids", "--force"]) == 0
    assert len(list((out / "grids").glob("*.png"))) == 1
    assert pd.read_csv(out / "explain.csv")["target"].tolist() == ["Trout"]
    (tmp_path / "bad.png").write_text("no")
    assert main(["explain", str(tmp_path / "bad.png"), "--learner", str(tiny_model_file)]) == 2
    err = capsys.readouterr().err  # the list of damaged files, one per line
    assert err.startswith("gradcam-tut: error: 1 damaged file\n  ") and "bad.png" in err


def test_publish_notebooks_leaves_no_machine_paths_and_small_figures(tmp_path, monkeypatch):
    """`make docs` copies: run folder, clone and home shown as runs/latest, . and ~; PNG
    figures as JPEG at most 960 px wide; papermill's timings and empty bars dropped. A figure
    whose base64 happens to hold a machine path's characters is left whole (a docs run once
    failed so)."""
    import base64
    import io
    import json
    from pathlib import Path

    import nbformat
    import numpy as np
    from PIL import Image

    from gradcam_tut.tool.runner import REPO, publish_notebooks

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (500, 1168, 3), dtype=np.uint8)).save(buf, "PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    at = next(i for i in range(len(png) - 7) if png[i] == "/" and "/" not in png[i + 1:i + 7])
    monkeypatch.setattr(Path, "home", lambda: Path(png[at:at + 7]))  # "home" inside the PNG
    run = tmp_path / "runs" / "20261127-010203"
    cell = nbformat.v4.new_code_cell("plot()", metadata={"papermill": {"duration": 1.0}})
    cell.outputs = [
        nbformat.v4.new_output("stream", text=f"data: {REPO}/data/x; out {run}/figures/a.png\n"),
        nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={  # a finished progress bar: dropped
            "text/html": "", "text/plain": "<IPython.core.display.HTML object>"}),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"papermill": {"input_path": str(REPO)}})
    src = tmp_path / "01_x.ipynb"
    nbformat.write(nb, src)
    (copy,) = publish_notebooks([src], run, tmp_path / "docs")
    text = copy.read_text()
    assert str(REPO) not in text and str(run) not in text and str(tmp_path) not in text
    out = json.loads(text)
    stream, shown = out["cells"][0]["outputs"]
    assert "".join(stream["text"]) == "data: ./data/x; out runs/latest/figures/a.png\n"
    assert "papermill" not in out["metadata"] and "papermill" not in out["cells"][0]["metadata"]
    im = Image.open(io.BytesIO(base64.b64decode(shown["data"]["image/jpeg"])))
    assert "image/png" not in shown["data"] and im.format == "JPEG" and im.size == (960, 411)


def test_drop_bar_leftovers_keeps_tables_and_drops_empty_bars_and_their_stylesheet():
    """What fastprogress's bars leave in an executed notebook goes (an empty HTML display, the
    first bar's `<style>` alone); the epochs' table and a DataFrame's HTML, whose scoped style
    sits inside a `<div>`, stay."""
    from gradcam_tut.tool.runner import drop_bar_leftovers

    def html(text):
        return {"output_type": "display_data", "metadata": {},
                "data": {"text/html": text, "text/plain": "<IPython.core.display.HTML object>"}}

    style = "\n<style>\n    progress { appearance: none; }\n</style>\n"
    table = '<div><table class="fastprogress"><tr><td>0</td></tr></table></div>'
    frame = {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
             "data": {"text/html": '<div>\n<style scoped>\n</style>\n<table></table></div>',
                      "text/plain": "   a\n0  1"}}
    nb = {"cells": [{"cell_type": "code", "outputs": [html(style), html(table), html(""), frame]},
                    {"cell_type": "markdown", "source": "text"}]}
    assert drop_bar_leftovers(nb)["cells"][0]["outputs"] == [html(table), frame]


FAKE_PAPERMILL = """
import json, os, time
from pathlib import Path

class PapermillExecutionError(RuntimeError):
    ename, evalue, exec_count = "ValueError", "bad value", 3

def execute_notebook(nb, target, **kwargs):
    start = time.time()
    time.sleep({"01": 1.0, "06": 3.0}.get(nb.name[:2], 0.1))  # 06 still runs when 01 ends
    record = [start, time.time(), os.environ["OMP_NUM_THREADS"], kwargs["parameters"],
              os.environ["MALLOC_TRIM_THRESHOLD_"]]
    (Path(os.environ["FAKE_RUNS"]) / nb.name[:2]).write_text(json.dumps(record))
    if nb.name[:2] == os.environ.get("FAKE_FAIL"):
        raise PapermillExecutionError()
    Path(target).touch()
"""


@pytest.mark.slow
def test_run_notebooks_runs_06_beside_01_then_the_rest(tmp_path, monkeypatch, capsys,
                                                       mini_dest):
    """With a stand-in for papermill, in the worker processes too: when each notebook ran, in
    which order, with how many threads, and with the run's settings file as its one
    parameter."""
    (tmp_path / "papermill.py").write_text(FAKE_PAPERMILL)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers import it from here too
    monkeypatch.setenv("FAKE_RUNS", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)

    def runs():
        return {f.name: json.loads(f.read_text()) for f in tmp_path.glob("0?")}

    def decided(run):  # a run folder with its settings file
        s = RunSettings("smoke", "asked for smoke", mini_dest, 128, 16, 4, False, out=run)
        return s.save(run / "settings.json")

    settings_file = decided(tmp_path / "run")
    done = runner.run_notebooks(settings_file)
    assert [p.name[:2] for p in done] == ["01", "02", "03", "04", "05", "06"]  # in order
    assert all(p.parent == tmp_path / "run" / "notebooks" for p in done)
    ran = runs()
    assert ran["06"][0] < ran["01"][1]  # 06 started while 01 trained
    assert all(ran[nb][0] >= ran["01"][1] for nb in ("02", "03", "04", "05"))  # after 01
    assert ran["05"][0] < ran["02"][0] < ran["03"][0]  # the longest first, then in order
    assert {threads for _, _, threads, *_ in ran.values()} == {str(max(1, os.cpu_count() // 2))}
    assert all(params == {"settings": str(settings_file)} for *_, params, _ in ran.values())
    assert {trim for *_, trim in ran.values()} == {runner.MALLOC["MALLOC_TRIM_THRESHOLD_"]}
    assert "OMP_NUM_THREADS" not in os.environ  # set for the kernels only

    with monkeypatch.context() as m:  # without 06, 01 runs alone on every core
        m.setattr(runner, "INDEPENDENT", set())
        runner.run_notebooks(decided(tmp_path / "alone"))
    assert runs()["01"][2] == str(os.cpu_count())

    for f in tmp_path.glob("0?"):
        f.unlink()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # yours is kept
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # and yours
    monkeypatch.setenv("FAKE_FAIL", "01")
    capsys.readouterr()
    with pytest.raises(runner.NotebookFailed, match="01_train_resnet34_on_fish.ipynb failed in "
                       r"cell 3: ValueError: bad value \(the whole error: .*01_train.*\); "
                       "stopped 06_catching_a_shortcut.ipynb, which ran beside it"):
        runner.run_notebooks(decided(tmp_path / "again"))
    ran = runs()
    assert set(ran) == {"01"} and ran["01"][2] == "3"  # 06 stopped, 02-05 never started
    assert ran["01"][4] == "12345"


class InlinePool:
    """A stand-in for the ProcessPoolExecutor of `run_notebooks`: each notebook in this process,
    at once, so that a stand-in for papermill's execute_notebook sees every call."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done = Future()
        try:
            done.set_result(fn(*args))
        except Exception as exc:
            done.set_exception(exc)
        return done


@pytest.fixture
def executed(monkeypatch):
    """The notebooks `gradcam-tut run` would execute, and with which parameters, none run."""
    import papermill

    calls = []

    def execute_notebook(nb, target, parameters=None, **kwargs):
        calls.append((nb.name, parameters))
        return None

    monkeypatch.setattr(runner, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    for name in ("OMP_NUM_THREADS", "PYTHONWARNINGS", *runner.MALLOC):  # _execute sets them
        monkeypatch.setenv(name, os.environ.get(name, ""))
    return calls


def test_run_decides_once_and_passes_the_settings_file(mini_dest, tmp_path, executed, capsys):
    """`gradcam-tut run` prints the mode once, writes runs/<run>/settings.json and passes its
    path to every notebook as the one parameter, no knob beside it."""
    runs = tmp_path / "runs"
    assert main(["run", "--smoke", "--epochs", "2", "--data", str(mini_dest), "--out", str(runs),
                 "--name", "r"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("mode: ") == 1 and "mode: smoke (asked for smoke)" in printed
    settings_file = runs / "r" / "settings.json"
    s = RunSettings.load(settings_file)
    assert (s.mode, s.epochs, s.data, s.out) == ("smoke", 2, mini_dest.resolve(),
                                                 (runs / "r").resolve())
    assert [nb[:2] for nb, _ in executed] == ["01", "06", "05", "02", "03", "04"]
    assert all(params == {"settings": str(settings_file.resolve())} for _, params in executed)
    assert (runs / "latest").resolve() == (runs / "r").resolve()


def test_run_writes_the_data_it_found(mini_dest, mini_root, tmp_path, executed, monkeypatch):
    """$FISH_DATASET is read once, when the run decides: the file names the folder it found."""
    monkeypatch.setenv("FISH_DATASET", str(mini_dest))
    monkeypatch.setenv("GRADCAM_TUT_SMOKE", "1")
    assert main(["run", "--out", str(tmp_path), "--name", "r"]) == 0
    s = RunSettings.load(tmp_path / "r" / "settings.json")
    assert s.data == mini_root.resolve() and s.reason == "asked for smoke"  # its class folders


def test_run_on_your_own_data_skips_05_and_06(mini_root, tmp_path, executed, capsys):
    import shutil

    pets = tmp_path / "pets"
    for cls in ("Trout", "Shrimp"):  # two class folders, no masks
        shutil.copytree(mini_root / cls / cls, pets / cls.lower())
    assert main(["run", "--smoke", "--data", str(pets), "--out", str(tmp_path / "runs")]) == 0
    printed = capsys.readouterr().out
    assert f"skipping 05_does_it_look_at_the_fish.ipynb: it needs GT masks, and {pets}" in printed
    assert "skipping 06_catching_a_shortcut.ipynb: it trains on mini fish" in printed
    assert [nb[:2] for nb, _ in executed] == ["01", "02", "03", "04"]
