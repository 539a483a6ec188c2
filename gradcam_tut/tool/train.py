"""Train a fastai vision learner on the Fish Dataset: resnet34, `to_fp16` on CUDA, export."""

from __future__ import annotations

import warnings
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401  adds Learner.to_channelslast
import fastai.callback.fp16  # noqa: F401  adds Learner.to_fp16
import fastai.callback.progress  # noqa: F401  progress bars while training
import fastai.callback.schedule  # noqa: F401  adds fine_tune and fit_one_cycle
import torch
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy, error_rate
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from torchvision.models import resnet34

from .data import fish_dataloaders
from .layout import Layout
from .pickle_check import UntrustedFile, check_learner_file, checked_pickle, trusted_pickle


def fp16_wanted(fp16: bool | str = "auto") -> bool:
    """Whether to train with `to_fp16`: on CUDA only, since on a CPU it is a silent no-op.

    Raises:
        ValueError: `fp16=True` without a CUDA GPU.
    """
    if fp16 == "auto":
        return torch.cuda.is_available()
    if fp16 and not torch.cuda.is_available():
        raise ValueError("fp16=True needs a CUDA GPU: on a CPU to_fp16 changes nothing; "
                         "pass fp16='auto' or False")
    return bool(fp16)


def fish_learner(dls, arch=resnet34, pretrained: bool = True, cbs=None) -> tuple[Learner, bool]:
    """`vision_learner(dls, arch, metrics=[accuracy, error_rate])`, and whether it is pretrained.

    When the ImageNet weights cannot be downloaded (offline), warns and starts from random
    weights instead of failing. Batches that also carry masks (`with_masks=True`, for the
    callbacks of `guidance`) get the loss of the class alone.
    """
    targets = len(dls.train_ds.tls) - dls.n_inp  # 2: (class, mask)
    kwargs = {"loss_func": CrossEntropyLossFlat(), "n_out": dls.c} if targets > 1 else {}

    def learner(weights: bool) -> Learner:
        return vision_learner(dls, arch, metrics=[accuracy, error_rate], pretrained=weights,
                              cbs=cbs, **kwargs)

    try:
        return learner(pretrained), pretrained
    except OSError as exc:  # URLError and failed downloads
        if not pretrained:
            raise
        name = getattr(arch, "__name__", arch)  # a timm name is a string; a partial has none
        warnings.warn(f"could not load pretrained {name} weights ({exc}); training "
                      "from random weights (pretrained=False) with twice the epochs", stacklevel=2)
        return learner(False), False


def train_fish(path: str | Path | Layout, arch=resnet34, epochs: int = 5, size: int = 224,
               bs: int = 64, pretrained: bool = True, fp16: bool | str = "auto",
               lr: float | None = None, seed: int = 42, export_to: str | Path | None = None,
               cbs=None, **dls_kwargs) -> Learner:
    """Train `arch` on the Fish Dataset (or your class folders) at `path`, a folder or its
    `Layout`, and return the Learner.

    Everything random is seeded first (`set_seed(seed, reproducible=True)`: the split, the
    shuffling, the augmentation, the head's initial weights), so a rerun on the same machine
    trains the same model. Pretrained: `fine_tune(epochs)` (one frozen epoch, then the whole
    network). From random weights there is nothing to keep frozen: `fit_one_cycle` (twice the
    epochs when the pretrained weights could not be had). `to_fp16()` runs on CUDA; on a CPU it
    would change nothing, so training says fp32 and uses the channels-last memory format, which
    makes the CPU's convolutions faster.

    Args:
        export_to: where `learn.export` writes the learner for `load_learner` (folders made).
        cbs: callbacks for the training only (`guidance.MaskGuidance`, `BackgroundSwap`, with
            `with_masks=True`); removed before the learner is returned and exported.
        dls_kwargs: passed to `fish_dataloaders` (max_per_class, with_masks, num_workers, ...).
    """
    set_seed(seed, reproducible=True)
    dls = fish_dataloaders(path, size=size, bs=bs, seed=seed, **dls_kwargs)
    learn, was_pretrained = fish_learner(dls, arch, pretrained, cbs)
    if fp16_wanted(fp16):
        learn = learn.to_fp16()
        print("precision: mixed, to_fp16 (autocast + GradScaler) on", torch.cuda.get_device_name())
    elif torch.cuda.is_available():
        print("precision: fp32 (fp16=False)")
    else:
        learn = learn.to_channelslast(use_amp=False)
        print("precision: fp32, channels last (no CUDA GPU: to_fp16 would be a silent no-op)")
    if was_pretrained:
        learn.fine_tune(epochs, base_lr=lr or 2e-3)
    else:
        learn.fit_one_cycle(2 * epochs if pretrained else epochs, lr or 2e-3)  # no weights: 2x
    learn.remove_cbs(cbs or [])
    if export_to is not None:
        export_to = Path(export_to).resolve()
        export_to.parent.mkdir(parents=True, exist_ok=True)
        learn.export(export_to)
    return learn


def load_fish_learner(model_file: str | Path, dls=None, trust: bool = False) -> Learner:
    """`load_learner` on the exported file, on the GPU when there is one, checked first.

    Loading a learner unpickles it, and a pickle can run any code it names: the file is
    refused, before anything in it runs, when it would import anything a fastai learner is
    not made of (`pickle_check`). With `dls` (from `fish_dataloaders` with the training seed)
    the learner gets its data back, for `ClassificationInterpretation` and validation images;
    exported learners carry none.

    Args:
        trust: load a file you trust without the check (fastai's own warning then shows).

    Raises:
        FileNotFoundError: no file there.
        UntrustedFile: it would run what a learner does not (a `ValueError`).
        ValueError: it is not a learner saved by `learn.export`.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no exported learner at {model_file}: run notebook 01 "
                                "(or train_fish(..., export_to=...)) first")
    if not trust:
        check_learner_file(model_file)  # its imports, read before anything in it runs
    with warnings.catch_warnings():
        if not trust:  # fastai's "only load files you trust": checked above, and below
            warnings.filterwarnings("ignore", message=".*insecure pickle.*")
        try:
            learn = load_learner(model_file, cpu=not torch.cuda.is_available(),
                                 pickle_module=trusted_pickle if trust else checked_pickle)
        except UntrustedFile as exc:
            raise UntrustedFile(f"{model_file}: {exc}") from exc
        except Exception as exc:  # a pickled dict, a state_dict, a damaged file, ...
            raise ValueError(f"{model_file} is not a learner saved by learn.export "
                             f"({type(exc).__name__}: {exc}); export one with learn.export "
                             "or train_fish(..., export_to=...)") from exc
    if not isinstance(learn, Learner):
        raise ValueError(f"{model_file} holds a {type(learn).__name__}, not a learner: "
                         "export one with learn.export or train_fish(..., export_to=...)")
    if dls is not None:
        learn.dls = dls
    return learn
