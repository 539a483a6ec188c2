"""`body_layers` for any architecture a fastai user picks: torchvision through fastai's
`vision_learner` model and on its own, timm through fastai. Every default layer gives one 2-D
map per image, equal to captum's LayerGradCam (random weights, small inputs)."""

import pytest
import timm
import torch
import torchvision.models as tvm
from captum.attr import LayerGradCam
from fastai.vision.learner import create_timm_model, create_vision_model

from gradcam_tut import body_layers, grad_cam

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
NOT_IN_FASTAI = {"mobilenet_v2"}  # fastai's create_body finds no pool in it: StopIteration
TARGETS = [1, 7]

# arch -> (the first and last default layer names, how many)
TORCHVISION = {
    "resnet18": ("conv1", "layer4", 8),
    "densenet121": ("features.conv0", "features.norm5", 12),
    "vgg11_bn": ("features.3", "features.28", 5),
    "mobilenet_v2": ("features.0", "features.18", 19),
    "mobilenet_v3_small": ("features.0", "features.12", 13),
    "efficientnet_b0": ("features.0", "features.8", 9),
    "convnext_tiny": ("features.0", "features.7", 8),
    "regnet_y_400mf": ("stem", "trunk_output.block4", 5),
}
TIMM = {
    "resnet18": ("act1", "layer4", 5),
    "convnext_atto": ("stages.0", "stages.3", 4),
    "efficientnet_b0": ("blocks.0", "blocks.6", 5),
}


def _check(model, layers, first_last_count):
    first, last, count = first_last_count
    names = list(layers)
    assert (names[0], names[-1], len(names)) == (first, last, count), names
    model.eval()
    maps = grad_cam(model, X, list(layers.values()), TARGETS)
    for (name, layer), m in zip(layers.items(), maps):
        assert m.ndim == 3 and m.shape[0] == 2, (name, m.shape)  # (B, h, w)
        ref = LayerGradCam(model, layer).attribute(X, TARGETS, relu_attributions=True)[:, 0]
        torch.testing.assert_close(m, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert any(m.amax() > 0 for m in maps)


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_torchvision_plain_and_through_fastai(arch):
    torch.manual_seed(0)
    plain = getattr(tvm, arch)(num_classes=9)
    _check(plain, body_layers(plain), TORCHVISION[arch])
    if arch in NOT_IN_FASTAI:
        return
    fastai_model = create_vision_model(getattr(tvm, arch), 9, pretrained=False)
    fastai_layers = body_layers(fastai_model)
    assert list(fastai_layers) == list(body_layers(plain))  # the same names either way
    _check(fastai_model, fastai_layers, TORCHVISION[arch])


@pytest.mark.parametrize("arch", list(TIMM))
def test_timm_through_fastai(arch):
    torch.manual_seed(0)
    model, _ = create_timm_model(arch, 9, pretrained=False)
    _check(model, body_layers(model), TIMM[arch])


def test_transformers_default_layers():
    """ViT tokens and Swin's channels-last maps come back as (B, h, w) maps by default."""
    torch.manual_seed(0)
    vit = tvm.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                hidden_dim=16, mlp_dim=32, num_classes=9).eval()
    swin = tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                               window_size=[4, 4], num_classes=9).eval()
    timm_vit, _ = create_timm_model("vit_tiny_patch16_224", 9, pretrained=False, img_size=64)
    timm_swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=9)  # fastai's
    # head cannot take Swin's channels-last output, so a plain timm model here
    x224 = torch.nn.functional.interpolate(X, size=224)
    for model, x, sides in [(vit, X, [4] * 2), (swin, X, [16, 16, 8, 8]),
                            (timm_vit, X, [4] * 12), (timm_swin, x224, [56, 28, 14, 7])]:
        layers = body_layers(model.eval())
        maps = grad_cam(model, x, list(layers.values()), TARGETS)
        assert [m.shape for m in maps] == [(2, s, s) for s in sides], list(layers)
