"""`body_layers` for any architecture a fastai user picks: torchvision through fastai's
`vision_learner` model and on its own, timm through fastai. Every default layer gives one 2-D
map per image, equal to captum's LayerGradCam (random weights, small inputs)."""

import pytest
import timm
import torch
import torchvision.models as tvm
from captum.attr import LayerGradCam
from fastai.vision.learner import create_timm_model, create_vision_model
from torch import nn

from gradcam_tut import body_layers, grad_cam
from gradcam_tut.hooks import hooks_left

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


def _check(model, layers, first_last_count, x=X):
    first, last, count = first_last_count
    names = list(layers)
    assert (names[0], names[-1], len(names)) == (first, last, count), names
    model.eval()
    maps = grad_cam(model, x, list(layers.values()), TARGETS)
    for (name, layer), m in zip(layers.items(), maps):
        assert m.ndim == 3 and m.shape[0] == 2, (name, m.shape)  # (B, h, w)
        ref = LayerGradCam(model, layer).attribute(x, TARGETS, relu_attributions=True)[:, 0]
        torch.testing.assert_close(m, ref, rtol=1e-4, atol=1e-6, msg=name)
    assert any(m.amax() > 0 for m in maps)


@pytest.mark.parametrize("arch", [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in TORCHVISION])
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
    timm_swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=9, embed_dim=16,
                                  depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))  # fastai's
    # head cannot take Swin's channels-last output, so a plain timm model here; its four
    # stages at 224 px, each one block wide and narrow (swin_tiny's own are slow to build)
    x224 = torch.nn.functional.interpolate(X, size=224)
    for model, x, sides in [(vit, X, [4] * 2), (swin, X, [16, 16, 8, 8]),
                            (timm_vit, X, [4] * 12), (timm_swin, x224, [56, 28, 14, 7])]:
        layers = body_layers(model.eval())
        maps = grad_cam(model, x, list(layers.values()), TARGETS)
        assert [m.shape for m in maps] == [(2, s, s) for s in sides], list(layers)


class ConvHeadNet(nn.Module):
    """Two convs, then a head that keeps maps until its pool (squeezenet's): Dropout, a 1x1
    conv to the classes, ReLU, global average pool."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(), nn.Conv2d(16, 9, 1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return self.head(self.body(x)).flatten(1)


# models whose names fooled a lookup by class names and positions: (first, last, count), x
FOUND_BY_RUNNING = {
    "mnasnet0_5": (lambda: tvm.mnasnet0_5(num_classes=9), ("layers.0", "layers.16", 17), X),
    "googlenet_aux": (lambda: tvm.googlenet(num_classes=9, aux_logits=True, init_weights=False),
                      ("conv1", "inception5b", 16), X),
    "conv_head": (ConvHeadNet, ("body.0", "body.3", 4), X),
    "shufflenet_through_fastai": (
        lambda: create_vision_model(tvm.shufflenet_v2_x0_5, 9, pretrained=False),
        ("0.0", "0.2", 3), X),  # fastai's body is only conv1 (cut at the first pool)
    "inception_v3_aux": (
        lambda: tvm.inception_v3(num_classes=9, aux_logits=True, init_weights=False),
        ("Conv2d_1a_3x3", "Mixed_7c", 18), torch.nn.functional.interpolate(X, size=96)),
    "maxvit_t": (lambda: tvm.maxvit_t(num_classes=9), ("stem", "blocks.3", 5),
                 torch.nn.functional.interpolate(X, size=224)),
}
SLOW = {"inception_v3_aux", "maxvit_t", "mnasnet0_5"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a
                                  for a in FOUND_BY_RUNNING])
def test_layers_found_by_running(arch):
    """Modules that never run (aux heads in eval mode, a ModuleList), the head and the
    classifier are never default layers; every default layer's map equals captum's."""
    torch.manual_seed(0)
    make, expected, x = FOUND_BY_RUNNING[arch]
    model = make().eval()
    layers = body_layers(model)
    assert not any(word in name.lower() for name in layers
                   for word in ("aux", "classifier", "head", "fc")), list(layers)
    assert hooks_left(model) == 0
    _check(model, layers, expected, x)


def test_body_layers_restores_mode_and_says_what_to_pass():
    torch.manual_seed(0)
    vit = tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1,
                                hidden_dim=8, mlp_dim=8, num_classes=9)
    vit.train()
    vit.encoder.eval()  # a submodule in another mode stays so
    assert list(body_layers(vit)) == ["encoder.layers.encoder_layer_0"]
    assert vit.training and not vit.encoder.training and hooks_left(vit) == 0
    model = ConvHeadNet()
    with pytest.raises(ValueError, match=r"zeros of shape \(1, 3, 8, 8\).*pass size=\(H, W\)"):
        body_layers(nn.Sequential(model, nn.Unflatten(1, (3, 3)), nn.Conv2d(3, 3, 5)), size=8)
    assert hooks_left(model) == 0
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 9))
    with pytest.raises(ValueError, match="no module of Sequential outputs a spatial map"):
        grad_cam(pooled, X, None)


def test_body_layers_runs_once_per_model_and_keeps_none_alive():
    import gc
    import weakref

    model = ConvHeadNet()
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    assert body_layers(model) == body_layers(model) and len(calls) == 1  # the run is kept
    model.head = nn.Sequential(nn.Conv2d(16, 9, 1), nn.AdaptiveAvgPool2d(1))
    assert list(body_layers(model)) == ["body.0", "body.1", "body.2", "body.3"]
    assert len(calls) == 2  # a new module: run again
    handle.remove()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
