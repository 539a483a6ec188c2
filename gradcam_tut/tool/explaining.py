"""Explain a whole folder: one `grad_cam` pass per batch, a CSV row and the maps per image.

Under `accelerate launch --num_processes N` (or `torchrun --nproc_per_node N`: both set RANK and
WORLD_SIZE) each process explains every N-th image, on its own GPU when there are GPUs, and
the first process writes the one result, the same as one process would (`process_group`).
The first error on any process ends every one at the next exchange (`agreed`), the first
process says it in one line, and nothing is left behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from fastai.learner import Learner
from fastprogress.fastprogress import progress_bar
from torch import Tensor
from torch.nn import Module

from ..cam import Layer, class_index, grad_cam, resolve_layers
from ..plot import plot_layer_grid
from .decode_check import damaged_images, damaged_listing
from .layout import listed_images
from .results import (
    ProcessFailed,
    check_destination,
    check_inputs_outside,
    error_message,
    formula_safe,
    holding,
    written_whole,
)

RESULTS = ("explain.csv", "maps.npz", "grids")


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The images named, and those under the folders named (recursively), in that order.

    Raises:
        FileNotFoundError: a path that does not exist, or no image at all.
        ValueError: files that cannot be decoded, all listed.
    """
    files = list(listed_images(paths))  # each real file once; masks and results left out
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(map(str, paths))}: pass image files "
                                "or folders that hold some (.png, .jpg, ...)")
    bad = damaged_images(files)
    if bad:
        raise ValueError(f"{damaged_listing(bad)}\nRemove them or pass the others")
    return files


def csv_safe(files: Sequence[Path]) -> None:
    """Check that every file name can be written to a CSV (UTF-8) before any compute.

    Raises:
        ValueError: a name that is not valid UTF-8 (a Latin-1 name on a UTF-8 system).
    """
    for f in files:
        try:
            str(f).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the file name {ascii(str(f))} is not UTF-8, so explain.csv "
                             "cannot hold it: rename the file (e.g. `convmv -f latin1 -t utf8`) "
                             "or leave it out") from exc


LAUNCHED_BY = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK")  # what torchrun sets


def process_group() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) alone. Under `accelerate
    launch` or `torchrun` torch.distributed is started (gloo: what is gathered are CPU
    objects), and each process takes its own GPU (LOCAL_RANK) when there are GPUs.

    Raises:
        ValueError: WORLD_SIZE set by hand, without a launcher's rendezvous (or it failed).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 0, 1
    if not dist.is_initialized():
        how = (f"run `torchrun --nproc_per_node {world} -m gradcam_tut.tool.cli ...` or "
               f"`accelerate launch --num_processes {world} -m gradcam_tut.tool.cli ...`, or "
               "unset WORLD_SIZE and RANK to run one process")
        unset = [name for name in LAUNCHED_BY if not os.environ.get(name)]
        if unset:
            raise ValueError(f"WORLD_SIZE={world} is set but not {', '.join(unset)}: the "
                             f"processes were not started together by a launcher: {how}")
        try:
            dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as exc:  # DistNetworkError, a port taken, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"the {world} processes could not meet ({first}): {how}") from exc
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def agreed(error: Exception | None, value=None, world: int = 1) -> list:
    """Every process's `value` once each has reached this point, or the first error on any:
    then every process stops here, the first raising its own error or `ProcessFailed` with
    the failing process's message (it speaks for all: `cli.speaks`), the others
    `ProcessFailed`. Alone: `[value]`, or `error` raised.

    Args:
        error: what this process raised since the last exchange, or None.

    Raises:
        ProcessFailed: a process failed, or stopped without a word (killed).
    """
    if world < 2:
        if error is not None:
            raise error
        return [value]
    said = None
    if error is not None:
        said = (error_message(error) if isinstance(error, (OSError, ValueError, RuntimeError))
                else f"{type(error).__name__}: {error}")
    parts: list[Any] = [None] * world  # each process's (message, value)
    try:
        dist.all_gather_object(parts, (said, None if error else value))
    except RuntimeError as exc:  # gloo: a peer closed its connection
        raise ProcessFailed(f"another of the {world} processes stopped without a word ("
                            f"{str(exc).strip().splitlines()[0]}): see its output") from exc
    if error is not None and dist.get_rank() == 0:
        raise error
    for rank, (message, _) in enumerate(parts):
        if message is not None:
            raise ProcessFailed(f"process {rank} of {world}: {message}") from error
    return [v for _, v in parts]


