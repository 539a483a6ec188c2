import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from gradcam_tut import body_layers, grad_cam, normalize_maps, upsample
from gradcam_tut.hooks import hooks_left
from gradcam_tut.layers import RESNET_BODY, resolve_layers

TARGETS = [0, 5, 8]  # mixed targets across the batch


# resnet34 (the lesson's network) has resnet18's layer names and blocks: in `make test` only
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("resnet34", marks=pytest.mark.slow)])
def test_equals_captum_at_every_body_layer(arch, batch, request):
    model = request.getfixturevalue(arch)
    layers = body_layers(model)
    assert tuple(layers) == RESNET_BODY
    maps = grad_cam(model, batch, list(layers.values()), TARGETS)
    for (name, layer), m in zip(layers.items(), maps):
        ref = LayerGradCam(model, layer).attribute(batch, TARGETS, relu_attributions=True)[:, 0]
        assert m.dtype == torch.float32 and m.shape == ref.shape, name
        assert ref.abs().max() > 0, name  # a real comparison, not zeros against zeros
        torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_contrastive_equals_captum_on_the_logit_difference(resnet18, batch):
    """"Why A rather than B" is Grad-CAM of y_A - y_B: captum on a model returning that."""
    A, B = [3, 0, 5], [1, 1, 2]
    layers = body_layers(resnet18)
    maps = grad_cam(resnet18, batch, list(layers.values()), A, contrast=B)

    def difference(x):  # (B, 1): y_A - y_B per image
        logits = resnet18(x)
        rows = torch.arange(len(x))
        return (logits[rows, A] - logits[rows, B])[:, None]

    for (name, layer), m in zip(layers.items(), maps):
        ref = LayerGradCam(difference, layer).attribute(batch, 0, relu_attributions=True)[:, 0]
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6, msg=name)
    plain = grad_cam(resnet18, batch, "layer4", A)[0]
    assert not torch.allclose(maps[-1], plain)  # the contrast changes the map


def _minmax(m, dims=(-2, -1)):
    m = m - m.amin(dims, keepdim=True)
    return m / (1e-7 + m.amax(dims, keepdim=True))


@pytest.mark.parametrize("name", ["conv1", "relu", "maxpool", "layer1", "layer3", "layer4"])
def test_equals_pytorch_grad_cam(name, resnet18, batch):
    """pytorch-grad-cam returns min-max scaled maps, resized to the input and scaled again.

    Skipped layer: bn1. pytorch-grad-cam stores the activation without cloning it, so the
    in-place ReLU after bn1 overwrites it and its bn1 map is really the map of ReLU(bn1).
    """
    layer = body_layers(resnet18)[name]
    (m,) = grad_cam(resnet18, batch, [layer], TARGETS)
    with GradCAM(model=resnet18, target_layers=[layer]) as cam:
        ref = cam(input_tensor=batch, targets=[ClassifierOutputTarget(c) for c in TARGETS])
    ours = _minmax(upsample(_minmax(m), batch.shape[-2:]))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)


