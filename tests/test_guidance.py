"""MaskGuidance: the Grad-CAM mass outside the GT mask, added to the loss and trained through."""

from pathlib import Path

import pytest
import torch
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from fastai.vision.learner import vision_learner
from notebook_code import definitions, notebook_definitions
from torchvision.models import resnet18

from gradcam_tut import grad_cam, upsample
from gradcam_tut.guidance import MaskGuidance, outside_share
from gradcam_tut.hooks import HookForwardMany, hooks_left
from gradcam_tut.metrics import energy_in_mask
from gradcam_tut.tool.data import fish_dataloaders


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


@pytest.mark.slow
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


def test_notebook_06_writes_the_package_code():
    """Notebook 06 writes take_masks, outside_share, MaskGuidance and BackgroundSwap in front
    of the reader; their code must stay gradcam_tut.guidance's (docstrings aside)."""
    import gradcam_tut.guidance as guidance

    in_notebook = notebook_definitions("06_catching_a_shortcut.ipynb")
    in_package = definitions(Path(guidance.__file__).read_text())
    for name in ("take_masks", "outside_share", "MaskGuidance", "BackgroundSwap"):
        assert in_notebook[name] == in_package[name], f"notebook 06's {name} drifted"


def _swapped(x, y, m, p=1.0, training=True):
    """BackgroundSwap's before_batch on one batch, through a learner that only holds it."""
    from fastai.learner import Learner
    from torch import nn

    from gradcam_tut.guidance import BackgroundSwap

    learn = Learner(None, nn.Identity(), loss_func=nn.CrossEntropyLoss(), cbs=BackgroundSwap(p))
    learn.xb, learn.yb, learn.training = (x,), (y, m), training
    torch.manual_seed(0)
    learn.background_swap.before_batch()
    return learn.xb[0], learn.yb


def test_background_swap_keeps_the_object_on_the_partners_background():
    torch.manual_seed(1)
    B, H, W = 4, 8, 8
    x, y = torch.randn(B, 3, H, W), torch.arange(B)
    m = torch.zeros(B, H, W, dtype=torch.long)
    for i in range(B):
        m[i, i:i + 3, 2 * i:2 * i + 2] = 1  # each object somewhere else
    out, yb = _swapped(x, y, m)
    assert len(yb) == 1 and torch.equal(yb[0], y)  # the mask is out of the targets
    torch.manual_seed(0)
    shift = int(torch.randint(1, B, ()))
    partner = torch.arange(B).roll(shift)
    for i in range(B):
        j = int(partner[i])
        assert j != i
        keep = (m[i] | m[j]).bool()
        assert torch.equal(out[i][:, keep], x[i][:, keep])  # its object; no partner's object
        assert torch.equal(out[i][:, ~keep], x[j][:, ~keep])  # the partner's background


def test_background_swap_leaves_validation_and_p0_alone():
    x, y, m = torch.randn(4, 3, 8, 8), torch.arange(4), torch.zeros(4, 8, 8)
    for kwargs in ({"training": False}, {"p": 0.0}):
        out, yb = _swapped(x, y, m, **kwargs)
        assert torch.equal(out, x) and len(yb) == 1
    with pytest.raises(ValueError, match=r"p=2: the share of images to swap is in 0\.\.1"):
        from gradcam_tut.guidance import BackgroundSwap

        BackgroundSwap(2)


@pytest.mark.slow
def test_train_fish_with_background_swap(mini_root, tmp_path):
    """A training with the callback: batches carry masks, the exported learner does not."""
    from gradcam_tut.guidance import BackgroundSwap
    from gradcam_tut.tool.train import load_fish_learner, train_fish

    learn = train_fish(mini_root, arch=resnet18, epochs=1, size=32, bs=8, pretrained=False,
                       cbs=[BackgroundSwap()], with_masks=True, export_to=tmp_path / "m.pkl")
    assert not any(isinstance(cb, BackgroundSwap) for cb in learn.cbs)
    loaded = load_fish_learner(tmp_path / "m.pkl")
    assert not any(isinstance(cb, BackgroundSwap) for cb in loaded.cbs)
    preds, _ = loaded.get_preds(dl=loaded.dls.test_dl(learn.dls.valid_ds.items[:3]))
    assert preds.shape == (3, 9) and hooks_left(learn.model) == 0
