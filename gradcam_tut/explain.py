"""Explain a whole folder: one `grad_cam` pass per batch, a CSV row and the maps per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.transforms import get_image_files
from fastai.learner import Learner
from fastprogress.fastprogress import progress_bar

from .cam import Layer, grad_cam, resolve_layers
from .data import damaged_images, damaged_listing
from .hooks import HookForward
from .plot import class_index, plot_layer_grid

RESULTS = ("explain.csv", "maps.npz", "grids")


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The images named, and those under the folders named (recursively), in that order.

    Raises:
        FileNotFoundError: a path that does not exist, or no image at all.
        ValueError: files that cannot be decoded, all listed.
    """
    files = []
    for p in (Path(p).expanduser() for p in paths):
        if p.is_dir():
            files += sorted(get_image_files(p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no file or folder at {p}")
    if not files:
        raise FileNotFoundError(f"no images in {', '.join(map(str, paths))}: pass image files "
                                "or folders that hold some (.png, .jpg, ...)")
    bad = damaged_images(files)
    if bad:
        raise ValueError(f"{damaged_listing(bad)}\nRemove them or pass the others")
    return files


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
        out: a folder for `explain.csv`, `maps.npz` (one (N, h, w) array per layer, and the
            files) and, with `grids`, `grids/<n>_<image>.png`; an earlier result there is
            replaced only with `force`.

    Returns:
        One row per image: file, predicted class, confidence, target, and each layer's map max.
    """
    out = None if out is None else Path(out)
    if out is not None and not force and any((out / f).exists() for f in RESULTS):
        raise FileExistsError(f"{out} holds an earlier result: pick another --out, or add "
                              "--force to replace it")
    files = image_paths(paths)
    named = resolve_layers(learn.model, layers)
    vocab = learn.dls.vocab
    cls = None if target is None else class_index(vocab, target)
    dl = learn.dls.test_dl(files, bs=bs)
    rows, maps = [], {name: [] for name in named}
    done = 0
    for (xb,) in progress_bar(dl, leave=False):
        with HookForward(learn.model) as logits:  # the forward inside grad_cam
            batch = grad_cam(learn.model, xb, list(named.values()), cls, method=method)
        probs = logits.stored.float().softmax(dim=1).cpu()
        preds = probs.argmax(dim=1).tolist()
        for i, (p, pred) in enumerate(zip(probs, preds)):
            target_i = pred if cls is None else cls
            rows.append({"file": str(files[done + i]), "predicted": vocab[pred],
                         "confidence": float(p[pred]), "target": vocab[target_i],
                         **{f"max_{n}": float(m[i].max()) for n, m in zip(named, batch)}})
        for name, m in zip(named, batch):
            maps[name].append(m.cpu().numpy())
        if grids and out is not None:
            (out / "grids").mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(dl.decode((xb,))[0]):
                row = rows[done + i]
                plot_layer_grid(image, [m[i] for m in batch], titles=list(named),
                                suptitle=f"{row['predicted']} ({row['confidence']:.2f}) · "
                                         f"{method} map for {row['target']}",
                                save=out / "grids" / f"{done + i:05d}_{files[done + i].stem}.png")
        done += len(xb)
    table = pd.DataFrame(rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "explain.csv", index=False)
        np.savez_compressed(out / "maps.npz", files=np.array(table["file"], dtype=str),
                            **{name: np.concatenate(m) for name, m in maps.items()})
    return table
