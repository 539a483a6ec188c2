"""Cell centres from the network's convolutions and pools, checked by a gradient probe."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, vgg11
from torchvision.models.vgg import cfgs, make_layers

from gradcam_tut.cam import resolve_layers, upsample
from gradcam_tut.hooks import HookForwardMany
from gradcam_tut.receptive_field import CellCentres, cell_centres, interpolation_matrix, place


def linearised(model: nn.Module) -> nn.Module:
    """A copy whose every input pixel in a cell's receptive field reaches it: positive
    weights, no ReLU, max pools made average pools (a max passes one pixel's gradient)."""
    model = copy.deepcopy(model).double().eval()
    for p in model.parameters():
        p.data = p.data.abs() + 1e-3
    for m in list(model.modules()):
        for child_name, child in m.named_children():
            if isinstance(child, (nn.ReLU, nn.GELU)):
                setattr(m, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(m, child_name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                    child.padding, child.ceil_mode))
    return model


def probe_centre(model: nn.Module, layer: nn.Module, size: int) -> tuple[float, float, int]:
    """The middle of the input pixels that reach the middle cell of `layer`'s output: its
    receptive field's centre, the cell's index, and the field's distance to the border."""
    x = torch.randn(1, 3, size, size, dtype=torch.double, requires_grad=True)
    with HookForwardMany([layer]) as hook:
        model(x)
    (out,) = hook.stored
    i = out.shape[-1] // 2
    (g,) = torch.autograd.grad(out[0, :, i, i].sum(), x)
    rows = g.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = g.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    margin = min(rows[0].item(), cols[0].item(), size - 1 - rows[-1].item())
    return (rows[0] + rows[-1]).item() / 2, (cols[0] + cols[-1]).item() / 2, i, margin


CASES = [
    (resnet18, ["conv1", "maxpool", "layer1", "layer2", "layer3"], 384),
    (resnet18, ["layer4"], 1024),
    (vgg11, None, 384),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,layers,size", CASES)
def test_cell_centres_match_the_gradient_probe(arch, layers, size):
    torch.manual_seed(0)
    model = arch(num_classes=9).eval()
    centres = cell_centres(model, layers, size)
    probe = linearised(model)
    found = cell_centres(probe, list(centres), size)  # the same modules, by name
    assert found == centres
    for name, c in centres.items():
        assert c is not None
        (module,) = resolve_layers(probe, name).values()
        y, x, i, margin = probe_centre(probe, module, size)
        assert margin > 0, f"{name}: the receptive field reaches the border at {size} px"
        assert (y, x) == (c.offset[0] + c.stride[0] * i, c.offset[1] + c.stride[1] * i), name


def test_resnet_and_vgg_offsets():
    """"Same" padding centres a resnet's cells at S*i; VGG's unpadded pools at the middle of
    their block, (S-1)/2 + S*i, where bilinear interpolation puts them."""
    r = cell_centres(resnet18(), None, 128)
    assert r["layer4"] == CellCentres((32, 32), (0.0, 0.0))
    assert r["conv1"] == CellCentres((2, 2), (0.0, 0.0))
    v = cell_centres(make_layers(cfgs["A"]), None, 128)  # vgg11's body; its head is slow to build
    last = list(v)[-1]
    assert v[last] == CellCentres((32, 32), (15.5, 15.5))


@pytest.mark.slow
def test_timm_convnext_centres():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=9).eval()
    centres = cell_centres(model, ["stem", "stages.0", "stages.1"], 256)
    assert centres["stages.1"] == CellCentres((8, 8), (3.5, 3.5))  # patchify: block middles
    probe = linearised(model)
    y, x, i, margin = probe_centre(probe, probe.get_submodule("stages.1"), 256)
    assert margin > 0 and (y, x) == (3.5 + 8 * i, 3.5 + 8 * i)


def test_place_equals_interpolate_at_its_own_centres():
    torch.manual_seed(0)
    maps = torch.rand(2, 4, 5)
    for H, W in [(128, 160), (130, 97), (4, 5)]:
        centred = CellCentres((H / 4, W / 5), ((H / 4 - 1) / 2, (W / 5 - 1) / 2))
        torch.testing.assert_close(place(maps, (H, W), centred), upsample(maps, (H, W)))


def test_place_puts_each_cell_at_its_centre():
    maps = torch.zeros(1, 4, 4)
    maps[0, 1, 2] = 1.0
    heat = place(maps, (128, 128), CellCentres((32, 32), (0.0, 0.0)))
    assert heat[0, 32, 64] == 1 and heat[0].argmax() == 32 * 128 + 64
    interpolated = upsample(maps, (128, 128))[0]
    assert interpolated.argmax() // 128 >= 47  # the same cell drawn 15.5 px lower
    assert torch.allclose(interpolation_matrix(8, 1, 32, 0).sum(1), torch.ones(8))


def test_tokens_are_not_traced_and_are_interpolated():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                            hidden_dim=16, mlp_dim=32, num_classes=9).eval()
    centres = cell_centres(vit, ["conv_proj", "encoder.layers.encoder_layer_0"], 32)
    assert centres["conv_proj"] == CellCentres((8, 8), (3.5, 3.5))  # patchify: block middles
    assert centres["encoder.layers.encoder_layer_0"] is None  # tokens (B, N, C)
    maps = [torch.rand(2, 4, 4), torch.rand(2, 4, 4)]
    torch.testing.assert_close(place(maps, (32, 32), list(centres.values())),
                               upsample(maps, (32, 32)))
