"""Explain a whole folder: one `grad_cam` pass per batch, a CSV row and the maps per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.learner import Learner
from fastprogress.fastprogress import progress_bar
from torch.nn import Module

from .cam import Layer, class_index, grad_cam, resolve_layers
from .data import damaged_images, damaged_listing, listed_images
from .plot import plot_layer_grid
from .results import check_destination, written_whole

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


def explain(learn: Learner, paths: Sequence[str | Path], layers: Sequence[Layer] | None = None,
            target: int | str | None = None, method: str = "gradcam", bs: int = 16,
            out: str | Path | None = None, grids: bool = False,
            force: bool = False) -> pd.DataFrame:
    """Grad-CAM maps for every image in `paths` (files and folders), a batch at a time.

    Each batch goes through the learner's validation transforms (`learn.dls.test_dl`) and
    one `grad_cam` pass for all layers, which also gives the predictions (no second forward).

    Args:
        layers: default every layer of `body_layers(learn)`.
        target: a class name or index for every image; default each image's prediction.
        bs: images per pass, at least 1.
        out: a folder for `explain.csv`, `maps.npz` (one (N, h, w) array per layer, and the
            files) and, with `grids`, `grids/<n>_<image>.png`. Written whole or not at all
            (`results.written_whole`): an earlier result there is replaced, as a whole, only
            with `force`; a second run to the same folder is refused while this one runs.

    Returns:
        One row per image: file, predicted class, confidence, target, and each layer's map max.

    Raises:
        ValueError: `bs` < 1, `grids` without `out`, a file name a CSV cannot hold.
        FileExistsError: an earlier result in `out` (without `force`), or files not ours.
        ResultInUse: another run writes to `out`.
        NotWritten: the disk is full or read-only; `out` is left as it was.
    """
    if bs < 1:
        raise ValueError(f"bs={bs!r}: pass a batch size of at least 1 (images per pass)")
    if grids and out is None:
        raise ValueError("grids=True needs an out folder to write the grids into: pass out=")
    if out is not None:
        check_destination(out, RESULTS, force)  # before listing and decoding every image
    files = image_paths(paths)
    named = resolve_layers(learn.model, layers)
    cls = None if target is None else class_index(learn.dls.vocab, target)
    if out is None:
        return _explain_batches(learn, files, named, cls, method, bs)[0]
    csv_safe(files)
    with written_whole(out, RESULTS, force, by="gradcam-tut explain") as tmp:
        table, maps = _explain_batches(learn, files, named, cls, method, bs,
                                       tmp / "grids" if grids else None)
        table.to_csv(tmp / "explain.csv", index=False)
        np.savez_compressed(tmp / "maps.npz", files=np.array(table["file"], dtype=str),
                            **{name: np.concatenate(m) for name, m in maps.items()})
    return table


def _explain_batches(learn: Learner, files: list[Path], named: dict[str, Module],
                     cls: int | None, method: str, bs: int, grids: Path | None = None
                     ) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """The table and each layer's maps (a (b, h, w) array per batch); grid PNGs to `grids`."""
    vocab = learn.dls.vocab
    dl = learn.dls.test_dl(files, bs=bs)
    rows, maps = [], {name: [] for name in named}
    done = 0
    for (xb,) in progress_bar(dl, leave=False):
        batch, logits = grad_cam(learn.model, xb, list(named.values()), cls, method=method,
                                 return_logits=True)  # the predictions of the same pass
        probs = logits.float().softmax(dim=1).cpu()
        preds = probs.argmax(dim=1).tolist()
        for i, (p, pred) in enumerate(zip(probs, preds)):
            target_i = pred if cls is None else cls
            rows.append({"file": str(files[done + i]), "predicted": vocab[pred],
                         "confidence": float(p[pred]), "target": vocab[target_i],
                         **{f"max_{n}": float(m[i].max()) for n, m in zip(named, batch)}})
        for name, m in zip(named, batch):
            maps[name].append(m.cpu().numpy())
        if grids is not None:
            grids.mkdir(exist_ok=True)
            for i, image in enumerate(dl.decode((xb,))[0]):
                row = rows[done + i]
                plot_layer_grid(image, [m[i] for m in batch], titles=list(named),
                                suptitle=f"{row['predicted']} ({row['confidence']:.2f}) · "
                                         f"{method} map for {row['target']}",
                                save=grids / f"{done + i:05d}_{files[done + i].stem}.png")
        done += len(xb)
    return pd.DataFrame(rows), maps