def is_main_process() -> bool:
    """Whether this process is the one that writes and prints (the only one, or rank 0)."""
    return os.environ.get("RANK", "0") == "0"


def on_this_process(learn: Learner, files: Sequence[Path]) -> tuple[int, int]:
    """`process_group()`, with the learner moved to this process's GPU when there are several
    processes and GPUs; this process explains `files[rank::world]`.

    Raises:
        ValueError: fewer files than processes.
    """
    rank, world = process_group()
    if len(files) < world:
        raise ValueError(f"{len(files)} images for {world} processes: run fewer processes "
                         "than images")
    if world > 1 and torch.cuda.is_available():
        learn.dls.to(torch.device("cuda", torch.cuda.current_device()))
        learn.model.to(learn.dls.device)
    return rank, world


def gathered(table: pd.DataFrame, maps: dict[str, np.ndarray], world: int,
             error: Exception | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Every process's rows and maps in the order of the files (process r had files r,
    r + world, ...); alone, as they are. `error`: this process's, instead (see `agreed`)."""
    parts = agreed(error, (table, maps), world)
    if world < 2:
        return table, maps
    sizes = [len(t) for t, _ in parts]
    order = np.concatenate([np.arange(r, r + world * n, world) for r, n in enumerate(sizes)])
    back = np.argsort(order)
    table = pd.concat([t for t, _ in parts], ignore_index=True).iloc[back]
    return table.reset_index(drop=True), {
        name: np.concatenate([m[name] for _, m in parts])[back] for name in maps}


def explain(learn: Learner, paths: Sequence[str | Path], layers: Sequence[Layer] | None = None,
            target: int | str | None = None, method: str = "gradcam", bs: int = 16,
            out: str | Path | None = None, grids: bool = False,
            force: bool = False) -> pd.DataFrame:
    """Grad-CAM maps for every image in `paths` (files and folders), a batch at a time.

    Each batch goes through the learner's validation transforms (`learn.dls.test_dl`) and
    one `grad_cam` pass for all layers, which also gives the predictions (no second forward).
    On several processes (see the module) each explains its share and every process returns
    the whole table; the first writes `out`.

    Args:
        layers: default every layer of `body_layers(learn)`.
        target: a class name or index for every image; default each image's prediction.
        bs: images per pass, at least 1.
        out: a folder for `explain.csv`, `maps.npz` (one (N, h, w) array per layer, and the
            files) and, with `grids`, `grids/<n>_<image>.png`. Written whole or not at all
            (`results.written_whole`): an earlier result there is replaced, as a whole, only
            with `force`; its lock is held from start to end (`results.holding`), so a
            second run to the same folder is refused at once while this one runs.

    Returns:
        One row per image: file, predicted class, confidence, target, and each layer's map max.

    Raises:
        ValueError: `bs` < 1, `grids` without `out`, a file name a CSV cannot hold, fewer
            images than processes.
        FileExistsError: an earlier result in `out` (without `force`), or files not ours.
        ResultInUse: another run writes to `out`.
        NotWritten: the disk is full or read-only; `out` is left as it was.
        ProcessFailed: another process failed (its error is the message).
    """
    if bs < 1:
        raise ValueError(f"bs={bs!r}: pass a batch size of at least 1 (images per pass)")
    if grids and out is None:
        raise ValueError("grids=True needs an out folder to write the grids into: pass out=")
    rank, world = process_group()  # first: on several processes, the first one holds `out`
    writes = out if rank == 0 else None  # the folder this process writes, or None
    with holding(writes, RESULTS) if writes is not None else nullcontext():  # start to end
        if out is not None:
            check_inputs_outside(paths, out)  # --force would delete them
        if writes is not None:
            check_destination(writes, RESULTS, force)  # before listing, decoding every image
        named = resolve_layers(learn.model, layers)  # so are a wrong layer or class
        cls = None if target is None else class_index(learn.dls.vocab, target)
        files = image_paths(paths)
        if out is not None:
            csv_safe(files)
        rank, world = on_this_process(learn, files)
        with ExitStack() as stack:
            tmp, error = None, None
            try:
                if writes is not None:
                    tmp = stack.enter_context(written_whole(writes, RESULTS, force,
                                                            by="gradcam-tut explain"))
            except Exception as exc:
                error = exc
            tmp = agreed(error, tmp, world)[0]  # every process draws into the first's folder
            part: tuple[Any, Any] = (None, None)  # (table, maps); on an error `gathered` raises
            error = None
            try:
                part = explain_maps(learn, files[rank::world], named, cls, method, bs,
                                    tmp / "grids" if grids else None,
                                    range(rank, len(files), world))
            except Exception as exc:
                error = exc
            table, maps = gathered(*part, world, error)  # after every grid is drawn
            if writes is not None:
                formula_safe(table).to_csv(tmp / "explain.csv", index=False)  # no formulas
                np.savez_compressed(tmp / "maps.npz", files=np.array(table["file"], dtype=str),
                                    **cast(dict[str, Any], maps))  # by layer name
    return table


