"""Results written whole or not at all: a command writes into a temporary folder beside its
destination and renames it into place once every file is in it, with a completion marker.

    explained/                  a finished result: its files and `complete.json`
    .explained.tmp-<pid>/       being written; removed when the write fails
    .explained.old-<pid>/       an earlier result being replaced (`force`)
    .explained.lock             held for the run (`holding`): a second run to the same folder
                                is refused at its start

A folder without the marker is an unfinished result, never taken for a finished one. `force`
replaces a result as a unit (the old one renamed away, the new one renamed in, the old one
deleted, with Ctrl-C and SIGTERM held back meanwhile), and a folder holding anything this
tool did not write is never replaced. What a killed run left beside the destination is tidied
by the next run, under the lock: a folder without the marker is removed, a complete one never
(an earlier result a replace had moved aside is put back). SIGTERM is raised as Ctrl-C is
(`sigterm_as_interrupt`), so the same clean-up runs. Standard library and `filelock` only:
the command line imports it before torch.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

MARKER = "complete.json"
FIXES: dict[int | None, str] = {  # what to do about an OSError, by its errno (or None)
    errno.ENOSPC: "free some space, or write to another disk",
    errno.EDQUOT: "free some space, or write to another disk",
    errno.EACCES: "pick a folder you can write to, or change its permissions",
    errno.EPERM: "pick a folder you can write to, or change its permissions",
    errno.EROFS: "pick a folder on a disk that is not read-only",
}


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula


def spreadsheet_text(cell):
    """A CSV cell a spreadsheet shows as text: a string that begins like a formula (`=`, `+`,
    `-`, `@`, tab, CR) gets a leading `'` (OWASP's rule against CSV injection); anything
    else, numbers included, is returned as it is."""
    return f"'{cell}" if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def formula_safe(table):
    """A copy of a pandas `table` to write as CSV, its column names and text cells made
    `spreadsheet_text`; every CSV this package writes goes through it."""
    safe = table.rename(columns=spreadsheet_text)
    for column in safe.columns:
        if any(isinstance(v, str) for v in safe[column]):
            safe[column] = [spreadsheet_text(v) for v in safe[column]]
    return safe


class ResultInUse(RuntimeError):
    """Another run holds the destination's lock."""


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where it lands as Ctrl-C's `KeyboardInterrupt` is (`sigterm_as_interrupt`),
    so the same clean-up runs."""


class ProcessFailed(RuntimeError):
    """Another process of a run on several processes failed (its error is the message)."""


class NotWritten(OSError):
    """A result could not be written (disk full, read-only, ...); nothing was put in place.

    `str()` is the whole message; `errno` is the cause's.
    """

    def __str__(self) -> str:
        return str(self.args[0])


def error_message(exc: Exception) -> str:
    """What a command prints for a user error: for an `OSError` the path, the cause and, where
    known, what to do; for any other (or an `OSError` raised with a message of ours) its
    message. One line, except a list of files, which stays whole."""
    if not isinstance(exc, OSError) or not exc.strerror:
        return str(exc).strip()
    where = exc.filename if exc.filename is not None else "a file"
    fix = FIXES.get(exc.errno, "")
    return f"{where}: {exc.strerror}" + (f": {fix}" if fix else "")


def _not_written(exc: OSError, dest: Path) -> NotWritten:
    """`exc` (one with an errno) as a `NotWritten` naming `dest`, the cause and the fix."""
    cause = exc.strerror or str(exc)
    if exc.filename is not None:
        cause += f" (at {exc.filename})"
    err = NotWritten(f"{dest} was not written: {cause}: "
                     f"{FIXES.get(exc.errno, 'see the cause, and rerun')}")
    err.errno = exc.errno
    return err


def _temp_name(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}-{os.getpid()}"


def _leftovers(dest: Path) -> list[Path]:
    """Temporary folders of runs that stopped without cleaning up (killed, power cut)."""
    name = glob.escape(dest.name)
    return sorted(p for kind in ("tmp", "old") for p in dest.parent.glob(f".{name}.{kind}-*")
                  if p.name.rsplit("-", 1)[1].isdigit())


def _foreign(folder: Path, ours: Collection[str]) -> list[str]:
    """The names in `folder` this tool would not have written."""
    return sorted(p.name for p in folder.iterdir() if p.name not in {*ours, MARKER})


def check_writable(dest: str | Path) -> None:
    """Check that `dest` can be made: the nearest folder above it that exists is a folder
    this process can write in.

    Raises:
        NotADirectoryError: that is a file. PermissionError: it cannot be written in.
    """
    dest = Path(os.path.abspath(Path(dest).expanduser()))
    base = next(p for p in dest.parents if p.exists())
    if not base.is_dir():
        raise NotADirectoryError(f"{base} is a file, so --out {dest} cannot be made: pick "
                                 "another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write in {base}: pick an --out in a folder you can "
                              "write to, or change its permissions")


def check_inputs_outside(paths: Collection[str | Path], dest: str | Path) -> None:
    """Refuse inputs that are `dest` or lie inside it, before any work: a result replaces
    `dest` as a whole, and would delete them (or read its own earlier files).

    Raises:
        ValueError: naming the input and the fix.
    """
    dest = Path(os.path.realpath(Path(dest).expanduser()))
    for p in paths:
        real = Path(os.path.realpath(Path(p).expanduser()))
        if real == dest or dest in real.parents:
            raise ValueError(f"the input {p} lies inside --out {dest}, which a result replaces "
                             "as a whole: pick another --out, or move the input out of it")


def check_destination(dest: str | Path, ours: Collection[str], force: bool = False) -> bool:
    """Check that `dest` can take a result, before any compute; True when it holds one (or
    is an empty folder) to be replaced.

    Args:
        ours: the names a result holds (besides `MARKER`).

    Raises:
        NotADirectoryError: `dest` or a folder above it is a file.
        PermissionError: the folder it would go in cannot be written to.
        FileExistsError: a result is there (without `force`), or files this tool did not write.
    """
    dest = Path(os.path.abspath(Path(dest).expanduser()))
    if not dest.name:
        raise ValueError(f"--out {dest}: pick a folder to write into, not the root")
    if dest.is_symlink():
        raise FileExistsError(f"--out {dest} is a link: pass the folder it points to")
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"--out {dest} is a file: the result is a folder, pick a new "
                                 "folder name")
    check_writable(dest)
    if not dest.is_dir():
        return False
    foreign = _foreign(dest, ours)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
        raise FileExistsError(f"{dest} holds files this tool did not write ({shown}): pick a "
                              "new or empty --out (a result replaces the whole folder)")
    names = {p.name for p in dest.iterdir()}
    if names and not force:
        if MARKER in names:
            raise FileExistsError(f"{dest} holds an earlier result: pick another --out, or add "
                                  "--force to replace it")
        raise FileExistsError(f"{dest} holds an unfinished result (no {MARKER}: a run that "
                              "stopped part way, or an older version): add --force to replace "
                              "it, or remove it")
    return True


HELD_BACK = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back for the block and delivered after it, in the main thread:
    for steps that must not be cut in two (a swap of folders, a clean-up). A Python handler
    of its own records them (a signal mask would not do: torch's threads would take them)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: nothing lands here
        return
    caught = []
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
              for s in HELD_BACK}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not Python's
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)  # now, to the handler it was meant for


def _stop(signum, frame):
    raise Stopped(f"stopped by signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Stopped` (a `KeyboardInterrupt`) for the block, in the main thread: a
    `kill` or a launcher's stop cleans up as Ctrl-C does. Elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _tidy(dest: Path, ours: Collection[str]) -> None:
    """What runs to `dest` that were killed left beside it (called holding its lock, so none
    of them runs). A folder without the marker (provably unfinished) is removed; a complete
    one never: an earlier result that a replace had moved aside is put back when `dest` is
    missing, any other is kept and named. A folder holding files not ours is not touched."""
    for left in _leftovers(dest):
        if not left.is_dir() or left.is_symlink() or _foreign(left, ours):
            continue
        if not (left / MARKER).is_file():
            shutil.rmtree(left)
            print(f"removed {left}, left unfinished by a run that was stopped", file=sys.stderr)
        elif ".old-" in left.name and not os.path.lexists(dest):
            os.rename(left, dest)
            print(f"put back {dest}, the earlier result that a stopped --force replace had "
                  f"moved to {left}", file=sys.stderr)
        else:
            print(f"kept {left}, a complete result a stopped run left beside {dest}: move it "
                  "to keep it, or delete it", file=sys.stderr)


def _install(tmp: Path, dest: Path, replace: bool) -> None:
    """Rename `tmp` to `dest`; an old `dest` is renamed away first and deleted after (its
    marker first: provably unfinished if cut). Ctrl-C and SIGTERM wait until it is done."""
    old = _temp_name(dest, "old")
    with signals_held():
        if replace:
            os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            if replace:
                os.rename(old, dest)  # the old result back in place
            raise
        if replace:
            (old / MARKER).unlink(missing_ok=True)
            shutil.rmtree(old)


_HELD: dict[Path, list] = {}  # lock file: [its FileLock, depth, the thread holding it]


@contextmanager
def holding(dest: str | Path, ours: Collection[str]) -> Iterator[Path]:
    """Hold `dest`'s lock (`.<name>.lock` beside it) for the block: a second run to `dest`
    is refused at once, not after its work. Taken again in the same thread (`written_whole`
    inside), it is the same hold. On taking it, what killed runs left is tidied (`_tidy`).
    The lock file is removed when the block ends, Ctrl-C and SIGTERM held back meanwhile.

    Args:
        ours: the names a result holds (besides `MARKER`): only such folders are tidied.

    Yields:
        `dest` as an absolute path.

    Raises:
        ResultInUse: another run (or another thread) holds it.
        NotADirectoryError, PermissionError: the folder it goes in is a file, or read-only.
    """
    dest = Path(os.path.abspath(Path(dest).expanduser()))
    lock_file = dest.parent / f".{dest.name}.lock"
    held = _HELD.get(lock_file)
    if held is not None and held[2] == threading.get_ident():
        held[1] += 1
        try:
            yield dest
        finally:
            held[1] -= 1
        return
    check_writable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=0)
    try:
        if held is not None:  # another thread of this process
            raise Timeout(str(lock_file))
        lock.acquire()
    except Timeout as exc:
        raise ResultInUse(f"{dest} is in use by another run (it holds {lock_file}): wait for "
                          "it to finish, or pick another --out") from exc
    _HELD[lock_file] = [lock, 1, threading.get_ident()]
    try:
        _tidy(dest, ours)
        yield dest
    finally:
        with signals_held():
            del _HELD[lock_file]
            lock_file.unlink(missing_ok=True)  # while held: filelock retries on an unlinked file
            lock.release()


@contextmanager
def written_whole(dest: str | Path, ours: Collection[str], force: bool = False,
                  by: str = "gradcam-tut") -> Iterator[Path]:
    """A temporary folder to write a result into; renamed to `dest` when the block ends.

    Checks `dest` (`check_destination`) and holds its lock (`holding`; a hold already taken
    by the caller for the whole run is kept). When the block raises (an error, Ctrl-C,
    SIGTERM under `sigterm_as_interrupt`) the temporary folder is deleted and `dest` is left
    as it was.

    Args:
        ours: the names a result holds: with `force`, a folder holding only these is replaced.
        by: who wrote the result, for the marker.

    Raises:
        ResultInUse: another run writes to `dest`.
        NotWritten: an `OSError` while writing (disk full, read-only, ...).
        FileExistsError, NotADirectoryError, PermissionError: see `check_destination`.
    """
    dest = Path(os.path.abspath(Path(dest).expanduser()))
    check_destination(dest, ours, force)
    with holding(dest, ours):
        replace = check_destination(dest, ours, force)  # again: no other run can change it now
        tmp = _temp_name(dest, "tmp")
        try:
            tmp.mkdir()
            yield tmp
            marker = {"by": by, "files": sorted(p.name for p in tmp.iterdir()),
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            _install(tmp, dest, replace)
        except OSError as exc:
            with signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno is None:  # raised with a message of ours
                raise
            raise _not_written(exc, dest) from exc
        except BaseException:
            with signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def written_file(dest: str | Path) -> Iterator[Path]:
    """A temporary path beside `dest` to write one file to; renamed to `dest` when the block
    ends, deleted when it raises. `dest`'s folder is made if missing."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.tmp-{os.getpid()}{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise _not_written(exc, dest) from exc
    finally:
        tmp.unlink(missing_ok=True)
