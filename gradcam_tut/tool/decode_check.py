"""The check that every image file decodes fully (truncated, empty, not an image, too many
pixels), on threads, its answer cached per file version.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastprogress.fastprogress import progress_bar
from PIL import Image

from ..images import check_pixels, pixel_budget, shown_size


def cache_dir() -> Path:
    """Where the image check keeps its answers: `$XDG_CACHE_HOME/gradcam_tut` (default
    `~/.cache/gradcam_tut`), read from the environment at each call."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gradcam_tut"


def _decode(f: str) -> tuple[str | None, tuple[int, int] | None]:
    """(None, its size as shown) when `f` decodes fully as an image, else (why not, None)."""
    try:
        with Image.open(f) as im:
            check_pixels(im, f)  # before the pixels: a small file can decode to gigabytes
            im.load()  # the pixels, not only the header: a truncated file fails here
            return None, shown_size(im)
    except Exception as exc:  # any failure to decode is a damaged file
        return f"{type(exc).__name__}: {exc}", None


def decoded(files, n_workers: int | None = None, what: str | None = None) -> dict[str, tuple]:
    """`_decode` of every file, by absolute path, on `n_workers` threads; cached in
    `cache_dir()` under the files' paths, sizes, modification and change times (a file
    rewritten in place with its size and mtime kept still has a new ctime). `what` names the
    files in the line printed before a long check ("648 images and their 648 masks")."""
    files = sorted(os.path.abspath(f) for f in files)
    stats = [(f, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for f in files for st in [os.stat(f)]]
    key = hashlib.sha1(json.dumps(["v3", pixel_budget(), stats]).encode()).hexdigest()
    cached = cache_dir() / "checked" / f"{key}.json"
    if cached.is_file():
        return {f: tuple(v) for f, v in json.loads(cached.read_text()).items()}
    with ThreadPoolExecutor(n_workers or os.cpu_count()) as pool:  # PIL decodes without the GIL
        results = pool.map(_decode, files)
        if len(files) > 1000:  # the full dataset: about a minute, once
            print(f"checking that {what or f'{len(files)} files'} decode (once: the answer is "
                  "cached)")
            results = progress_bar(results, total=len(files), leave=False)
        checked = dict(zip(files, list(results)))  # the bar run to its end: zip stops early
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(f".{os.getpid()}.part")
        part.write_text(json.dumps(checked))
        os.replace(part, cached)  # whole: a notebook running beside never reads half a file
    except OSError:  # a read-only home: check again next time
        pass
    return checked


def damaged_images(files, n_workers: int | None = None) -> dict[Path, str]:
    """Decode every file fully, on `n_workers` threads (default: one per core); return the
    ones that fail, with the reason (truncated, empty, not an image, too many pixels).

    The answer is cached in `cache_dir()` under the files' paths, sizes, modification and
    change times: a second check of the same files reads one small file instead of decoding
    them all, and a file changed in any way is decoded again.
    """
    return {Path(f): why for f, (why, _) in decoded(files, n_workers).items() if why}


def damaged_listing(bad: dict[Path, str]) -> str:
    """"2 damaged files" and one line per file with the reason."""
    return f"{len(bad)} damaged file{'s' * (len(bad) > 1)}" + "".join(
        f"\n  {f}: {why}" for f, why in bad.items())
