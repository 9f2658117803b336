"""The probe behind run12's stem-probe.log (H200, torch 2.11): the tiny ImageNet DenseNet of
tests/test_stem.py under bf16 autocast, cuDNN on and TF32 off, by the tolerance rule against
the naive model for seeds 8-15; the cpp backend with the fused stem, without it, and the
reference backend. Run from the repository root: ``PYTHONPATH=. python3 <this file>``."""

import sys

import torch

sys.path.insert(0, "tests")
from helpers import Autocast, check_step, float64_oracle  # noqa: E402
from test_stem import _tiny_densenet  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def run(seed, backend="cpp", stem=True):
    naive = _tiny_densenet().cuda()
    ours = _tiny_densenet(efficient=True, backend=backend).cuda()
    ours.load_state_dict(naive.state_dict())
    ours.efficient_stem = stem
    naive, ours = Autocast(naive), Autocast(ours)
    x = torch.randn(3, 3, 33, 30, generator=torch.Generator().manual_seed(seed)).cuda()
    oracle = float64_oracle(naive)
    try:
        check_step(ours, naive, x, oracle=oracle, precision=torch.bfloat16)
        return "ok"
    except AssertionError as e:
        return str(e).split("\n")[0][:120]


for seed in range(8, 16):
    cells = [run(seed), run(seed, stem=False), run(seed, "reference")]
    print(seed, "cpp:", cells[0], "| cpp no stem:", cells[1], "| reference:", cells[2], flush=True)
