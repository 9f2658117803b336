"""Gradient donation between dense_ext's own autograd Functions, and why it cannot be observed.

The block backward needs a writable gradient buffer the size of its output. The gradient it
receives usually comes from the next transition's backward, which allocated it and will never
read it again; copying it would hold two block-sized buffers at the backward's peak. A
producer that allocated its gradient itself marks it with ``donate``; the consumer then
accumulates into it in place (``take_donated``) instead of copying.

Writing into the gradient is safe only if nothing but the autograd engine can reach its memory,
now or later. Everything that can is counted by Python or c10, and ``holders`` reads the counts:

* ``python_refs``: references to the tensor object (a hook that kept ``g`` itself);
* ``tensor_refs``: ``Tensor._use_count()``, owners of the C++ tensor (the engine's copy of a
  node's inputs when the node has post hooks, a view's base, a DLPack capsule);
* ``storage_refs``: owners of the memory (every other tensor on it: ``g.detach()``, ``g.cpu()``
  on the CPU, any view, ``g.numpy()``; a Python storage object);
* ``storage_python_refs``: references to the Python storage object (a kept
  ``g.untyped_storage()``).

Each is compared with its value for a gradient nobody shares, measured once at import through
the same kind of call (``measure_baseline``); any extra holder refuses the donation. This is how
autograd's own ``AccumulateGrad`` decides that it may steal an incoming gradient rather than copy
it (``use_count``), extended to the storage, so aliases count too. Memory a producer did not
allocate itself (``torch.from_numpy``, DLPack imports) is invisible to these counts, which is
why only a tensor its producer allocated and marked can be donated. (``retain_grad`` stores a
clone; ``register_full_backward_hook`` keeps the gradient until it calls the hook, which
shows in ``python_refs``.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import astuple, dataclass

import torch
from torch import Tensor

_MARK = "_dense_ext_donated"


def donate(grad: Tensor) -> Tensor:
    """Mark ``grad``, which its producer allocated, as given away: the producer must never read
    it again. A no-op while torch.compile traces: a compiled graph never donates (its
    consumers pass no reference count to ``take_donated``), and torch 2.11's dynamo cannot set
    an attribute on a tensor a custom op returned."""
    if not torch.compiler.is_compiling():
        setattr(grad, _MARK, True)
    return grad


@dataclass(frozen=True)
class Holders:
    """Who holds a gradient: the counts listed in the module docstring."""

    python_refs: int
    tensor_refs: int
    storage_refs: int
    storage_python_refs: int

    def at_most(self, other: Holders) -> bool:
        return all(a <= b for a, b in zip(astuple(self), astuple(other)))


def holders(grad: Tensor, python_refs: int) -> Holders:
    """The counts of ``grad``; ``python_refs`` is ``sys.getrefcount(grad)`` taken by the caller
    as the first statement of its backward (every later local adds one)."""
    storage = grad.untyped_storage()
    return Holders(
        python_refs=python_refs,
        tensor_refs=grad._use_count(),  # type: ignore[attr-defined]  # (private, not in stubs)
        storage_refs=torch._C._storage_Use_Count(storage._cdata),
        storage_python_refs=sys.getrefcount(storage),
    )


def take_donated(grad: Tensor, refs: int | None, like: Tensor) -> Tensor | None:
    """``grad`` itself if it may be written in place, else None.

    It may when its producer donated it, nothing but the engine holds it or its memory (see the
    module docstring; ``refs`` is its reference count at the top of the consumer's backward,
    None when unknown), no graph is being built through it (``create_graph``), and it is laid out
    like ``like``: same shape, dtype and device, channels_last, alone in its storage.
    """
    if refs is None or not getattr(grad, _MARK, False) or grad.requires_grad:
        return None
    if grad.shape != like.shape or grad.dtype != like.dtype or grad.device != like.device:
        return None
    if not grad.is_contiguous(memory_format=torch.channels_last) or grad.storage_offset() != 0:
        return None
    if grad.untyped_storage().nbytes() != grad.numel() * grad.element_size():
        return None
    if _BASELINE is None or not holders(grad, refs).at_most(_BASELINE):
        return None
    setattr(grad, _MARK, False)  # taken once
    return grad


_BASELINE: Holders | None = None


def measure_baseline(wrap_backward: Callable) -> Holders:
    """The counts of a donated gradient nobody else holds, seen by a consumer whose backward is
    wrapped by ``wrap_backward`` and starts like the block's: ``refs = sys.getrefcount(g)``.

    Sets the baseline ``take_donated`` compares with; dense_ext.function calls it once at
    import with the wrapper of its own backwards.
    """
    seen: list[Holders] = []

    class Producer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return donate(grad.clone())

    class Consumer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        @wrap_backward
        def backward(ctx, grad_out):
            refs = sys.getrefcount(grad_out)  # the same first statement as the block's backward
            seen.append(holders(grad_out, refs))
            return grad_out

    global _BASELINE
    x = torch.zeros(2, requires_grad=True)
    with torch.enable_grad():
        Producer.apply(Consumer.apply(x)).sum().backward()
    _BASELINE = seen[0]
    return _BASELINE
