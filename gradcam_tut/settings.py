"""Full, cpu or smoke settings for a notebook run, decided once and printed with the reason.

Full: the real dataset, 224 px, pretrained resnet34, `to_fp16` on a CUDA GPU. Cpu: no CUDA GPU,
but the dataset and the ImageNet weights are here: the pretrained resnet34 fine-tuned on 200
images per class at 160 px, minutes on a laptop. Smoke: 128 px images, a few epochs, random
weights, the mini fish set unless the real one is there (a recipe measured to pass 0.9
validation accuracy on it within minutes on 2 CPU cores); chosen by `smoke=True`, by
`GRADCAM_TUT_SMOKE=1`, or automatically when there is no dataset or no pretrained weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.request import urlopen

import torch
from torchvision.models import ResNet34_Weights

from .data import (
    DATA_DIR,
    ENV_VAR,
    PROJECT_DIR,
    find_fish_dataset,
    fish_dataloaders,
    is_fish_layout,
    is_mini_fish,
)
from .mini_fish import FULL, make_mini_fish
from .train import load_fish_learner, train_fish

SMOKE_ENV = "GRADCAM_TUT_SMOKE"
SMOKE_SIZE = 128  # the smallest size at which layer4's map (size / 32) is 4x4
RUNS_DIR = PROJECT_DIR / "runs"
CPU_SIZE, CPU_PER_CLASS = 160, 200  # cpu mode: layer4's map is 5x5; ~1,440 training images


def pretrained_weights_available(timeout: float = 3.0) -> bool:
    """ImageNet resnet34 weights in torch's cache, or their URL answering within `timeout`."""
    url = ResNet34_Weights.DEFAULT.url
    if (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]).is_file():
        return True
    try:
        with urlopen(url, timeout=timeout):
            return True
    except OSError:
        return False


def shown(path: Path) -> Path:
    """`path` relative to the project when it lies inside it: printed outputs carry no machine
    paths."""
    try:
        return Path(path).resolve().relative_to(PROJECT_DIR)
    except ValueError:
        return Path(path)


def env_flag(name: str) -> bool:
    """An environment variable read as a yes/no flag: 1/0, true/false, yes/no, on/off.

    Raises:
        ValueError: any other value (a typo must not pick a mode silently).
    """
    value = os.environ[name].strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{name}={os.environ[name]!r}: use 1/0, true/false, yes/no or on/off")
    return value in ("1", "true", "yes", "on")


@dataclass
class RunSettings:
    """What a notebook runs with; `out` holds the exported model and the figures."""

    smoke: bool
    reason: str
    data: Path
    size: int
    bs: int
    epochs: int
    pretrained: bool
    lr: float | None = None
    max_per_class: int | None = None
    seed: int = 42
    out: Path = field(default=RUNS_DIR)
    mode: str = "full"  # "smoke", "cpu" (pretrained, fine-tuned on a CPU) or "full"

    @property
    def masks(self) -> bool:
        """Whether the data has GT masks (the Fish Dataset layout); your own folder has none."""
        return is_fish_layout(self.data)

    def require_masks(self, what: str) -> None:
        """Stop with one clear line when `what` needs masks and the data has none."""
        if not self.masks:
            raise ValueError(f"{what} measures maps against GT masks, and {self.data} has none: "
                             "it needs the Fish Dataset layout (<Class>/<Class> GT/*.png); "
                             "`gradcam-tut run` skips it for data without masks")

    @property
    def model_file(self) -> Path:
        return self.out / "models" / "fish_resnet34.pkl"

    def figure(self, name: str) -> Path:
        """Path of a PNG under `out/figures/` (folder made)."""
        (self.out / "figures").mkdir(parents=True, exist_ok=True)
        return self.out / "figures" / name

    def dataloaders(self, **kwargs):
        """`fish_dataloaders` with these settings (the same split as training)."""
        kwargs = {"size": self.size, "bs": self.bs, "seed": self.seed,
                  "max_per_class": self.max_per_class, **kwargs}
        return fish_dataloaders(self.data, **kwargs)

    def train(self, **kwargs):
        """`train_fish` with these settings, exported to `model_file`."""
        return train_fish(self.data, epochs=self.epochs, size=self.size, bs=self.bs,
                          pretrained=self.pretrained, lr=self.lr, seed=self.seed,
                          max_per_class=self.max_per_class, export_to=self.model_file, **kwargs)

    def learner(self):
        """The learner notebook 01 exported, with its data; trained now if there is none."""
        if not self.model_file.is_file():
            print(f"no exported model at {self.model_file}: training one first")
            self.train()
        return load_fish_learner(self.model_file, self.dataloaders())


def run_settings(smoke: bool | None = None, data: str | Path | None = None,
                 out: str | Path | None = None, **overrides) -> RunSettings:
    """Decide full or smoke settings, print which and why, and return them.

    Args:
        smoke: force a mode; None reads `GRADCAM_TUT_SMOKE`, then decides automatically.
        data: the dataset folder; None searches as `find_fish_dataset` does.
        out: where models and figures go; default the repository's `runs/`.
        overrides: any field of RunSettings (size, epochs, ...); None keeps the mode's value.
    """
    if smoke is None and os.environ.get(SMOKE_ENV, "") != "":
        smoke = env_flag(SMOKE_ENV)
    try:
        real = find_fish_dataset(data)
    except FileNotFoundError:
        if data is not None or os.environ.get(ENV_VAR):  # asked for: never swap in the mini set
            raise
        real = None
    real = None if real is not None and is_mini_fish(real) else real
    dataset = real or (Path(data) if data is not None else None)
    reasons, cuda, cpu = [], torch.cuda.is_available(), False
    if smoke is None:
        if real is None:
            reasons.append("no Fish Dataset found")
        elif not pretrained_weights_available():
            reasons.append("no pretrained weights")
        if reasons and not cuda:
            reasons.insert(0, "no CUDA GPU")
        smoke, cpu = bool(reasons), not reasons and not cuda
    else:
        reasons.append(f"asked for {'smoke' if smoke else 'full'}")
    if smoke:
        smoke_data = dataset or make_mini_fish(DATA_DIR / "mini_fish", n_workers=os.cpu_count())
        s = RunSettings(True, ", ".join(reasons), smoke_data, size=SMOKE_SIZE, bs=16, epochs=4,
                        pretrained=False, lr=5e-3,
                        max_per_class=72 if real is not None else None, mode="smoke")
    elif cpu:  # fine-tuning ImageNet weights needs few images and epochs: minutes on a CPU
        s = RunSettings(False, f"no CUDA GPU, but the dataset and ImageNet weights are here: "
                        f"pretrained resnet34 on {CPU_PER_CLASS} images per class",
                        dataset, size=CPU_SIZE, bs=32, epochs=1, pretrained=True,
                        max_per_class=CPU_PER_CLASS, mode="cpu")
    else:
        s = RunSettings(False, ", ".join(reasons) or "GPU, dataset and weights found",
                        dataset or make_mini_fish(DATA_DIR / "mini_fish_full", FULL),
                        size=224, bs=64, epochs=5, pretrained=True)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    s = replace(s, out=Path(out) if out is not None else RUNS_DIR, **overrides)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"mode: {s.mode} ({s.reason}); data: {shown(s.data)}; {s.size} px, {s.epochs} "
          f"epoch{'s' * (s.epochs != 1)}, {'pretrained' if s.pretrained else 'random'} "
          f"weights; {device}")
    return s