class Tiny(nn.Module):
    """conv 1x1 (weights 1, -1) -> global average pool -> linear W: every value by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_hand_computed():
    # A_0 = x, A_1 = -x; dy_c/dA_k = W[c, k] / 4 everywhere, so alpha_k = W[c, k] / 4 and
    # map_c = ReLU((W[c, 0] - W[c, 1]) * x / 4): class 0 -> ReLU(-x / 4), class 1 -> ReLU(x)
    x = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).view(1, 1, 2, 2)
    model = Tiny()
    (m0,) = grad_cam(model, x, [model.conv], 0)
    (m1,) = grad_cam(model, x, [model.conv], 1)
    torch.testing.assert_close(m0, torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))
    torch.testing.assert_close(m1, torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]))
    # default target is the prediction: logits are (W @ [mean x, -mean x]) = (-0.5, 2.0) -> 1
    torch.testing.assert_close(grad_cam(model, x, "conv")[0], m1)


def test_targets_int_sequence_and_none(resnet18, batch):
    layer = "layer4"
    with torch.no_grad():
        pred = resnet18(batch).argmax(1)
    torch.testing.assert_close(grad_cam(resnet18, batch, layer)[0],
                               grad_cam(resnet18, batch, layer, pred.tolist())[0])
    torch.testing.assert_close(grad_cam(resnet18, batch, layer, 4)[0],
                               grad_cam(resnet18, batch, layer, [4, 4, 4])[0])


def test_names_and_dotted_paths(resnet18, batch):
    by_name = grad_cam(resnet18, batch, ["layer2", "layer4.1.conv2"], 3)
    by_module = grad_cam(resnet18, batch, [resnet18.layer2, resnet18.layer4[1].conv2], 3)
    for a, b in zip(by_name, by_module):
        torch.testing.assert_close(a, b)
    assert resolve_layers(resnet18, None) == body_layers(resnet18)  # None: the whole body


def test_leaves_grads_mode_and_hooks_alone(resnet18, batch):
    for p in resnet18.parameters():
        p.grad = torch.ones_like(p)  # a user's accumulated gradients
    resnet18.train()
    try:
        grad_cam(resnet18, batch, list(body_layers(resnet18)), TARGETS)
        assert resnet18.training
    finally:
        resnet18.eval()
    grad_cam(resnet18, batch, "layer4")
    assert not resnet18.training
    assert all((p.grad == 1).all() for p in resnet18.parameters())
    resnet18.zero_grad(set_to_none=True)
    assert hooks_left(resnet18) == 0


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_forward_raises_leaves_no_hooks_and_restores_mode(resnet18, batch):
    model = nn.Sequential(resnet18, Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(model, batch, [resnet18.layer1, resnet18.layer4])
    assert hooks_left(model) == 0
    assert model.training and resnet18.training
    resnet18.eval()


def test_frozen_model_and_no_grad_context(resnet18, batch):
    ref = grad_cam(resnet18, batch, ["bn1", "layer3"], TARGETS)
    for p in resnet18.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            frozen = grad_cam(resnet18, batch, ["bn1", "layer3"], TARGETS)
    finally:
        for p in resnet18.parameters():
            p.requires_grad_(True)
    for a, b in zip(ref, frozen):
        torch.testing.assert_close(a, b)


def test_autocast_maps_are_float32_and_close(resnet18, batch):
    ref = grad_cam(resnet18, batch, ["layer3", "layer4"], TARGETS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = grad_cam(resnet18, batch, ["layer3", "layer4"], TARGETS)
    for a, b in zip(ref, low):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.95


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=[]), "layers is empty"),
    (dict(layers="nope"), r"no layer named 'nope': use one of \['conv1'"),
    (dict(layers=nn.Conv2d(3, 3, 1)), "did not run in the forward"),
    (dict(layers="layer4", targets=9), "out of range: the model has 9 classes"),
    (dict(layers="layer4", targets=-1), "out of range"),
    (dict(layers="layer4", targets=[1, 2]), "got 2 targets for a batch of 3"),
    (dict(layers="layer1.0.relu"), "ReLU ran twice in one forward"),  # BasicBlock's relu
    (dict(layers=["layer4", "layer4"]), "'layer4' is asked for twice"),
    (dict(layers=["layer4", "layer4.1.conv2", "layer3"]), None),  # distinct: fine
    (dict(layers="fc"), r"'fc' outputs \(3, 9\), not \(B, C, h, w\)"),
    (dict(layers="layer4", targets=2.7), "must be integer class indices, got torch.float32"),
    (dict(layers="layer4", targets=True), "must be integer class indices, got torch.bool"),
    (dict(layers="layer4", targets="Trout"), r"not class indices: .*vocab.o2i\[name\]"),
])
def test_clear_errors(resnet18, batch, kwargs, match):
    if match is None:
        grad_cam(resnet18, batch, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            grad_cam(resnet18, batch, **kwargs)
    assert hooks_left(resnet18) == 0


def test_more_clear_errors(resnet18, batch):
    with pytest.raises(ValueError, match="'layer4' is asked for twice"):
        grad_cam(resnet18, batch, ["layer4", resnet18.layer4])  # a name and its module
    with pytest.raises(ValueError, match=r"x is torch.float64 .* pass x.to\(torch.float32\)"):
        grad_cam(resnet18, batch.double(), "layer4")
    with pytest.raises(ValueError, match="x is torch.uint8"):
        grad_cam(resnet18, (batch * 50).clamp(0, 255).to(torch.uint8), "layer4")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside that block"):
        grad_cam(resnet18, batch, "layer4")

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = resnet18

        def forward(self, x):
            return self.net(x), x

    with pytest.raises(ValueError, match="model returned tuple; expected logits"):
        grad_cam(TupleOut(), batch, "net.layer4")
    assert hooks_left(resnet18) == 0


def test_restores_every_submodule_mode(resnet18, batch):
    """A model in train mode whose BatchNorms are frozen in eval stays exactly so."""
    resnet18.train()
    bns = [m for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.eval()
    try:
        grad_cam(resnet18, batch, "layer4")
        assert resnet18.training and not any(bn.training for bn in bns)
    finally:
        resnet18.eval()


def test_input_rank_error(resnet18, batch):
    with pytest.raises(ValueError, match=r"add the batch dimension with x\[None\]"):
        grad_cam(resnet18, batch[0], "layer4")


def test_upsample_and_normalize():
    maps = [torch.rand(2, 4, 4), torch.zeros(2, 2, 2)]
    up = upsample(maps, (8, 8))
    assert up.shape == (2, 2, 8, 8)
    per_map = normalize_maps(up)
    assert not per_map.isnan().any() and (per_map[:, 1] == 0).all()
    torch.testing.assert_close(per_map[:, 0].amax(dim=(-2, -1)), torch.ones(2))
    shared = normalize_maps(up * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1) + 0.5 * up,
                            shared_scale=True)
    assert torch.allclose(shared.amax(dim=(-3, -2, -1)), torch.ones(2))
    assert upsample(maps[0], (8, 8)).shape == (2, 8, 8)


def test_fastai_batch_in_plain_tensors_out(tiny_learner, mini_root):
    """Straight from `dls.one_batch()`: TensorImage in, TensorCategory targets, plain maps out."""
    from fastai.torch_core import TensorBase

    from gradcam_tut.tool.data import fish_dataloaders

    dls = fish_dataloaders(mini_root, size=32, bs=4, num_workers=0)
    xb, yb = dls.one_batch()
    assert isinstance(xb, TensorBase) and isinstance(yb, TensorBase)
    maps = grad_cam(tiny_learner.model, xb, ["layer3", "layer4"], targets=yb)
    assert all(type(m) is torch.Tensor for m in maps)
    plain = torch.from_numpy(xb.cpu().numpy())
    plain = grad_cam(tiny_learner.model, plain, ["layer3", "layer4"], targets=yb.tolist())
    assert all(torch.equal(a, b) for a, b in zip(maps, plain))
    top = maps[1].max()
    assert f"{top:.3f}" == f"{top.item():.3f}"  # formats like a float, not like a TensorBase


def test_cam_is_grad_cam_for_an_average_pool_and_one_linear(resnet18, batch):
    """Grad-CAM at the last conv layer = ReLU(CAM) / (h * w) when the head is GAP + Linear:
    a torchvision resnet's `fc`, or fastai's head without hidden layers, concat pool and BN."""
    from fastai.vision.learner import create_body, create_head

    from gradcam_tut.cam import class_activation_map

    (gc,) = grad_cam(resnet18, batch, "layer4", TARGETS)
    cam = class_activation_map(resnet18, batch, "layer4", resnet18.fc, TARGETS)
    torch.testing.assert_close(gc, cam.relu() / (2 * 2))  # layer4 is 2x2 at 64 px
    torch.manual_seed(0)
    model = nn.Sequential(create_body(torchvision.models.resnet34(), pretrained=False),
                          create_head(512, 9, lin_ftrs=[], concat_pool=False, first_bn=False))
    model.eval()
    (gc,) = grad_cam(model, batch, "layer4", TARGETS)
    cam = class_activation_map(model, batch, "layer4", model[1][-1], TARGETS)
    torch.testing.assert_close(gc, cam.relu() / 4)
    # fastbook's einsum on fastai's default head: the last Linear's 512 inputs are hidden
    # units, not body channels; the shapes fit only because resnet34 has 512 channels
    model[1] = create_head(512, 9).eval()
    assert model[1][4].in_features == 1024 and model[1][-1].in_features == 512  # hidden units
    (gc,) = grad_cam(model, batch, "layer4", TARGETS)
    wrong = class_activation_map(model, batch, "layer4", model[1][-1], TARGETS)
    assert not torch.allclose(gc, wrong.relu() / 4, atol=1e-3)


def test_every_public_name_imports():
    import gradcam_tut
    from gradcam_tut import cam, layers

    assert all(getattr(gradcam_tut, name) is not None for name in gradcam_tut.__all__)
    for name in ("RESNET_BODY", "Layer", "body_layers", "channels_last", "default_reshape",
                 "resolve_layers", "vit_reshape"):  # from cam before layers.py: still there
        assert getattr(cam, name) is getattr(layers, name), name


def test_cascading_randomization_takes_a_module_of_the_model(resnet18, batch):
    """A module of the model is found again by name in the copy that is re-initialised."""
    from gradcam_tut.sanity import cascading_randomization

    by_module, _ = cascading_randomization(resnet18, batch[:1], resnet18.layer3)
    by_name, _ = cascading_randomization(resnet18, batch[:1], "layer3")
    assert by_module.equals(by_name) and by_module.index[0] == "trained"


def test_one_target_resolver(resnet18, batch):
    """An index, a name (with a vocab), digits, per image, or a callable on the logits; the
    contrast is one callable. Each equals the same target given as indices."""
    from gradcam_tut.cam import class_indices, contrast_target, target_scores

    vocab = [f"c{i}" for i in range(9)]
    with torch.no_grad():
        logits = resnet18(batch)
    assert class_indices("c3", logits, vocab).tolist() == [3, 3, 3]
    assert class_indices(["c0", 5, "8"], logits, vocab).tolist() == TARGETS
    torch.testing.assert_close(target_scores(TARGETS, logits), logits[[0, 1, 2], TARGETS])
    (ref,) = grad_cam(resnet18, batch, "layer4", TARGETS)
    (by_name,) = grad_cam(resnet18, batch, "layer4", ["c0", "c5", "c8"], vocab=vocab)
    assert torch.equal(by_name, ref) and ref.amax() > 0
    rows = torch.arange(3)
    (by_fn,) = grad_cam(resnet18, batch, "layer4", lambda z: z[rows, TARGETS])
    torch.testing.assert_close(by_fn, ref)
    (contrast,) = grad_cam(resnet18, batch, "layer4", 2, contrast=4)
    (by_diff,) = grad_cam(resnet18, batch, "layer4", lambda z: z[:, 2] - z[:, 4])
    (by_contrast_fn,) = grad_cam(resnet18, batch, "layer4", contrast_target(2, 4))
    torch.testing.assert_close(by_diff, contrast)
    torch.testing.assert_close(by_contrast_fn, contrast)
    with pytest.raises(ValueError, match=r"returned \(3, 1\): it must return one score per"):
        grad_cam(resnet18, batch, "layer4", lambda z: z[:, :1])
    with pytest.raises(ValueError, match="no class named 'Tuna': use one of"):
        grad_cam(resnet18, batch, "layer4", "Tuna", vocab=vocab)
    with pytest.raises(ValueError, match="a callable target gives a score per image"):
        class_indices(lambda z: z[:, 0], logits)
    assert hooks_left(resnet18) == 0


def test_class_index():
    from gradcam_tut.cam import class_index

    vocab = ["Shrimp", "Trout"]
    assert class_index(vocab, "Trout") == 1 and class_index(vocab, 0) == 0
    with pytest.raises(ValueError, match=r"no class named 'Tuna': use one of \['Shrimp'"):
        class_index(vocab, "Tuna")
    with pytest.raises(ValueError, match="out of range"):
        class_index(vocab, 2)


def test_return_logits_are_those_of_the_same_pass(resnet18, batch):
    maps, logits = grad_cam(resnet18, batch, ["layer3", "layer4"], TARGETS, return_logits=True)
    with torch.no_grad():
        torch.testing.assert_close(logits, resnet18(batch))
    assert not logits.requires_grad and logits.shape == (3, 9)
    for a, b in zip(maps, grad_cam(resnet18, batch, ["layer3", "layer4"], TARGETS)):
        assert torch.equal(a, b)
    by_method, _ = grad_cam(resnet18, batch, "layer4", method=["gradcam"], return_logits=True)
    assert list(by_method) == ["gradcam"]


def test_learner_gradcam_refuses_a_bool_as_grad_cam_does(tiny_learner, mini_root):
    from gradcam_tut.learner import gradcam_grid  # importing it adds learn.gradcam

    image = sorted((mini_root / "Trout" / "Trout").iterdir())[0]
    with pytest.raises(ValueError, match="must be integer class indices, got torch.bool"):
        gradcam_grid(tiny_learner, image, target=True)
    with pytest.raises(ValueError, match="must be integer class indices, got torch.bool"):
        tiny_learner.gradcam(image, target=True)
    with pytest.raises(ValueError, match="must be integer class indices, got torch.bool"):
        tiny_learner.gradcam(image, contrast=False)
