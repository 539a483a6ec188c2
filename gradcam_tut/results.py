"""Results written whole or not at all: a command writes into a temporary folder beside its
destination and renames it into place once every file is in it, with a completion marker.

    explained/                  a finished result: its files and `complete.json`
    .explained.tmp-<pid>/       being written; removed when the write fails
    .explained.lock             held for the run: a second run to the same folder is refused

A folder without the marker is an unfinished result, never taken for a finished one. `force`
replaces a result as a unit (the old one renamed away, the new one renamed in, the old one
deleted), and a folder holding anything this tool did not write is never replaced.
Standard library and `filelock` only: the command line imports it before torch.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

MARKER = "complete.json"
FIXES = {  # what to do about an OSError, by its errno
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


def _remove_leftovers(dest: Path, ours: Collection[str]) -> None:
    """Delete what earlier runs to `dest` left half-done (called while holding the lock)."""
    for left in _leftovers(dest):
        if left.is_dir() and not left.is_symlink() and not _foreign(left, ours):
            shutil.rmtree(left)
            print(f"removed {left}, left unfinished by a run that was stopped", file=sys.stderr)


def _install(tmp: Path, dest: Path, replace: bool) -> None:
    """Rename `tmp` to `dest`; an old `dest` is renamed away first and deleted after."""
    old = _temp_name(dest, "old")
    if replace:
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if replace:
            os.rename(old, dest)  # the old result back in place
        raise
    if replace:
        shutil.rmtree(old)


@contextmanager
def written_whole(dest: str | Path, ours: Collection[str], force: bool = False,
                  by: str = "gradcam-tut") -> Iterator[Path]:
    """A temporary folder to write a result into; renamed to `dest` when the block ends.

    Checks `dest` (`check_destination`) and locks it for the run first. When the block
    raises (an error, Ctrl-C) the temporary folder is deleted and `dest` is left as it was.

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
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_file = dest.parent / f".{dest.name}.lock"
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise ResultInUse(f"{dest} is in use by another run (it holds {lock_file}): wait for "
                          "it to finish, or pick another --out") from exc
    try:
        replace = check_destination(dest, ours, force)  # again: no other run can change it now
        _remove_leftovers(dest, ours)
        tmp = _temp_name(dest, "tmp")
        try:
            tmp.mkdir()
            yield tmp
            marker = {"by": by, "files": sorted(p.name for p in tmp.iterdir()),
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            _install(tmp, dest, replace)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno is None:  # raised with a message of ours
                raise
            raise _not_written(exc, dest) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock_file.unlink(missing_ok=True)  # while held: filelock retries on an unlinked file
        lock.release()


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
