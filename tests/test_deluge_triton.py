"""The ``triton`` stage backend (CLDC in Triton kernels) against the naive DelugeNet.

Without a GPU the very same kernels and launchers run under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before any kernel is defined) on small CPU tensors, with
channel counts that leave ragged channel tiles (6 and 10 channels against 16-wide tiles) and
``M = N*H*W`` not a multiple of the 16-row tile. The kernels are also compiled ahead of time to
sm_80 and sm_90 cubins (no GPU needed). Tests marked ``cuda`` run the compiled kernels on a GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything defines the kernels

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from deluge_helpers import (  # noqa: E402
    check,
    compare_models,
    compare_stage,
    make_model_pair,
    make_stage_pair,
    observe,
    randomize,
)
from helpers import (  # noqa: E402
    TRITON_DELUGE_FLOAT32,
    cuda_or_skip,
    expect_rule_failure,
    float64_oracle,
)

from dense_ext.deluge import EfficientCLDC, EfficientDelugeHead  # noqa: E402
from dense_ext.deluge.backends import unavailable_reason  # noqa: E402
from python_models.delugenet import DelugeHead  # noqa: E402

pytestmark = pytest.mark.triton


def triton_cpu_or_skip() -> None:
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"triton stage backend unavailable on cpu: {reason}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["min", "bottleneck"])
def test_stage_matches_naive(dtype, memory, request):
    triton_cpu_or_skip()
    miss = expect_rule_failure(request, dtype == torch.float32, TRITON_DELUGE_FLOAT32)
    naive, efficient = make_stage_pair(6, 4, "triton", dtype, memory)
    oracle = float64_oracle(naive)
    x = torch.randn(2, 6, 5, 7, dtype=dtype) * 2 + 1
    compare_stage(naive, efficient, x, oracle=oracle, miss=miss)
    compare_stage(naive, efficient, torch.randn_like(x), seed=2, oracle=oracle, miss=miss)
    naive.eval(), efficient.eval(), oracle.eval()
    compare_stage(naive, efficient, torch.randn_like(x), seed=3, oracle=oracle, miss=miss)


def test_mixed_flags_and_odd_sizes():
    triton_cpu_or_skip()
    naive, efficient = make_stage_pair(10, 3, "triton")
    for module in (naive, efficient):
        module.layer2.cldc.eval()
        module.layer1.norm1.eval()
    compare_stage(naive, efficient, torch.randn(3, 10, 3, 5, dtype=torch.float64), 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
def test_cldc_gradcheck_float64(training):
    triton_cpu_or_skip()
    torch.manual_seed(0)
    cldc = EfficientCLDC(3, 3, backend="triton").double()
    randomize(cldc)
    cldc.train(training)
    buf = torch.randn(2, 9, 3, 2, dtype=torch.float64, requires_grad=True)  # as test_deluge_stage's
    weight = cldc.weight.detach().clone().requires_grad_()
    bias = cldc.bias.detach().clone().requires_grad_()

    def f(inp, w, b):
        return torch.func.functional_call(cldc, {"weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(f, (buf, weight, bias), eps=1e-6, atol=1e-7)


def test_head_and_model_match_naive():
    triton_cpu_or_skip()
    torch.manual_seed(0)
    naive_head = DelugeHead(6, 3).double()
    randomize(naive_head)
    head = EfficientDelugeHead(6, 3, backend="triton").double()
    head.load_state_dict(naive_head.state_dict())
    x = torch.randn(2, 18, 5, 5, dtype=torch.float64)
    grad = torch.randn(2, 6, dtype=torch.float64)
    expected, scales = observe(naive_head, x, grad, as_input=lambda buf: list(buf.split(6, 1)))
    actual, _ = observe(head, x, grad)
    check(actual, expected, 1e-10, scales)
    naive, efficient = make_model_pair("triton")
    compare_models(naive, efficient, torch.randn(2, 3, 8, 8, dtype=torch.float64), 1e-10)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    """Ahead-of-time compile of every CLDC kernel to cubins (Triton ships ptxas): catches what
    the interpreter cannot (types of the compiled path, constexpr use). The script removes its
    folder of re-emitted sources."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's dense_ext, not another
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    script = Path(__file__).with_name("deluge_triton_compile.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_")]
    assert len(lines) == 2 * 3 * 4 + 3 and all(line.endswith("ok") for line in lines), lines
    assert not list(tmp_path.glob("dense_ext_*")), "the script left its folder behind"


@pytest.mark.cuda
def test_cuda_stage_matches_cpp_and_reference():
    cuda_or_skip()
    if unavailable_reason("triton", "cuda") is not None:
        pytest.skip(unavailable_reason("triton", "cuda"))
    naive, efficient = make_stage_pair(64, 5, "triton", torch.float64)
    naive.cuda(), efficient.cuda()
    x = torch.randn(4, 64, 9, 9, dtype=torch.float64, device="cuda")
    compare_stage(naive, efficient, x, 1e-10)
