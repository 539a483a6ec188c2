"""Show the network what we want it to see: a fastai callback that adds the share of the
Grad-CAM map lying outside the ground-truth mask to the training loss ("right for the right
reasons", Ross et al., 2017, with Grad-CAM in place of input gradients)."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from torch import Tensor

from .cam import Layer, resolve_layers, upsample, weighted_map
from .hooks import HookForwardMany


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

    Train on `fish_dataloaders(..., with_masks=True)`: batches of (image, class, mask). Before
    the loss the mask is taken out of `yb`, so any loss function works. On training batches the
    map of the true class comes from the training forward itself: the gradient of the logits is
    taken with `create_graph=True`, so the backward also runs through the map (about one more
    backward per batch). Validation batches, and `weight=0`, get the plain loss.
    `self.penalty` holds the last training batch's mean outside share.
    """

    order = 60  # after fastai's own callbacks have set up the batch (MixedPrecision is 10)

    def __init__(self, layer: Layer = "layer4", weight: float = 1.0):
        self.layer, self.weight, self.hook, self.penalty = layer, weight, None, None

    def before_fit(self):
        (self.module,) = resolve_layers(self.learn.model, self.layer).values()

    def before_batch(self):
        self._drop()  # a hook left by a batch that raised
        if len(self.yb) != 2:
            raise ValueError("MaskGuidance needs batches of (image, class, mask): build the "
                             "DataLoaders with fish_dataloaders(..., with_masks=True)")
        self.masks, self.learn.yb = self.yb[1], self.yb[:1]
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
