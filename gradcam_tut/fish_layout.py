"""The Kaggle Fish Dataset's facts: its classes, where an image's GT mask lives, where to get
it, and the error a folder out of its layout raises. The lesson's `images` and `learner` find
masks by them; the tool's folder checks (`tool.layout`), finding and loading (`tool.data`) and
synthetic stand-in (`tool.mini_fish`) follow them too. Standard library only."""

from __future__ import annotations

from pathlib import Path

CLASSES = ("Black Sea Sprat", "Gilt-Head Bream", "Hourse Mackerel", "Red Mullet",
           "Red Sea Bream", "Sea Bass", "Shrimp", "Striped Red Mullet", "Trout")
KAGGLE_HANDLE = "crowww/a-large-scale-fish-dataset"
ENV_VAR = "FISH_DATASET"
HOW_TO_GET = (
    f"Download {KAGGLE_HANDLE} from Kaggle and unzip it into data/ (giving data/Fish_Dataset), "
    f"or set {ENV_VAR} to where it is, or `pip install kagglehub` with Kaggle credentials "
    "(~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) to download it; "
    "without it, the embedded mini fish set stands in (allow_mini=True)."
)


class DatasetLayoutError(ValueError):
    """The folder is not in the Fish Dataset layout; the message says what is wrong."""


def mask_file(image_file: str | Path) -> Path:
    """The GT mask of an image: `<Class>/<Class>/x.png` -> `<Class>/<Class> GT/x.png`."""
    f = Path(image_file)
    return f.parent.parent / f"{f.parent.name} GT" / f.name
