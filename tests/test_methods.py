"""The other CAMs from the same pass, and transformers' tokens laid back on a grid; checked
against pytorch-grad-cam's implementations and captum."""

import numpy as np
import pytest
import torch
from captum.attr import LayerGradientXActivation
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision.models import SwinTransformer, VisionTransformer

from gradcam_tut import body_layers, grad_cam, upsample
from gradcam_tut.cam import METHODS
from gradcam_tut.layers import channels_last, default_reshape, vit_reshape

TARGETS = [0, 5, 8]
PGC = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
       "xgradcam": XGradCAM, "layercam": LayerCAM}


def _minmax(m, dims=(-2, -1)):
    m = m - m.amin(dims, keepdim=True)
    return m / (1e-7 + m.amax(dims, keepdim=True))


def _pgc(method, model, layer, x, reshape=None):
    with PGC[method](model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in TARGETS])


def _scaled(m, size):
    """Ours as pytorch-grad-cam shows it: min-max scaled, resized to the input, scaled again."""
    return _minmax(upsample(_minmax(m), size)).numpy()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_equals_pytorch_grad_cam_at_every_layer(method, resnet18, batch):
    """All 8 layers from one pass, against pytorch-grad-cam run once per layer.

    Where they differ by design: bn1. pytorch-grad-cam keeps bn1's output without a clone, so
    the in-place ReLU after it overwrites the activation it stored: its bn1 map is built from
    ReLU(bn1), ours (a clone) from bn1. The element-wise methods still agree there: the gradient
    is 0 exactly where the ReLU changed the activation, so G * A is the same.
    """
    layers = body_layers(resnet18)
    maps = grad_cam(resnet18, batch, list(layers.values()), TARGETS, method=method)
    every = grad_cam(resnet18, batch, list(layers.values()), TARGETS, method=list(METHODS))
    assert list(every) == list(METHODS)
    for m, same in zip(maps, every[method]):  # the same maps when all come from one pass
        torch.testing.assert_close(m, same, rtol=0, atol=0)
    for (name, layer), m in zip(layers.items(), maps):
        ref = _pgc(method, resnet18, layer, batch)
        ours = _scaled(m, batch.shape[-2:])
        if name == "bn1" and method not in ("hirescam", "layercam"):
            assert np.abs(ours - ref).max() > 0.1, name
        else:
            assert m.amax() > 0, name  # a real comparison, not zeros against zeros
            # XGradCAM divides by each channel's activation sum, which for conv1's signed
            # outputs comes near 0: float32 sums in another order then differ by up to 1e-4
            atol = 1e-4 if method == "xgradcam" else 1e-5
            np.testing.assert_allclose(ours, ref, atol=atol, err_msg=f"{method} {name}")


def test_hirescam_equals_captum_gradient_x_activation(resnet18, batch):
    """HiResCAM is ReLU of gradient x activation summed over channels: captum's own pieces."""
    layers = body_layers(resnet18)
    maps = grad_cam(resnet18, batch, list(layers.values()), TARGETS, method="hirescam")
    for (name, layer), m in zip(layers.items(), maps):
        gxa = LayerGradientXActivation(resnet18, layer).attribute(batch, TARGETS)
        torch.testing.assert_close(m, gxa.sum(1).relu(), rtol=1e-4, atol=1e-6, msg=name)


def test_methods_by_hand():
    """One channel, 2x2 activations and gradients: every weighting computed on paper."""
    A = torch.tensor([[1.0, 2.0], [3.0, 0.0]])[None, None]
    G = torch.tensor([[0.5, -1.0], [2.0, 0.0]])[None, None]
    want = {
        "gradcam": 0.375 * A,  # mean gradient (0.5 - 1 + 2 + 0) / 4
        "hirescam": torch.tensor([[0.5, -2.0], [6.0, 0.0]]),
        "layercam": torch.tensor([[0.5, 0.0], [6.0, 0.0]]),
        "xgradcam": (0.5 - 2 + 6) / (6 + 1e-7) * A,
        # alpha = g^2 / (2 g^2 + sum(A) g^3): 0.25 / 1.25 at g=0.5, 4 / 56 at g=2, 0 at g=0
        "gradcam++": (0.25 / (0.5 + 0.75 + 1e-6) * 0.5 + 4 / (8 + 48 + 1e-6) * 2) * A,
    }
    for method, weigh in METHODS.items():
        torch.testing.assert_close(weigh(A, G)[0, 0], want[method].reshape(2, 2), msg=method)


