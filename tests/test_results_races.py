"""Results whole under every signal and race (issue 25): a run killed between the two renames
of a `--force` replace, SIGTERM, two runs at once, and several processes (torchrun). Each case
checks that no complete result is lost and nothing is left beside `--out`."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gradcam_tut.tool import explaining
from gradcam_tut.tool.cli import main
from gradcam_tut.tool.results import (
    MARKER,
    ResultInUse,
    holding,
    sigterm_as_interrupt,
    written_whole,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def explain_cmd(tiny_model_file, images):
    def cmd(out, *extra):
        return ["explain", str(images), "--learner", str(tiny_model_file), "--out", str(out),
                "--layers", "layer4", *extra]
    return cmd


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file()}


KILLED_BETWEEN_RENAMES = """
import os, sys
from gradcam_tut.tool.results import written_whole
real, renames = os.rename, []
def rename(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the new result's rename: killed, as by SIGKILL or a power cut
        os._exit(9)
    real(src, dst)
os.rename = rename
with written_whole(sys.argv[1], ["a.txt"], force=True) as tmp:
    (tmp / "a.txt").write_text("new")
"""


def test_a_rerun_never_deletes_a_complete_earlier_result(tmp_path, capsys):
    """Killed between `--force`'s two renames: the earlier result lies aside as .ex.old-PID,
    the complete new one as .ex.tmp-PID. The next run, without --force, puts the earlier one
    back and refuses to replace it; the complete new one is kept and named, never deleted."""
    dest = tmp_path / "ex"
    with written_whole(dest, ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("old")
    earlier = tree(dest)
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(dest)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    pid = next(p.name for p in tmp_path.iterdir() if ".old-" in p.name).rsplit("-")[-1]
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # its lock too: not held
        ".ex.lock", f".ex.old-{pid}", f".ex.tmp-{pid}"]
    unfinished = tmp_path / ".ex.tmp-1"  # and one that never got its marker
    unfinished.mkdir()
    (unfinished / "a.txt").write_text("half")

    with pytest.raises(FileExistsError, match="holds an earlier result: pick another --out"):
        with written_whole(dest, ["a.txt"]) as tmp:
            raise AssertionError("a run without --force went on")
    err = capsys.readouterr().err
    assert f"put back {dest}, the earlier result that a stopped --force replace" in err
    assert f"removed {unfinished}, left unfinished" in err
    assert f"kept {tmp_path / f'.ex.tmp-{pid}'}, a complete result a stopped run left" in err
    assert tree(dest) == earlier
    assert (tmp_path / f".ex.tmp-{pid}" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ex.tmp-{pid}", "ex"]  # no lock


def test_signals_wait_for_the_swap(tmp_path, monkeypatch):
    """SIGTERM and Ctrl-C arriving between the two renames are delivered after the swap: the
    new result is whole in place, the old one gone, and then the run stops."""
    dest = tmp_path / "ex"
    with written_whole(dest, ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):  # the first rename done: both signals now
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        with written_whole(dest, ["a.txt"], force=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "new" and (dest / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ex"]


def test_sigterm_is_cleaned_like_ctrl_c(explain_cmd, tmp_path, monkeypatch, capsys):
    """SIGTERM mid-run: exit 143 in one line, the earlier result as it was, no .tmp-PID and
    no .lock beside it."""
    out = tmp_path / "ex"
    assert main(explain_cmd(out, "--grids")) == 0
    before = tree(tmp_path)
    real = explaining.explain_maps

    def terminated(*args, **kwargs):
        real(*args, **kwargs)  # the grids drawn into the temporary folder, then: kill PID
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(5)  # the signal lands here
        raise AssertionError("SIGTERM did not stop the run")
    monkeypatch.setattr(explaining, "explain_maps", terminated)
    capsys.readouterr()
    assert main(explain_cmd(out, "--grids", "--force")) == 143
    assert capsys.readouterr().err == "gradcam-tut: stopped (SIGTERM)\n"
    assert tree(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back after the command


TAKE_THE_LOCK = """
import sys
from filelock import FileLock, Timeout
try:
    FileLock(sys.argv[1], timeout=0).acquire()
except Timeout:
    print("refused")
"""


def test_the_lock_is_held_while_the_maps_are_computed(explain_cmd, tmp_path, monkeypatch):
    """While a --force run computes, another process cannot take its lock; the run then writes
    its result, the only one. (What a second run says then: test_written_whole.py's
    test_a_second_run_to_the_same_out_is_refused; both at once, end to end, the slow test
    below.)"""
    out = tmp_path / "ex"
    assert main(explain_cmd(out)) == 0
    real, tried = explaining.explain_maps, []

    def with_another_process(*args, **kwargs):
        tried.append(subprocess.run([sys.executable, "-c", TAKE_THE_LOCK, tmp_path / ".ex.lock"],
                                    capture_output=True, text=True, timeout=60))
        return real(*args, **kwargs)
    monkeypatch.setattr(explaining, "explain_maps", with_another_process)
    assert main(explain_cmd(out, "--force")) == 0
    (done,) = tried
    assert done.returncode == 0 and done.stdout == "refused\n", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photos"]


@pytest.mark.slow  # a second interpreter that imports fastai, seconds of CPU
def test_the_lock_is_held_from_the_start(explain_cmd, tmp_path, monkeypatch, capsys):
    """Two --force runs at once: while the first computes, the second (another process) is
    refused in one line at its start; the first then writes its result, the only one."""
    out = tmp_path / "ex"
    assert main(explain_cmd(out)) == 0
    real, second = explaining.explain_maps, []

    def with_a_second_run(*args, **kwargs):
        second.append(subprocess.run([sys.executable, "-m", "gradcam_tut.tool.cli",
                                      *explain_cmd(out, "--force")], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=300))
        return real(*args, **kwargs)
    monkeypatch.setattr(explaining, "explain_maps", with_a_second_run)
    assert main(explain_cmd(out, "--force")) == 0
    (done,) = second
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"gradcam-tut: error: {out} is in use by another run (it holds "
                           f"{tmp_path / '.ex.lock'}): wait for it to finish, or pick another "
                           "--out\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex", "photos"]


def test_holding_is_one_hold_per_thread(tmp_path):
    """Taken again in the same thread (written_whole inside a run's hold) it is the same hold;
    another thread of the process is refused, as another process is."""
    dest, refused = tmp_path / "ex", []

    def other():
        try:
            with holding(dest, ["a.txt"]):
                pass
        except ResultInUse as exc:
            refused.append(str(exc))
    with holding(dest, ["a.txt"]):
        with written_whole(dest, ["a.txt"]) as tmp:
            (tmp / "a.txt").write_text("mine")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert (tmp_path / ".ex.lock").exists()
    assert refused and "is in use by another run" in refused[0]
    assert [p.name for p in tmp_path.iterdir()] == ["ex"]


def test_a_hand_made_launch_is_one_line(explain_cmd, tmp_path, monkeypatch, capsys):
    """RANK and WORLD_SIZE set by hand, no launcher: one line saying how to launch instead."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(explain_cmd(tmp_path / "ex")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gradcam-tut: error: WORLD_SIZE=2 is set but not MASTER_ADDR, "
                          "MASTER_PORT, LOCAL_RANK: the processes were not started together")
    assert "torchrun --nproc_per_node 2 -m gradcam_tut.tool.cli" in err
    assert "unset WORLD_SIZE" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


RANK_1_FAILS = """
import os, sys
from gradcam_tut.tool import cli, explaining
real = explaining.explain_maps
def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise MemoryError("rank 1 ran out of memory")
    return real(*args, **kwargs)
explaining.explain_maps = failing
sys.exit(cli.main())
"""


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gradcam-tut:")]


@pytest.mark.slow
def test_the_first_error_on_any_process_ends_them_all(explain_cmd, images, tmp_path):
    """Two processes under torchrun: an error on process 1 only (in its share of the model
    pass) reaches process 0, which says it in one line; no traceback of ours, nothing left
    beside --out. A damaged image (found by every process) is said once too."""
    out = tmp_path / "ex"
    script = tmp_path / "rank_1_fails.py"
    script.write_text(RANK_1_FAILS)
    done = torchrun([str(script), *explain_cmd(out, "--grids")], REPO)
    assert done.returncode != 0
    assert our_lines(done.stderr) == ["gradcam-tut: error: process 1 of 2: MemoryError: rank 1 "
                                      "ran out of memory"], done.stderr[-3000:]
    assert "gradcam_tut/" not in done.stderr  # no frame of ours: torchrun's own report only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "rank_1_fails.py"]

    (images / "zz_broken.png").write_bytes(b"\x89PNG not really")
    done = torchrun(["-m", "gradcam_tut.tool.cli", *explain_cmd(out)], tmp_path)
    assert done.returncode != 0
    assert our_lines(done.stderr) == ["gradcam-tut: error: 1 damaged file"], done.stderr[-3000:]
    assert f"  {images / 'zz_broken.png'}: " in done.stderr and "gradcam_tut/" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "rank_1_fails.py"]


