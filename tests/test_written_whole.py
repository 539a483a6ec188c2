"""Results written whole or not at all (issue 18, part A): a full disk, a read-only folder,
Ctrl-C, a second run to the same place, `--force`, and everything that can be checked before
the compute. Each case asserts the message names the problem and the fix, and that nothing
outside the temporary folders changed.
"""

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock

from gradcam_tut.tool import explaining, runner
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.results import MARKER

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (the repository: caches and the venv skipped), with its size
    and modification time."""
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", "__pycache__", ".ipynb_checkpoints"}
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in root.rglob("*")
            if f.is_file() and not f.is_symlink() and not skip & set(f.relative_to(root).parts)}


@pytest.fixture(autouse=True)
def nothing_outside_tmp_changes(tmp_path, monkeypatch):
    """Each test runs in its tmp_path; the repository (what this test could reach) stays."""
    monkeypatch.chdir(tmp_path)
    before = _snapshot(REPO / "gradcam_tut"), _snapshot(REPO / "tests")
    yield
    assert (_snapshot(REPO / "gradcam_tut"), _snapshot(REPO / "tests")) == before


@pytest.fixture
def explain_cmd(tiny_model_file, images):
    def cmd(out, *extra, paths=None):
        return ["explain", *map(str, paths or [images]), "--learner", str(tiny_model_file),
                "--out", str(out), "--layers", "layer3", "layer4", *extra]
    return cmd


@pytest.fixture
def no_compute(monkeypatch):
    """The model pass fails the test if it runs: what is checked must be checked before it."""
    def computed(*args, **kwargs):
        raise AssertionError("the model ran before the check")
    monkeypatch.setattr(explaining, "grad_cam", computed)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradcam-tut: error: "), err
    assert "Traceback" not in err
    return err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file()}


def test_a_result_appears_whole_with_its_marker(explain_cmd, tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(explain_cmd(out, "--grids")) == 0
    assert "2 images:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["complete.json", "explain.csv", "grids",
                                                     "maps.npz"]
    assert len(list((out / "grids").iterdir())) == 2
    # beside it: no temporary folder, no lock file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photos"]


@pytest.mark.parametrize("force", [False, True])
def test_a_full_disk_leaves_no_half_result(explain_cmd, tmp_path, monkeypatch, capsys, force):
    """ENOSPC while maps.npz is written (after the CSV): one line, no traceback, exit 2, and
    the destination as it was, absent or the earlier result intact."""
    out = tmp_path / "ex"
    if force:
        assert main(explain_cmd(out)) == 0
    before = tree(tmp_path)

    def full(file, *args, **kwargs):
        Path(file).write_bytes(b"PK\x03\x04 half a zip")  # what a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    monkeypatch.setattr(np, "savez_compressed", full)
    capsys.readouterr()
    assert main(explain_cmd(out, *["--force"] * force)) == 2
    err = error_line(capsys)
    assert f"{out} was not written: No space left on device" in err
    assert "maps.npz" in err and "free some space, or write to another disk" in err
    assert tree(tmp_path) == before  # no temporary folder, no lock, the old result whole
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(explain_cmd(out, "--force")) == 0  # and a rerun works


def test_a_read_only_folder_is_one_line(explain_cmd, tiny_model_file, images, tmp_path,
                                        monkeypatch, capsys):
    """Refused before the model pass, for explain and grid alike."""
    parent = tmp_path / "read_only"
    parent.mkdir()
    out = parent / "ex"
    real_access = os.access
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root may write anywhere: a folder it may not write in, as os.access answers
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and
                            real_access(path, mode, **kw))
    try:
        assert main(explain_cmd(out)) == 2
        err = error_line(capsys)
        assert f"cannot write in {parent}: pick an --out in a folder you can write to" in err
        assert main(["grid", str(tiny_model_file), str(next(images.iterdir())),
                     "--out", f"{parent}/"]) == 2
        err = error_line(capsys)
        assert f"cannot write in {parent}: pick an --out in a folder you can write to" in err
    finally:
        parent.chmod(0o755)
    monkeypatch.setattr(os, "access", real_access)
    # root writes anyway (and a disk mounted read-only fails only at the write): a mock
    def refused(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(pd.DataFrame, "to_csv", refused)
    assert main(explain_cmd(out)) == 2
    err = error_line(capsys)
    assert "Read-only file system" in err and "explain.csv" in err
    assert "pick a folder on a disk that is not read-only" in err
    assert list(parent.iterdir()) == []


def test_ctrl_c_between_the_writes_leaves_the_old_result(explain_cmd, images, tmp_path,
                                                          monkeypatch, capsys):
    out = tmp_path / "ex"
    assert main(explain_cmd(out, "--grids")) == 0
    before = tree(tmp_path)
    written = []

    def interrupted(file, *args, **kwargs):  # the CSV is written, the maps never are
        written.append(file)
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez_compressed", interrupted)
    assert main(explain_cmd(out, "--force", paths=[next(images.iterdir())])) == 130
    assert capsys.readouterr().err == "gradcam-tut: interrupted\n"
    assert written and tree(tmp_path) == before  # the old result intact, nothing beside it
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(explain_cmd(out, "--force", paths=[next(images.iterdir())])) == 0
    assert len(pd.read_csv(out / "explain.csv")) == 1


def test_force_replaces_the_whole_result(explain_cmd, images, tmp_path):
    """No stale grids: 1 image over 2 leaves 1 grid; without --grids, none."""
    out = tmp_path / "ex"
    assert main(explain_cmd(out, "--grids")) == 0
    one = next(images.iterdir())
    assert main(explain_cmd(out, "--grids", "--force", paths=[one])) == 0
    assert [p.name for p in (out / "grids").iterdir()] == [f"00000_{one.stem}.png"]
    assert main(explain_cmd(out, "--force", paths=[one])) == 0
    assert not (out / "grids").exists()
    assert np.load(out / "maps.npz")["layer4"].shape[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photos"]


def test_force_never_deletes_files_it_did_not_write(explain_cmd, tmp_path, capsys, no_compute):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "explain.csv").write_text("mine too")
    assert main(explain_cmd(out, "--force")) == 2
    err = error_line(capsys)
    assert "holds files this tool did not write (notes.txt): pick a new or empty --out" in err
    assert tree(out) == {"notes.txt": b"mine", "explain.csv": b"mine too"}


def test_an_unfinished_result_is_never_taken_for_a_finished_one(explain_cmd, tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "explain.csv").write_text("file\n")  # a run stopped part way (or an older version)
    assert main(explain_cmd(out)) == 2
    err = error_line(capsys)
    assert "holds an unfinished result (no complete.json" in err
    assert "add --force to replace it, or remove it" in err
    left = tmp_path / f".ex.tmp-{os.getpid() + 1}"  # a killed run's temporary folder
    left.mkdir()
    (left / "maps.npz").write_bytes(b"half")
    assert main(explain_cmd(out, "--force")) == 0
    assert f"removed {left}, left unfinished by a run that was stopped" in capsys.readouterr().err
    assert (out / MARKER).is_file() and len(pd.read_csv(out / "explain.csv")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photos"]
    assert main(explain_cmd(out)) == 2  # now a finished one
    assert "holds an earlier result: pick another --out, or add --force" in error_line(capsys)


def test_a_second_run_to_the_same_out_is_refused(explain_cmd, tmp_path, capsys, no_compute):
    """The lock is held for the run: flock, so a lock of another open file (as another process
    would hold it) refuses this run."""
    out = tmp_path / "ex"
    with FileLock(tmp_path / ".ex.lock", timeout=0):
        assert main(explain_cmd(out)) == 2
    err = error_line(capsys)
    assert f"{out} is in use by another run" in err and "wait for it to finish" in err
    assert not out.exists()


def test_what_can_be_checked_is_checked_before_the_model_pass(
        explain_cmd, images, tiny_learner, tmp_path, capsys, no_compute):
    a_file = tmp_path / "result.txt"
    a_file.write_text("mine")
    assert main(explain_cmd(a_file)) == 2
    assert "is a file: the result is a folder, pick a new folder name" in error_line(capsys)
    assert a_file.read_text() == "mine"
    assert main(explain_cmd(a_file / "ex")) == 2
    assert f"{a_file} is a file, so --out" in error_line(capsys)

    latin1 = Path(os.fsdecode(bytes(images) + b"/poisson-\xe9.png"))  # not UTF-8
    shutil.copy(next(images.iterdir()), latin1)
    assert main(explain_cmd(tmp_path / "ex")) == 2
    err = error_line(capsys)
    assert "poisson-\\udce9.png' is not UTF-8, so explain.csv cannot hold it: rename" in err
    assert not (tmp_path / "ex").exists()
    latin1.unlink()

    for bs in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit:
            main(explain_cmd(tmp_path / "ex", "--bs", bs))
        assert exit.value.code == 2
        assert "is not a whole number of at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass a batch size of at least 1"):
        explaining.explain(tiny_learner, [images], bs=0)
    with pytest.raises(ValueError, match="grids=True needs an out folder"):
        explaining.explain(tiny_learner, [images], grids=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "result.txt"]


def test_other_oserrors_are_one_line(tiny_model_file, images, tmp_path, monkeypatch, capsys):
    """The grid is written whole too: a full disk leaves no half PNG and no temporary file."""
    from matplotlib.figure import Figure

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "grids"
    assert main(["grid", str(tiny_model_file), str(next(images.iterdir())),
                 "--out", f"{out}/"]) == 2
    err = error_line(capsys)
    assert "was not written: No space left on device: free some space" in err
    assert list(out.iterdir()) == []
    assert main(["explain", str(images), "--learner", str(tmp_path / "none.pkl"),
                 "--out", str(tmp_path / "ex")]) == 2  # a read that fails: one line too
    assert "none.pkl" in error_line(capsys)


def test_grid_out_ending_in_a_slash_is_a_folder(tiny_model_file, images, tmp_path, capsys):
    image = next(images.iterdir())
    assert main(["grid", str(tiny_model_file), str(image), "--out", "newdir/"]) == 0
    assert capsys.readouterr().out.strip() == f"newdir/{image.stem}_gradcam.png"
    assert (tmp_path / "newdir" / f"{image.stem}_gradcam.png").stat().st_size > 1000
    assert not (tmp_path / "newdir.png").exists()
    assert [p.name for p in (tmp_path / "newdir").iterdir()] == [f"{image.stem}_gradcam.png"]
    (tmp_path / "a_file").write_text("mine")
    assert main(["grid", str(tiny_model_file), str(image), "--out", "a_file/"]) == 2
    assert "--out a_file/ is a file, not a folder: drop the / to write to it" in error_line(capsys)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_latest_only_ever_points_at_a_finished_run(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"

    def finished(settings_file):
        return []

    def failed(settings_file):
        raise runner.NotebookFailed("01_train_resnet34_on_fish.ipynb failed in cell 3: ...")
    monkeypatch.setattr(runner, "run_notebooks", finished)
    assert main(["run", "--out", str(runs), "--name", "good"]) == 0
    assert (runs / "latest").resolve() == (runs / "good").resolve()
    monkeypatch.setattr(runner, "run_notebooks", failed)
    assert main(["run", "--out", str(runs), "--name", "bad"]) == 1
    assert "failed in cell 3" in error_line(capsys)
    assert (runs / "bad").is_dir()  # kept, for its error
    assert (runs / "latest").resolve() == (runs / "good").resolve()
    assert sorted(p.name for p in runs.iterdir()) == ["bad", "good", "latest"]


def test_run_checks_the_data_before_any_kernel(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a kernel started")
    monkeypatch.setattr(runner, "run_notebooks", never)
    pets = tmp_path / "pets"
    (pets / "cat").mkdir(parents=True)  # one class: not a classifier's data
    assert main(["run", "--out", str(tmp_path / "runs"), "--data", str(pets)]) == 2
    err = error_line(capsys)
    assert "class folder" in err and "a classifier needs at least 2" in err
    assert not (tmp_path / "runs").exists()


def test_2d_targets_say_one_true_thing():
    import torch

    from gradcam_tut.cam import class_indices

    logits = torch.zeros(3, 9)
    with pytest.raises(ValueError) as err:
        class_indices([[1], [2], [0]], logits)
    assert str(err.value) == ("targets of shape (3, 1): pass one int for all images, or a flat "
                              "list of 3 ints, one per image (e.g. .flatten())")
    assert class_indices([1, 2, 0], logits).tolist() == [1, 2, 0]


def test_ctrl_c_between_the_renames_puts_the_old_result_back(tmp_path, monkeypatch):
    """`--force`'s swap: old renamed away, new renamed in; stopped between, the old comes back."""
    from gradcam_tut.tool.results import written_whole

    dest = tmp_path / "ex"
    with written_whole(dest, ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("old")
    before = tree(tmp_path)
    real_rename, renames = os.rename, []

    def stopped(src, dst):
        renames.append(Path(dst).name)
        if len(renames) == 2:  # the new result's rename: Ctrl-C
            raise KeyboardInterrupt
        real_rename(src, dst)
    monkeypatch.setattr(os, "rename", stopped)
    with pytest.raises(KeyboardInterrupt):
        with written_whole(dest, ["a.txt"], force=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert renames[:2] == [f".ex.old-{os.getpid()}", "ex"]
    assert tree(tmp_path) == before
