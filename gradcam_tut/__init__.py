"""Grad-CAM by doing it: hooks, per-layer maps in one pass, and plots for fastai learners."""

from .cam import body_layers, grad_cam, normalize_maps, resolve_layers, upsample
from .hooks import HookBwd, HookForward, HookForwardMany

__all__ = ["HookBwd", "HookForward", "HookForwardMany", "body_layers", "grad_cam",
           "normalize_maps", "resolve_layers", "upsample"]
__version__ = "0.1.0"
