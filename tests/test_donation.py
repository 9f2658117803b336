"""Gradient donation is impossible to observe.

A transition gives the block its input gradient to accumulate into (dense_ext.donation). Whatever
a user keeps of the gradient flowing between the two (the tensor, an alias, a view, its storage,
a NumPy array on it, the block module's hook arguments, a post hook on the block's node) must
still hold, after backward, exactly what it held when it was handed out; and every gradient must
be the one computed without the hook. Without such a holder, the donation must still happen.
"""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_backend_or_skip
from naive import randomize_bn

import dense_ext.function as function
from dense_ext import EfficientDenseBlock, EfficientTransition

BACKENDS = ["reference", "cpp"]


def _pair(backend: str):
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 4, 3, 2, memory="min", backend=backend).double()
    transition = EfficientTransition(10, 5).double()
    randomize_bn(block)
    return block, transition


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g)


def _gradients(block, transition, keep=None):
    """Input and parameter gradients of one backward; ``keep(out)`` may install holders on the
    block output ``out`` before the backward."""
    x = _x().requires_grad_()
    for p in [*block.parameters(), *transition.parameters()]:
        p.grad = None
    out = block(x)
    if keep is not None:
        keep(out)
    (transition(out) * torch.linspace(-1, 1, 5 * 3 * 3).view(5, 3, 3).double()).sum().backward()
    return [x.grad, *(p.grad for p in block.parameters())]


def _snapshot(kept: list, value) -> None:
    """Keep ``value`` (a holder of the gradient's memory) and a copy of what it reads now."""
    kept.append((value, _read(value).clone()))


def _read(value) -> torch.Tensor:
    if isinstance(value, torch.UntypedStorage):
        return torch.tensor([], dtype=torch.float64).set_(value)
    if not isinstance(value, torch.Tensor):  # a NumPy array
        return torch.from_numpy(value)
    return value


HOLDERS = {
    "tensor": lambda g: g,
    "detach": lambda g: g.detach(),
    "cpu_alias": lambda g: g.cpu().detach(),
    "view": lambda g: g[:, 1:3],
    "reshape": lambda g: g.permute(0, 2, 3, 1).reshape(-1),
    "numpy": lambda g: g.numpy(),
    "storage": lambda g: g.untyped_storage(),
    "dlpack": lambda g: torch.from_dlpack(torch.utils.dlpack.to_dlpack(g)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("holder", list(HOLDERS))
def test_tensor_hook_keeping_an_alias_sees_no_change(backend, holder):
    """grad-CAM style: a tensor hook on the block output stores the gradient (or an alias).

    Before the fix, ``g.detach()`` and ``g.cpu().detach()`` ended up holding the block's
    accumulated input gradient instead of the output gradient."""
    cpu_backend_or_skip(backend)
    block, transition = _pair(backend)
    expected = _gradients(block, transition)
    kept: list = []
    actual = _gradients(
        block,
        transition,
        lambda out: out.register_hook(lambda g: _snapshot(kept, HOLDERS[holder](g))),
    )
    value, at_hook_time = kept[0]
    assert torch.equal(_read(value), at_hook_time), "backward wrote into a gradient a hook kept"
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_grad_is_the_output_gradient(backend):
    cpu_backend_or_skip(backend)
    block, transition = _pair(backend)
    seen: list = []
    outs: list = []

    def keep(out):
        out.retain_grad()
        out.register_hook(lambda g: seen.append(g.clone()))
        outs.append(out)

    _gradients(block, transition, keep)
    assert torch.equal(outs[0].grad, seen[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_backward_hooks_see_the_gradients_as_handed_out(backend):
    """``register_full_backward_hook`` on the block (its grad_output) and on the transition (its
    grad_input): both are the gradient between the two, kept until the hooks run."""
    cpu_backend_or_skip(backend)
    block, transition = _pair(backend)
    expected = _gradients(block, transition)
    at_hand_out: list = []
    kept: dict = {}

    def block_hook(module, grad_input, grad_output):
        kept["block_out"] = grad_output[0]

    def transition_hook(module, grad_input, grad_output):
        kept["trans_in"] = grad_input[0]

    block.register_full_backward_hook(block_hook)
    transition.register_full_backward_hook(transition_hook)
    actual = _gradients(
        block, transition, lambda out: out.register_hook(lambda g: at_hand_out.append(g.clone()))
    )
    assert torch.equal(kept["block_out"], at_hand_out[0])
    assert torch.equal(kept["trans_in"], at_hand_out[0])
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_post_hook_on_the_block_node_sees_the_incoming_gradient(backend):
    """A hook on the block's grad_fn gets the block's incoming gradient *after* the block's
    backward ran (the engine keeps a copy of the node's inputs for it)."""
    cpu_backend_or_skip(backend)
    block, transition = _pair(backend)
    at_hand_out: list = []
    post: list = []

    def keep(out):
        out.register_hook(lambda g: at_hand_out.append(g.clone()))
        out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: post.append(grad_outputs[0]))

    _gradients(block, transition, keep)
    assert torch.equal(post[0], at_hand_out[0])


def _donations(monkeypatch) -> list[bool]:
    taken: list[bool] = []
    original = function.take_donated

    def spy(grad, refs, like):
        result = original(grad, refs, like)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(function, "take_donated", spy)
    return taken


@pytest.mark.parametrize("backend", BACKENDS)
def test_donation_still_happens_without_holders(backend, monkeypatch):
    """The memory saving is kept: nothing holds the gradient, so the block takes it."""
    cpu_backend_or_skip(backend)
    taken = _donations(monkeypatch)
    block, transition = _pair(backend)
    # A hook that looks at the gradient (even its storage) and keeps nothing does not matter.
    looked: list[float] = []
    _gradients(
        block,
        transition,
        lambda out: out.register_hook(lambda g: looked.append(g.untyped_storage().nbytes())),
    )
    assert taken == [True]


@pytest.mark.parametrize("holder", ["tensor", "detach", "storage"])
def test_donation_refused_while_held(holder, monkeypatch):
    taken = _donations(monkeypatch)
    block, transition = _pair("reference")
    kept: list = []
    _gradients(
        block, transition, lambda out: out.register_hook(lambda g: kept.append(HOLDERS[holder](g)))
    )
    assert taken == [False]
