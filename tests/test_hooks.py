from pathlib import Path

import pytest
import torch
from notebook_code import definitions, notebook_definitions
from torch import nn

from gradcam_tut import HookBwd, HookForward, body_layers, grad_cam
from gradcam_tut.hooks import hooks_left


def article_map(body, layer, model, x, cls):
    """The source article's usage, unchanged but for the class names."""
    with HookBwd(body[layer]) as hookg:
        with HookForward(body[layer]) as hook:
            output = model.eval()(x)
            act = hook.stored
        output[0, cls].backward()
        grad = hookg.stored
    w = grad[0].mean(dim=[1, 2], keepdim=True)
    return (w * act[0]).sum(0).relu()


def test_article_usage_matches_grad_cam(resnet18, batch):
    body = body_layers(resnet18)
    x = batch[:1]
    for layer in body:  # bn1 and relu included: an in-place ReLU follows bn1
        resnet18.zero_grad(set_to_none=True)
        expected = grad_cam(resnet18, x, layer, 7)[0][0]
        torch.testing.assert_close(article_map(body, layer, resnet18, x, 7), expected,
                                   rtol=1e-5, atol=1e-6, msg=layer)
    resnet18.zero_grad(set_to_none=True)
    assert hooks_left(resnet18) == 0


def test_frozen_body_input_without_grad(resnet18, batch):
    x = batch[:1]
    expected = grad_cam(resnet18, x, "bn1", 2)[0][0]
    for p in resnet18.parameters():
        p.requires_grad_(False)
    try:
        got = article_map(body_layers(resnet18), "bn1", resnet18, x, 2)
    finally:
        for p in resnet18.parameters():
            p.requires_grad_(True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_stored_values_survive_inplace_relu():
    bn = nn.BatchNorm2d(2).eval()
    model = nn.Sequential(bn, nn.ReLU(inplace=True))
    x = torch.tensor([-1.0, 2.0]).view(1, 2, 1, 1)
    with HookBwd(bn) as hookg, HookForward(bn) as hook:
        assert hook.stored is None and hookg.stored is None
        out = model(x)
        out.sum().backward()
    # the stored activation is bn's output, before the ReLU overwrote it in place
    torch.testing.assert_close(hook.stored.flatten(), torch.tensor([-1.0, 2.0]), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(hookg.stored.flatten(), torch.tensor([0.0, 1.0]))


def test_hooks_removed_when_block_raises(resnet18):
    try:
        with HookBwd(resnet18.layer1), HookForward(resnet18.layer1):
            raise KeyError("inside the block")
    except KeyError:
        pass
    assert hooks_left(resnet18) == 0
    h = HookForward(resnet18.layer1)
    h.remove()
    h.remove()  # twice is fine
    assert hooks_left(resnet18) == 0


# hooks.py copied alone, run in a fresh interpreter: test_house.py's
# test_the_light_files_load_only_what_they_need


def _readme_snippet():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Copy the hooks"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def _docstring_example():
    import textwrap

    import gradcam_tut.hooks as hooks

    return textwrap.dedent(hooks.__doc__.split("\n\n")[1])


@pytest.mark.parametrize("snippet", [_readme_snippet, _docstring_example])
def test_readme_snippet_runs_as_printed(snippet, tiny_learner, mini_root):
    """The README's "Copy the hooks" block and hooks.py's docstring example, on a fresh
    learner, give grad_cam's map."""
    code = snippet()
    img = sorted((mini_root / "Trout" / "Trout").iterdir())[0]
    scope = {"learn": tiny_learner, "HookBwd": HookBwd, "HookForward": HookForward}
    exec(code.replace("some_fish.png", str(img)), scope)
    expected = grad_cam(tiny_learner.model, scope["x"], "layer4", scope["cls"])[0][0]
    torch.testing.assert_close(scope["cam"], expected.cpu(), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in tiny_learner.model.parameters())
    assert hooks_left(tiny_learner.model) == 0


def test_module_run_twice_raises_instead_of_a_wrong_map(resnet18, batch):
    """BasicBlock runs its relu twice: the backward reaches the first output after the second,
    and pairing that gradient with the stored (second) activation would be a wrong map."""
    relu = resnet18.layer1[0].relu
    with HookBwd(relu) as hookg, HookForward(relu):
        out = resnet18.eval()(batch[:1])
        with pytest.raises(ValueError, match="ReLU ran more than once"):
            out[0, 3].backward()
    resnet18.zero_grad(set_to_none=True)
    assert hooks_left(resnet18) == 0
    with HookBwd(resnet18.layer1) as hookg:  # two forwards, the backward of the latest: fine
        resnet18(batch[:1])
        resnet18(batch[:1])[0, 3].backward()
    resnet18.zero_grad(set_to_none=True)
    assert hookg.stored.shape[1] == 64


def test_notebook_02_builds_the_same_hooks():
    """Notebook 02 writes HookBase, HookForward and HookBwd in front of the reader; their code
    must stay that of gradcam_tut.hooks (docstrings and comments aside)."""
    import gradcam_tut.hooks as hooks

    in_notebook = notebook_definitions("02_hooks_step_by_step.ipynb")
    in_package = definitions(Path(hooks.__file__).read_text())
    for name in ("HookBase", "HookForward", "HookBwd"):
        assert in_notebook.get(name) == in_package[name], f"notebook 02 lacks {name} or it drifted"


def test_the_hooks_pasted_into_a_fastai_notebook_hide_none_of_fastais(resnet18, batch):
    """A notebook starts with `from fastai.vision.all import *`, then pastes hooks.py (or
    imports everything from it): fastai's `Hooks`, a list of hooks, still works beside ours."""
    import fastai.callback.hook

    import gradcam_tut.hooks as hooks

    notebook: dict = {}
    exec("from fastai.vision.all import *", notebook)
    exec(Path(hooks.__file__).read_text(), notebook)  # the file pasted into a cell
    exec("from gradcam_tut.hooks import *", notebook)
    assert notebook["Hooks"] is fastai.callback.hook.Hooks
    layers = [resnet18.layer3, resnet18.layer4]
    with notebook["Hooks"](layers, lambda m, i, o: o.shape) as shapes, \
            notebook["HookForward"](resnet18.layer4) as hook:
        resnet18.eval()(batch)
    assert [tuple(s) for s in shapes.stored] == [(3, 256, 4, 4), (3, 512, 2, 2)]
    assert hook.stored.shape == (3, 512, 2, 2) and hooks_left(resnet18) == 0


def test_hook_each_calls_around_every_forward_and_always_removes(resnet18, batch):
    """`HookEach`, the hook the package's other code registers through: `pre` before and
    `forward` after each module's forward, in registration order, nothing left after the block,
    after a forward that raises, or after a registration that fails half-way."""
    from gradcam_tut.hooks import HookEach

    calls = []
    layers = [resnet18.layer3, resnet18.layer4]
    with HookEach(layers, forward=lambda m, i, o: calls.append(("after", o.shape[1])),
                  pre=lambda m, i: calls.append(("before", i[0].shape[1]))), \
            HookEach(layers[1:], forward=lambda m, i, o: calls.append(("second", None))):
        resnet18.eval()(batch[:1])
    assert calls == [("before", 128), ("after", 256), ("before", 256), ("after", 512),
                     ("second", None)]
    assert hooks_left(resnet18) == 0
    with pytest.raises(RuntimeError), HookEach(layers, forward=lambda m, i, o: o):
        resnet18(torch.zeros(1, 5, 32, 32))  # 5 channels: conv1 raises
    assert hooks_left(resnet18) == 0

    class NoHooks(nn.Module):
        def register_forward_hook(self, hook):
            raise RuntimeError("this module takes no hooks")

    with pytest.raises(RuntimeError, match="takes no hooks"):
        HookEach([resnet18.layer4, NoHooks()], forward=lambda m, i, o: o)
    assert hooks_left(resnet18) == 0
