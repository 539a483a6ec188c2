"""Grad-CAM by doing it: hooks, per-layer maps in one pass, and plots for fastai learners."""

from importlib import import_module

__version__ = "0.1.0"
_WHERE = {"HookBwd": "hooks", "HookForward": "hooks", "HookForwardMany": "hooks",
          "body_layers": "layers", "channels_last": "layers", "resolve_layers": "layers",
          "vit_reshape": "layers",
          "METHODS": "cam", "class_activation_map": "cam", "contrast_target": "cam",
          "grad_cam": "cam", "normalize_maps": "cam", "target_scores": "cam", "upsample": "cam",
          # fastai: importing `learner` also adds Learner.gradcam and plot_top_losses_gradcam
          "gradcam_grid": "learner", "localization_report": "learner", "mask_dl": "learner"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import torch (and fastai, for `learner`'s names) only when a name that needs it is used:
    `gradcam-tut --help` stays fast."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
