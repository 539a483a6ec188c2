"""What a test could write into the repository by mistake, read fast enough to compare before
and after a module of tests (data/ holds tens of thousands of images, .venv more)."""

import os
from pathlib import Path


def file_mtimes(root: Path, skip: set[str] = frozenset()) -> dict[str, int]:
    """Every file under `root` (none when it is missing) with its modification time, by path;
    a folder or file named in `skip` is left out, and nothing below such a folder is read.
    Symbolic links to folders are not followed, as `Path.rglob` does not."""
    found, folders = {}, [str(root)] if Path(root).is_dir() else []
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name in skip:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file():
                    found[entry.path] = entry.stat().st_mtime_ns
    return found
