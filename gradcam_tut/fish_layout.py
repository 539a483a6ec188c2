"""The Kaggle Fish Dataset's classes and where an image's GT mask lives: facts both the data
checks (`data`) and the synthetic stand-in (`mini_fish`) follow. Standard library only."""

from __future__ import annotations

from pathlib import Path

CLASSES = ("Black Sea Sprat", "Gilt-Head Bream", "Hourse Mackerel", "Red Mullet",
           "Red Sea Bream", "Sea Bass", "Shrimp", "Striped Red Mullet", "Trout")


def mask_file(image_file: str | Path) -> Path:
    """The GT mask of an image: `<Class>/<Class>/x.png` -> `<Class>/<Class> GT/x.png`."""
    f = Path(image_file)
    return f.parent.parent / f"{f.parent.name} GT" / f.name
