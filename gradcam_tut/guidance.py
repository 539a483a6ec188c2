"""Show the network what we want it to see, with the GT masks: fastai callbacks for batches of
(image, class, mask) from `fish_dataloaders(..., with_masks=True)`.

- `MaskGuidance` penalises the share of a layer's Grad-CAM map outside the mask ("right for the
  right reasons", Ross et al., 2017, with Grad-CAM in place of input gradients). It moves the
  map; notebook 06 measures that it does not stop the network from using what lies outside.
- `BackgroundSwap` puts each training image's object on another image's background, so that
  nothing outside the mask says which class it is (Xiao et al., 2021, "Noise or Signal: The
  Role of Image Backgrounds in Object Recognition", their Mixed-Rand images). It removes a
  planted shortcut as well as removing the shortcut from the data does (benchmarks/README.md).

Each takes the mask out of `yb` before the loss, so any loss function works; use one of them.
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from torch import Tensor

from .cam import upsample, weighted_map
from .hooks import HookForwardMany
from .layers import Layer, resolve_layers


def take_masks(cb: Callback) -> Tensor:
    """Split a batch's targets (class, mask): the class stays in `yb`, the mask is returned."""
    if len(cb.yb) != 2:
        raise ValueError(f"{type(cb).__name__} needs batches of (image, class, mask): build the "
                         "DataLoaders with fish_dataloaders(..., with_masks=True)")
    masks, cb.learn.yb = cb.yb[1], cb.yb[:1]
    return masks


def outside_share(act: Tensor, grad: Tensor, masks: Tensor) -> Tensor:
    """The share of each image's Grad-CAM map outside its mask, (B,), differentiable.

    Args:
        act, grad: a layer's activations and the gradient of the class score, (B, K, h, w).
        masks: (B, H, W), nonzero on the object; the map is upsampled to it.
    """
    heat = upsample(weighted_map(act, grad), masks.shape[-2:]).flatten(1)
    outside = (heat * ~masks.bool().flatten(1)).sum(dim=1)
    return outside / (heat.sum(dim=1) + 1e-8)


class MaskGuidance(Callback):
    """Add `weight` x the mean share of `layer`'s Grad-CAM map outside the GT mask to the loss.

    On training batches the map of the true class comes from the training forward itself: the
    gradient of the logits is taken with `create_graph=True`, so the backward also runs through
    the map (about one more backward per batch). Validation batches, and `weight=0`, get the
    plain loss. `self.penalty` holds the last training batch's mean outside share.
    """

    order = 60  # after fastai's own callbacks have set up the batch (MixedPrecision is 10)

    def __init__(self, layer: Layer = "layer4", weight: float = 1.0):
        self.layer, self.weight, self.hook, self.penalty = layer, weight, None, None

    def before_fit(self):
        (self.module,) = resolve_layers(self.learn.model, self.layer).values()

    def before_batch(self):
        self._drop()  # a hook left by a batch that raised
        self.masks = take_masks(self)
        if self.training and self.weight:  # weight 0: plain training on masked batches
            self.hook = HookForwardMany([self.module])

    def after_loss(self):
        if self.hook is None:
            return
        (act,) = self.hook.stored
        self._drop()
        score = self.pred.float().gather(1, self.yb[0][:, None].long()).sum()
        (grad,) = torch.autograd.grad(score, act, create_graph=True)
        penalty = outside_share(act.float(), grad.float(), self.masks).mean()
        self.penalty = penalty.detach()
        self.learn.loss_grad = self.loss_grad + self.weight * penalty

    def _drop(self):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    after_cancel_batch = after_fit = _drop


class BackgroundSwap(Callback):
    """Each training image keeps its pixels inside its own mask and its partner's, and takes the
    partner's pixels everywhere else: its object whole, on the partner's background.

    The partner is the image `shift` places further in the (shuffled) batch, `shift` drawn anew
    for each batch, so the background, and whatever it carries (clutter, a watermark, a mark in
    a corner), comes from an image of another, random class, and no longer says which class
    this is. The partner's object does not show: its pixels come from this image. With
    probability `p` per image (1: every image). Validation batches are left as they are.
    """

    order = 55  # after the batch transforms (aug_transforms flips images and masks alike)

    def __init__(self, p: float = 1.0):
        if not 0 <= p <= 1:
            raise ValueError(f"p={p}: the share of images to swap is in 0..1")
        self.p = p

    def before_batch(self):
        masks = take_masks(self)
        (x,) = self.xb  # (B, 3, H, W), masks (B, H, W)
        B = len(x)
        if not self.training or B < 2:
            return
        shift = int(torch.randint(1, B, ()))
        partner = torch.arange(B, device=x.device).roll(shift)
        inside = masks.as_subclass(Tensor).bool()  # a plain tensor: fastai's types clash
        keep = (inside | inside[partner])[:, None]  # (B, 1, H, W)
        swap = (torch.rand(B, device=x.device) < self.p)[:, None, None, None]
        self.learn.xb = (torch.where(keep | ~swap, x, x[partner]),)