def test_unknown_method(resnet18, batch):
    with pytest.raises(ValueError, match="method 'scorecam' is not one of .*'gradcam'"):
        grad_cam(resnet18, batch, "layer4", method="scorecam")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(3)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=9).eval()


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(4)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                           window_size=[4, 4], num_classes=9).eval()


def test_vit_tokens_go_back_where_the_patches_were(vit):
    """The patch tokens come from conv_proj's (B, C, 4, 4) map, flattened row by row."""
    x = torch.randn(2, 3, 32, 32)
    grid = vit.conv_proj(x)
    tokens = torch.cat([torch.zeros(2, 1, 16), vit._process_input(x)], dim=1)  # + class token
    torch.testing.assert_close(vit_reshape(tokens), grid)
    with pytest.raises(ValueError, match="do not make a square grid: pass prefix="):
        vit_reshape(tokens, prefix=2)


def _pgc_vit_reshape(t, side=4):  # pytorch-grad-cam's documented ViT reshape_transform
    return t[:, 1:, :].reshape(t.size(0), side, side, t.size(2)).transpose(2, 3).transpose(1, 2)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_vit_and_swin_equal_pytorch_grad_cam(vit, swin, method):
    torch.manual_seed(5)
    x = torch.randn(3, 3, 32, 32)
    layer = vit.encoder.layers[0]
    (m,) = grad_cam(vit, x, [layer], TARGETS, method=method)  # the reshape picked by name
    assert m.shape == (3, 4, 4)
    ref = _pgc(method, vit, layer, x, _pgc_vit_reshape)
    np.testing.assert_allclose(_scaled(m, (32, 32)), ref, atol=1e-5)

    x = torch.randn(3, 3, 64, 64)
    layer = swin.features[1]  # (B, 16, 16, C): channels last
    (m,) = grad_cam(swin, x, [layer], TARGETS, method=method)
    assert m.shape == (3, 16, 16)
    ref = _pgc(method, swin, layer, x, lambda t: t.permute(0, 3, 1, 2))
    np.testing.assert_allclose(_scaled(m, (64, 64)), ref, atol=1e-5)


def test_reshape_defaults_and_errors(vit, swin, resnet18):
    assert default_reshape(swin) is channels_last and default_reshape(resnet18) is None
    tokens = torch.randn(2, 17, 16)
    torch.testing.assert_close(default_reshape(vit)(tokens), vit_reshape(tokens))
    with pytest.raises(ValueError, match=r"layer 'encoder.layers.encoder_layer_0' outputs "
                                         r"\(1, 17, 16\), not \(B, C, h, w\).*reshape=vit"):
        grad_cam(vit, torch.randn(1, 3, 32, 32), "encoder.layers.encoder_layer_0",
                 reshape=lambda t: t)


def test_methods_in_the_report_the_grid_and_the_cli(tiny_learner, tiny_model_file, mini_root,
                                                    tmp_path):
    from gradcam_tut.learner import gradcam_grid, localization_report, mask_dl
    from gradcam_tut.tool.cli import METHOD_NAMES, main
    from gradcam_tut.tool.layout import image_files

    assert METHOD_NAMES == tuple(METHODS)  # the CLI lists them without importing torch
    dl = mask_dl(tiny_learner, image_files(mini_root)[::4], bs=8)
    both = localization_report(tiny_learner, dl, method=["gradcam", "layercam"])
    assert both.index.names == ["method", "layer"] and len(both) == 2 * 8
    alone = localization_report(tiny_learner, dl)
    assert both.loc["gradcam"].equals(alone)  # one pass for both, the same numbers
    image = sorted((mini_root / "Trout" / "Trout").iterdir())[0]
    fig = gradcam_grid(tiny_learner, image, method="gradcam++")
    assert fig._suptitle.get_text().split(" · ")[1].startswith("gradcam++ map for")
    assert main(["grid", str(tiny_model_file), str(image), "--method",
                 "hirescam", "--out", str(tmp_path / "g.png")]) == 0


def test_every_method_is_a_documented_function():
    """help(METHODS[name]) shows the paper, the formula of the map and the shapes."""
    import pydoc
    import re

    from gradcam_tut import cam

    for name, weigh in METHODS.items():
        assert getattr(cam, weigh.__name__) is weigh, name  # a module-level function
        text = pydoc.render_doc(weigh, renderer=pydoc.plaintext)
        assert "map = ReLU(sum_k" in text and "(B, K, h, w)" in text, name
        assert re.search(r"et al\.|&", text) and re.search(r"\b20[12]\d\b", text), name
