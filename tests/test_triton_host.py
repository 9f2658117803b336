"""Host path of the triton backend's eager layer loop, with compiled kernels and mocked launches
(``mock_gpu``: Triton's driver replaced, nothing runs; CPU tensors stand in for CUDA ones).

Counts, not timings (the timings are ``python -m bench.triton_host``): the launches per layer
forward + backward, that a steady-state step never enters Triton's argument binding and passes
each kernel exactly the arguments Triton's own path passed, and that a misaligned parameter
sends the step back through Triton's checked path. Each test runs a script in a fresh process
with ``TRITON_INTERPRET=0`` (the rest of the suite interprets the kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

_PRELUDE = """
import torch
import triton

import dense_ext.backends.triton as triton_package
from dense_ext import EfficientDenseBlock
from dense_ext.backends.triton import backend as tb
from dense_ext.backends.triton.mock_gpu import mocked_gpu

tb.TritonBackend._check = staticmethod(lambda x: None)  # CPU tensors stand in for CUDA ones
triton_package.unavailable_reason = lambda device: None

bindings = []  # kernels launched through Triton's own path (binding, specialisation)
original_run = triton.runtime.jit.JITFunction.run
def counting_run(self, *args, **kwargs):
    bindings.append(self.fn.__name__)
    return original_run(self, *args, **kwargs)
triton.runtime.jit.JITFunction.run = counting_run

def make(layers, bn_size, drop, memory, size=4):
    torch.manual_seed(0)
    block = EfficientDenseBlock(layers, 8, 4, bn_size, drop, memory=memory, backend="triton")
    x = torch.randn(2, 8, size, size, requires_grad=True)
    return block, x

def step(block, x):
    out = block(x)
    out.backward(torch.ones_like(out))
"""


def _run(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    done = subprocess.run(
        [sys.executable, "-c", _PRELUDE + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0 and "ok" in done.stdout, (done.stdout + done.stderr)[-4000:]
    return done.stdout


_COUNT_SCRIPT = """
# (bn_size, drop, memory, image size) -> launches per step of a 3-layer block: 2 for the
# statistics of the input (tiles, merge), then per layer in forward the 3x3 weight into the
# kernels' layout, conv1 + merge + conv2 + merge (plain layers: conv + merge), in backward the
# dropout mask, conv1 recomputed (memory="min"), wgrad/reduce/apply of the 3x3 conv and of the
# bottleneck conv (plain: of the 3x3 conv), and each weight gradient's sum over its row
# splits where there are several (on CPU tensors: 2 splits from 33 rows on; 2x4x4 = 32 rows).
L = 3
expected = {
    (4, 0.0, "min", 4): 2 + L * (5 + 7),
    (4, 0.0, "bottleneck", 4): 2 + L * (5 + 6),
    (4, 0.2, "min", 4): 2 + L * (5 + 8),
    (0, 0.0, "min", 4): 2 + L * (3 + 3),
    (0, 0.2, "bottleneck", 4): 2 + L * (3 + 4),
    (4, 0.0, "min", 6): 2 + L * (5 + 7 + 2),
    (0, 0.0, "min", 6): 2 + L * (3 + 3 + 1),
}
with mocked_gpu() as mock:
    for (bn_size, drop, memory, size), count in expected.items():
        block, x = make(L, bn_size, drop, memory, size)
        step(block, x)  # compiles
        mock.launches.clear()
        step(block, x)
        got = sum(mock.launches.values())
        assert got == count, ((bn_size, drop, memory, size), got, count, dict(mock.launches))
print("ok")
"""


def test_launches_per_layer_forward_backward():
    """Launches per step of a 3-layer block, each configuration: 12 per bottleneck layer
    (5 forward, 7 backward with ``memory="min"``), one less when the bottleneck output is
    kept, one more with dropout, one more per weight gradient summed over row splits; 6 per
    plain layer; 2 per block for the input statistics."""
    _run(_COUNT_SCRIPT)


_DIRECT_SCRIPT = """
original_hooks = __import__("dense_ext.backends.triton._common", fromlist=["_"])._launch_hooks