def grid_name(number: int, image: Path, limit: int = 255) -> str:
    """`<number>_<image>.png`, the image's name cut to fit a file name of `limit` bytes
    (the number keeps cut names apart)."""
    prefix, suffix = f"{number:05d}_", ".png"
    room = limit - len(prefix) - len(suffix)
    return prefix + image.stem.encode()[:room].decode("utf-8", "ignore") + suffix


def explain_maps(learn: Learner, files: Sequence[Path], named: dict[str, Module],
                 target: int | None = None, method: str = "gradcam", bs: int = 16,
                 grids: Path | None = None, numbers: Sequence[int] | None = None,
                 keep: Callable[[Tensor, Tensor, list[Tensor]], dict[str, np.ndarray]]
                 | None = None) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The model pass of `explain`, on one process, writing nothing but `grids`.

    Args:
        named: the layers, `{name: module}` (`cam.resolve_layers`).
        target: a class index for every image; None: each image's prediction.
        grids: a folder for a grid PNG per image, `<number>_<image>.png`.
        numbers: the images' numbers in those names; default 0, 1, ...
        keep: also keep, for each batch, what `keep(batch, shown, maps)` returns (the inputs as
            the network saw them, as decoded, and the layers' maps): {name: (b, ...) array},
            beside the layers' maps under each name (what the audit needs of every image,
            without decoding it twice).

    Returns:
        The table (file, predicted, confidence, target, each layer's map max) and each
        layer's maps, (N, h, w), both in the order of `files`.
    """
    vocab = learn.dls.vocab
    numbers = list(range(len(files)) if numbers is None else numbers)
    dl = learn.dls.test_dl(files, bs=bs)
    rows: list[dict[str, Any]] = []
    maps: dict[str, list[np.ndarray]] = {name: [] for name in named}
    kept: dict[str, list[np.ndarray]] = {}
    done = 0
    for (xb,) in progress_bar(dl, leave=False):
        batch, logits = cast(tuple[list[Tensor], Tensor], grad_cam(
            learn.model, xb, list(named.values()), target, method=method,
            return_logits=True))  # the predictions of the same pass
        probs = logits.float().softmax(dim=1).cpu()
        preds = probs.argmax(dim=1).tolist()
        for i, (p, pred) in enumerate(zip(probs, preds)):
            target_i = pred if target is None else target
            rows.append({"file": str(files[done + i]), "predicted": vocab[pred],
                         "confidence": float(p[pred]), "target": vocab[target_i],
                         **{f"max_{n}": float(m[i].max()) for n, m in zip(named, batch)}})
        for name, m in zip(named, batch):
            maps[name].append(m.cpu().numpy())
        if keep is not None or grids is not None:
            shown = dl.decode((xb,))[0]  # the pictures as decoded, once for both
        if keep is not None:
            for name, part in keep(xb.as_subclass(Tensor), shown.as_subclass(Tensor),
                                   batch).items():
                kept.setdefault(name, []).append(part)
        if grids is not None:
            grids.mkdir(exist_ok=True)
            for i, image in enumerate(shown):
                row = rows[done + i]
                plot_layer_grid(image, [m[i] for m in batch], titles=list(named),
                                suptitle=f"{row['predicted']} ({row['confidence']:.2f}) · "
                                         f"{method} map for {row['target']}",
                                save=grids / grid_name(numbers[done + i], files[done + i]))
        done += len(xb)
    out = {name: np.concatenate(m) for name, m in (maps | kept).items()}
    return pd.DataFrame(rows), out
