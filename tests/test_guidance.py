"""MaskGuidance: the Grad-CAM mass outside the GT mask, added to the loss and trained through."""

import pytest
import torch
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18

from gradcam_tut import grad_cam, upsample
from gradcam_tut.data import fish_dataloaders
from gradcam_tut.guidance import MaskGuidance, outside_share
from gradcam_tut.hooks import HookForwardMany, hooks_left
from gradcam_tut.metrics import energy_in_mask


def test_outside_share_is_one_minus_energy_in_mask(resnet18, batch):
    targets = torch.tensor([0, 5, 8])
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[:, 10:40, 5:50] = True
    layer = resnet18.layer3
    with HookForwardMany([layer]) as hook:
        logits = resnet18(batch)
    (act,) = hook.stored
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), act)
    (cam,) = grad_cam(resnet18, batch, layer, targets)
    energy = energy_in_mask(upsample(cam, (64, 64)), masks)
    assert (energy > 0).all()
    torch.testing.assert_close(outside_share(act, grad, masks), 1 - energy)


def _fit(mini_root, guidance=None):
    set_seed(0, reproducible=True)
    dls = fish_dataloaders(mini_root, size=32, bs=8, with_masks=True)
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=9,
                           loss_func=CrossEntropyLossFlat(), cbs=guidance)
    learn.fit(1, 1e-3)
    return learn


def test_guidance_trains_through_the_map(mini_root):
    plain_cb = MaskGuidance("layer3", weight=0)
    plain = _fit(mini_root, plain_cb)
    assert plain_cb.penalty is None  # weight 0: nothing computed
    guided_cb = MaskGuidance("layer3", weight=10)
    guided = _fit(mini_root, guided_cb)
    assert 0 <= guided_cb.penalty <= 1
    assert hooks_left(guided.model) == 0
    params = zip(plain.model.parameters(), guided.model.parameters())
    assert any(not torch.equal(p, q) for p, q in params)  # the penalty's gradient arrived
    assert plain.recorder.values[-1][0] != guided.recorder.values[-1][0]  # and its loss


def test_guidance_needs_masks(mini_root):
    dls = fish_dataloaders(mini_root, size=32, bs=8)
    learn = vision_learner(dls, resnet18, pretrained=False, cbs=MaskGuidance())
    with pytest.raises(ValueError, match=r"needs batches of \(image, class, mask\): build the "
                                         r"DataLoaders with fish_dataloaders\(\.\.\., with_masks"):
        learn.fit(1)
    assert hooks_left(learn.model) == 0