def describe(log):
    # tensors by dtype, shape and 16-byte alignment (fresh buffers each step), the rest by value
    return [
        (name, grid, [(a.dtype, tuple(a.shape), a.data_ptr() % 16) if isinstance(a, torch.Tensor)
                      else (type(a), a) for a in args])
        for name, grid, args in log
    ]

from dense_ext.backends.triton import _common, eager

fast_call = _common.FastLaunch.__call__
# 4x4: every statistics merge in one launch; 68x68 (145 row tiles of 64): in two, each of the
# 7 merges (the block input's, then two per layer)
with mocked_gpu() as mock:  # one driver: compiled kernels keep the one they met
    for size, groups in ((4, 0), (68, 1 + 2 * 3)):
        block, x = make(3, 4, 0.2, "min", size)
        # first step: every launch through Triton's own path (as while a profiler listens)
        _common._launch_hooks = eager._launch_hooks = lambda: True
        mock.log = []
        bindings.clear()
        step(block, x)
        first = describe(mock.log)
        assert len(bindings) == len(first) > 0, (len(bindings), len(first))
        named = [name for name, _, _ in first].count("_merge_groups_kernel")
        assert named == groups, (size, named)
        _common._launch_hooks = eager._launch_hooks = original_hooks
        bindings.clear()
        step(block, x)  # the sites take their compiled kernels from FastLaunch
        checked = []  # launches through FastLaunch's checks (key of every argument)
        _common.FastLaunch.__call__ = lambda self, *a: checked.append(1) or fast_call(self, *a)
        mock.log = []
        step(block, x)  # steady state: direct launches
        _common.FastLaunch.__call__ = fast_call
        assert bindings == [] and checked == [], (bindings, len(checked))
        second = describe(mock.log)
        assert second == first, [(a, b) for a, b in zip(first, second) if a != b][:3]
print("ok")
"""


def test_steady_state_launches_skip_triton_binding_with_the_same_arguments():
    """In the steady state no launch of the eager loop enters Triton's binding and
    specialisation (``JITFunction.run``) or ``FastLaunch``'s per-argument checks (the direct
    launch of ``LaunchSite.bound``), and every kernel receives the same grid and
    arguments (scalars by value, tensors by dtype, shape and alignment) as Triton's own path
    gave it in the first step; also where the statistics merges take two launches
    (``stats.TwoLevelMerge``)."""
    _run(_DIRECT_SCRIPT)


_MISALIGNED_SCRIPT = """
with mocked_gpu() as mock:
    block, x = make(2, 4, 0.0, "min")
    step(block, x)
    step(block, x)
    bindings.clear()
    step(block, x)
    assert bindings == [], bindings
    # a BN weight 4 bytes past a 16-byte boundary (a view into a larger tensor)
    norm = block.denselayer2.norm1
    storage = torch.empty(norm.num_features + 1)
    storage[1:].copy_(norm.weight.detach())
    norm.weight = torch.nn.Parameter(storage[1:])
    assert norm.weight.data_ptr() % 16 == 4
    step(block, x)
    # the kernels that read that weight are specialised anew: Triton's checked path was taken
    assert "_bn_relu_conv_fwd_kernel" in bindings, bindings
    assert "_conv_dgrad_bn_relu_bwd_kernel" in bindings, bindings
    assert norm.weight.grad is not None
print("ok")
"""


def test_misaligned_parameter_takes_the_checked_launch_path():
    """The direct launch assumes the 16-byte alignments of its first launch; a parameter
    that is not 16-byte aligned sends the step through Triton's checked path, which
    specialises the kernels for it (a direct launch would use the aligned variant)."""
    _run(_MISALIGNED_SCRIPT)
