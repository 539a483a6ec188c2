"""Full, cpu or smoke settings for a run, decided once, printed with the reason, and written to
a run's `settings.json` for its notebooks to read instead of deciding again.

Full: the real dataset, 224 px, pretrained resnet34, `to_fp16` on a CUDA GPU. Cpu: no CUDA GPU,
but the dataset and the ImageNet weights are here: the pretrained resnet34 fine-tuned on 200
images per class at 160 px, minutes on a laptop. Smoke: 128 px images, a few epochs, random
weights, the mini fish set unless the real one is there (a recipe that trains well on it
within minutes on 2 CPU cores: notebook 01 prints its accuracy); chosen by `smoke=True`, by
`GRADCAM_TUT_SMOKE=1`, or automatically when there is no dataset or no pretrained weights.

`gradcam-tut run` decides once (`run_settings`), writes the file (`RunSettings.save`) and
passes its path to every notebook, whose `run_settings(..., settings=path)` reads it
(`RunSettings.load`); a notebook run by hand, without a file, decides for itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from urllib.request import urlopen

import torch
from fastai.data.core import DataLoaders
from torchvision.models import ResNet34_Weights

from ..fish_layout import ENV_VAR
from .data import DATA_DIR, PROJECT_DIR, find_fish_dataset, fish_dataloaders
from .layout import Layout, scan_layout
from .mini_fish import FULL, is_mini_fish, make_mini_fish
from .results import written_file
from .train import load_fish_learner, train_fish

SMOKE_ENV = "GRADCAM_TUT_SMOKE"
SMOKE_SIZE = 128  # the smallest size at which layer4's map (size / 32) is 4x4
# the project's runs folder: `gradcam-tut run` makes a folder per run in it (runs/latest:
# the newest finished one); a notebook run by hand writes into it directly
RUNS_DIR = PROJECT_DIR / "runs"
MODES = ("smoke", "cpu", "full")
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

    mode: str  # "smoke", "cpu" (pretrained, fine-tuned on a CPU) or "full"
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

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    @cached_property
    def layout(self) -> Layout:
        """What the data folder holds (`scan_layout`), scanned the first time it is asked for and
        then passed down: to `masks`, `dataloaders` and `learner`."""
        return scan_layout(self.data)

    @property
    def masks(self) -> bool:
        """Whether the data has GT masks (the Fish Dataset layout); your own folder has none."""
        return self.layout.masks

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
        return fish_dataloaders(self.layout, **kwargs)

    def trained(self) -> Path:
        """`model_file`, trained now (`train_fish`, these settings) if notebook 01 has not
        exported it."""
        if not self.model_file.is_file():
            print(f"no exported model at {self.model_file}: training one first")
            train_fish(self.layout, epochs=self.epochs, size=self.size, bs=self.bs,
                       pretrained=self.pretrained, lr=self.lr, seed=self.seed,
                       max_per_class=self.max_per_class, export_to=self.model_file)
        return self.model_file

    def learner(self):
        """The learner notebook 01 exported, with its data; trained now if there is none."""
        return load_fish_learner(self.trained(), self.dataloaders())

    def outputs(self) -> tuple[Path, Path]:
        """Where a notebook's trained model and figures go (folders made): `model_file`
        relative to the working folder, as a notebook prints it (no machine paths in its
        outputs), and `out/figures`."""
        figures = self.out / "figures"
        for folder in (self.model_file.parent, figures):
            folder.mkdir(parents=True, exist_ok=True)
        return Path(os.path.relpath(self.model_file)), figures

    def notebook_inputs(self) -> tuple[Path, DataLoaders, Path]:
        """What notebooks 02-05 take from the run: notebook 01's model file (trained here
        first when 01 has not run), the images split as 01 split them, the figures folder."""
        self.trained()
        model_file, figures = self.outputs()
        return model_file, self.dataloaders(), figures

    def line(self) -> str:
        """The one line that says the mode, why, and what it means (printed by `run_settings`)."""
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        return (f"mode: {self.mode} ({self.reason}); data: {shown(self.data)}; {self.size} px, "
                f"{self.epochs} epoch{'s' * (self.epochs != 1)}, "
                f"{'pretrained' if self.pretrained else 'random'} weights; {device}")

    def save(self, path: str | Path) -> Path:
        """Write these settings to `path` as JSON, whole (never half a file under the name),
        its paths absolute: a notebook's kernel runs in another folder. Returns `path`."""
        fields_ = {**asdict(self), "data": str(Path(self.data).resolve()),
                   "out": str(Path(self.out).resolve())}
        with written_file(path) as part:
            part.write_text(json.dumps(fields_, indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RunSettings:
        """The settings `save` wrote to `path`, as they were decided.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: not settings written by `save` (a field missing, unknown or wrong).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no settings file at {path}: `gradcam-tut run` writes one "
                                    "per run (runs/<run>/settings.json); or pass settings=None "
                                    "to decide here")
        try:
            values = json.loads(path.read_text())
            names = {f.name for f in fields(cls)}
            if not isinstance(values, dict) or set(values) - names:
                raise ValueError(f"unknown fields {sorted(set(values) - names)}")
            s = cls(**{**values, "data": Path(values["data"]), "out": Path(values["out"])})
        except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a settings file written by RunSettings.save "
                             f"({type(exc).__name__}: {exc}); run `gradcam-tut run` again, "
                             "or pass settings=None to decide here") from exc
        if s.mode not in MODES:
            raise ValueError(f"{path}: mode {s.mode!r} is none of {', '.join(MODES)}")
        return s


def decide_settings(smoke: bool | None = None, data: str | Path | None = None,
                    out: str | Path | None = None, **overrides) -> RunSettings:
    """Decide full, cpu or smoke settings, and why; `run_settings` also prints them.

    Args:
        smoke: force a mode; None reads `GRADCAM_TUT_SMOKE`, then decides automatically.
        data: the dataset folder; None searches as `find_fish_dataset` does (the mini fish
            set, made if missing, stands in when there is none).
        out: where models and figures go; default the repository's `runs/`.
        overrides: any field of RunSettings (size, epochs, ...); None keeps the mode's value.
    """
    if smoke is None and os.environ.get(SMOKE_ENV, "") != "":
        smoke = env_flag(SMOKE_ENV)
    try:
        found = find_fish_dataset(data)
    except FileNotFoundError:
        if data is not None or os.environ.get(ENV_VAR):  # asked for: never swap in the mini set
            raise
        found = None
    real = None if found is not None and is_mini_fish(found) else found
    dataset = real or (Path(data) if data is not None else found)  # a mini set asked for too
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
        smoke_data = dataset or make_mini_fish(DATA_DIR / "mini_fish",
                                               n_workers=os.cpu_count() or 1)
        s = RunSettings("smoke", ", ".join(reasons), smoke_data, size=SMOKE_SIZE, bs=16,
                        epochs=4, pretrained=False, lr=5e-3,
                        max_per_class=72 if real is not None else None)
    elif cpu:  # fine-tuning ImageNet weights needs few images and epochs: minutes on a CPU
        assert real is not None  # cpu mode: the dataset found (no reason to smoke)
        s = RunSettings("cpu", f"no CUDA GPU, but the dataset and ImageNet weights are here: "
                        f"pretrained resnet34 on {CPU_PER_CLASS} images per class",
                        real, size=CPU_SIZE, bs=32, epochs=1, pretrained=True,
                        max_per_class=CPU_PER_CLASS)
    else:
        s = RunSettings("full", ", ".join(reasons) or "GPU, dataset and weights found",
                        dataset or make_mini_fish(DATA_DIR / "mini_fish_full", FULL),
                        size=224, bs=64, epochs=5, pretrained=True)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(s, out=Path(out) if out is not None else RUNS_DIR, **overrides)


def run_settings(smoke: bool | None = None, data: str | Path | None = None,
                 out: str | Path | None = None, *, settings: str | Path | None = None,
                 **overrides) -> RunSettings:
    """The settings a notebook runs with, the mode and why printed in one line: read from
    `settings` (the run's settings.json, written by `gradcam-tut run`, which decided them
    once), else decided here (`decide_settings`).

    Args:
        smoke, data, out: a notebook's knobs when it is run by hand (see `decide_settings`);
            with `settings` they must be None: the run decided them.
        settings: a file written by `RunSettings.save`; None: decide here.
        overrides: any field of RunSettings (epochs, seed, ...); None keeps the decided value.
            With `settings` too, a value set by hand replaces the run's (06's own seed).

    Raises:
        ValueError: `settings` with `smoke`, `data` or `out` set; a damaged settings file.
    """
    if settings is None:
        s = decide_settings(smoke, data, out, **overrides)
    else:
        knobs = {k: v for k, v in (("smoke", smoke), ("data", data), ("out", out))
                 if v is not None}
        if knobs:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in knobs.items())} and "
                             f"settings={str(settings)!r}: the run decided those in its "
                             "settings file; set them to None, or settings to None to decide "
                             "here")
        s = RunSettings.load(settings)
        s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    print(s.line())
    return s