def notebook(*cells: str) -> str:
    import nbformat

    return nbformat.writes(nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c, metadata={"tags": ["parameters"] * (i == 0)})
               for i, c in enumerate(cells)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}}))


@pytest.mark.slow
def test_a_failing_notebook_ends_the_run_promptly(mini_dest, tmp_path, monkeypatch):
    """01 fails in its last cell (4: papermill's parameters are 2) while 06 runs beside it:
    the run ends at once, 06's kernel is stopped, and the one error names 01, the cell and
    where its output is."""
    import time

    from gradcam_tut.tool import runner
    from gradcam_tut.tool.settings import RunSettings

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    pid_file = tmp_path / "kernel_06.pid"
    (notebooks / "01_train_resnet34_on_fish.ipynb").write_text(notebook(
        "settings = None", "import time; time.sleep(3)", "raise ValueError('no fish here')"))
    (notebooks / "06_catching_a_shortcut.ipynb").write_text(notebook(
        "settings = None",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()))",
        "time.sleep(600)"))
    monkeypatch.setattr(runner, "NOTEBOOKS", notebooks)
    run = tmp_path / "run"
    s = RunSettings("smoke", "asked for smoke", mini_dest, 32, 4, 1, False, out=run)
    start = time.monotonic()
    with pytest.raises(runner.NotebookFailed) as failed:
        runner.run_notebooks(s.save(run / "settings.json"))
    assert time.monotonic() - start < 120
    target = run / "notebooks" / "01_train_resnet34_on_fish.ipynb"
    assert str(failed.value) == (
        f"01_train_resnet34_on_fish.ipynb failed in cell 4: ValueError: no fish here (the whole "
        f"error: {target}); stopped 06_catching_a_shortcut.ipynb, which ran beside it")
    kernel = int(pid_file.read_text())
    for _ in range(50):  # its kernel exits with its worker (ipykernel watches its parent)
        if not Path(f"/proc/{kernel}").exists():
            break
        time.sleep(0.2)
    assert not Path(f"/proc/{kernel}").exists(), "06's kernel still runs"
