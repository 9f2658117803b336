"""BlockSpec names: ``bottleneck_factor`` (torchvision's ``bn_size``), ``has_bottleneck`` (the
layer type) and ``saves_bottleneck_outputs`` (what ``memory="bottleneck"`` keeps); the old
names still work, with a DeprecationWarning, and nothing inside dense_ext uses them."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import cpu_backend_or_skip

from dense_ext import BlockSpec, EfficientDenseBlock


def test_names_say_what_they_mean():
    bc = BlockSpec(2, 3, 4, bottleneck_factor=2, memory="bottleneck")
    assert bc.has_bottleneck and bc.saves_bottleneck_outputs and bc.mid_channels == 8
    assert not BlockSpec(2, 3, 4, 2, memory="min").saves_bottleneck_outputs
    plain = BlockSpec(2, 3, 4, 0, memory="bottleneck")
    assert not plain.has_bottleneck and not plain.saves_bottleneck_outputs


def test_old_names_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="bottleneck_factor"):
        spec = BlockSpec(2, 3, 4, bn_size=2)
    assert spec == BlockSpec(2, 3, 4, 2)
    for old, new in (
        ("bn_size", "bottleneck_factor"),
        ("bottleneck", "has_bottleneck"),
        ("keeps_bottleneck", "saves_bottleneck_outputs"),
    ):
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(spec, old) == getattr(spec, new)


def test_a_spec_pickled_with_the_old_field_loads():
    spec = BlockSpec(2, 3, 4, 2)
    old = copy.copy(spec)
    state = dict(old.__dict__)
    state["bn_size"] = state.pop("bottleneck_factor")
    object.__setattr__(old, "__dict__", state)  # as a pickle from before the rename holds it
    assert pickle.loads(pickle.dumps(old)) == spec


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_blocks_use_no_deprecated_name(backend):
    cpu_backend_or_skip(backend)
    block = EfficientDenseBlock(2, 3, 4, bn_size=2, backend=backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=DeprecationWarning, module="dense_ext")
        warnings.filterwarnings("error", message="BlockSpec")
        block(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
        repr(block)
        block.memory = "min"
