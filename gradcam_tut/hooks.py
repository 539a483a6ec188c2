"""Forward and backward hooks that store what a module saw; torch only, so the file can be pasted.

    (x,) = learn.dls.test_dl(["some_fish.png"]).one_batch()  # (1, 3, H, W), as in validation
    layer = learn.model[0][7]                  # fastai resnet: [0] is the body, [7] its layer4
    with HookBwd(layer) as hookg:
        with HookForward(layer) as hook:
            output = learn.model.eval()(x)
            act = hook.stored                  # (1, K, h, w)
        cls = output.argmax(dim=1).item()      # the predicted class
        output[0, cls].backward()
        grad = hookg.stored                    # (1, K, h, w)
    learn.model.zero_grad()                    # backward() also filled the parameters' .grad
    cam = (grad[0].mean(dim=(1, 2), keepdim=True) * act[0]).sum(0).relu().detach().cpu()

Both remove their hooks on exit, also when the block raises; so does `HookEach`, which calls
a function of yours on every forward of many modules.
"""

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn


class HookBase:
    """Context-manager plumbing shared by the hooks below: leaving the `with` block, also by an
    exception, removes every handle in `self.handles`. Not named `Hooks`: that is fastai's list
    of hooks, which pasting this file after `from fastai.vision.all import *` must not hide."""

    handles: list

    def remove(self) -> None:
        """Remove the hooks; safe to call twice."""
        for handle in self.handles:
            handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


class HookForward(HookBase):
    """Keep a detached clone of `module`'s output from its latest forward.

    `.stored` is `None` until the module runs, then a tensor shaped like the output,
    (B, K, h, w) for a conv layer. The clone keeps the value an in-place op that follows
    (resnet's `ReLU(inplace=True)` after `bn1`) would otherwise overwrite. A module that runs
    twice in one forward (resnet's `BasicBlock.relu`) keeps its second output; `HookBwd` then
    refuses to pair it with a gradient.
    """

    def __init__(self, module: nn.Module):
        self.stored: Tensor | None = None
        self.handles = [module.register_forward_hook(self.hook_fn)]

    def hook_fn(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self.stored = output.detach().clone()


class HookBwd(HookBase):
    """Keep the gradient with respect to `module`'s output from the latest forward.

    `.stored` is `None` until a backward pass reaches the module's output, then a detached
    tensor shaped like that output, (B, K, h, w) for a conv layer.

    A forward hook registers a tensor hook on the output. Not `register_backward_hook`
    (deprecated, wrong for modules of several ops) and not `register_full_backward_hook`,
    which raises when an in-place op such as resnet's ReLU follows (pytorch#61519). When the
    backward reaches an output of an earlier call than the latest (the module ran twice in
    one forward, or the backward is of an older forward), it raises ValueError: that gradient
    would not pair up with `HookForward`'s activation.
    """

    def __init__(self, module: nn.Module):
        self.stored: Tensor | None = None
        self.calls = 0
        self.handles = [module.register_forward_hook(self.hook_fn)]

    def hook_fn(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        if not output.requires_grad:  # frozen body and an input without grad
            output.requires_grad_()
        self.calls += 1
        call = self.calls
        output.register_hook(lambda grad: self.store(grad, module, call))
        # The rest of the network gets a clone: an in-place op that follows changes the clone,
        # and the gradient stored is the one for the value this module returned (as in captum).
        return output.clone()

    def store(self, grad: Tensor, module: nn.Module, call: int) -> None:
        if call != self.calls:
            raise ValueError(f"{type(module).__name__} ran more than once before this backward, "
                             "so its gradient and activation would not pair up: hook a module "
                             "that runs once per forward (resnet's block, or one of its convs)")
        self.stored = grad.detach()


class HookForwardMany(HookBase):
    """Keep the output of each of `modules` from one forward, indexed like `modules`.

    `.stored[i]` is `None` until `modules[i]` runs, then its output, still attached to the
    graph (made to require grad if it did not), so `torch.autograd.grad(score, hook.stored)`
    gives the gradient for every layer in one backward. The network goes on with a clone of
    each output, so an in-place op that follows leaves the stored tensor intact. A module that
    runs twice in the forward raises ValueError rather than give an ambiguous map.
    """

    def __init__(self, modules: list[nn.Module]):
        self.stored: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, idx: int):
        def hook_fn(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            if not isinstance(output, Tensor):
                raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; "
                                "hook a module whose output is a single tensor")
            if self.stored[idx] is not None:  # resnet's BasicBlock runs its `relu` twice
                raise ValueError(f"{type(module).__name__} ran twice in one forward, so its "
                                 "activation and gradient would not pair up: hook a module that "
                                 "runs once (the block, or one of its convs)")
            if not output.requires_grad:  # frozen body and an input without grad
                output.requires_grad_()
            self.stored[idx] = output
            return output.clone()
        return hook_fn


class HookEach(HookBase):
    """Call `pre(module, inputs)` before and `forward(module, inputs, output)` after each
    forward of each of `modules` (torch's forward-pre and forward hooks: what they return, if
    not None, replaces the inputs or the output). Hooks on one module run in the order they were
    registered, so two `HookEach` on it call the first one's function first.
    """

    def __init__(self, modules: Iterable[nn.Module], forward: Callable | None = None,
                 pre: Callable | None = None):
        self.handles = []
        try:
            for m in modules:
                if pre is not None:
                    self.handles.append(m.register_forward_pre_hook(pre))
                if forward is not None:
                    self.handles.append(m.register_forward_hook(forward))
        except BaseException:  # a module that takes no hooks: none of ours stays behind
            self.remove()
            raise


def hooks_left(model: nn.Module) -> int:
    """Count the forward, forward-pre and backward hooks still registered anywhere in `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())

