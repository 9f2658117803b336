"""The drop-in contract: whatever a user does to a naive (torchvision-structured) DenseNet, the
efficient one does with the same numbers (float64, 1e-10).

Each usage pattern is one entry of ``PATTERNS``: a function that prepares a model (flags,
attributes) and returns the input batch to train on. It is applied to a naive model and to the
efficient model loaded with the same state_dict; two training steps are compared (output,
input gradient, every parameter gradient, every buffer after forward and after backward), so
running statistics and ``num_batches_tracked`` must evolve identically. Adding a pattern is one
entry.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import TOLERANCE, assert_same_step, cpu_backend_or_skip, train_step
from naive import randomize_bn
from torch import Tensor, nn

from python_models import densenet, densenet_bc

Pattern = Callable[[nn.Module], Tensor]
SHAPE = (4, 3, 12, 12)


def _input(shape=SHAPE) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [
        m for name, m in model.named_modules() if name.rsplit(".", 1)[-1].startswith("denselayer")
    ]


def _each_bn(fn: Callable[[int, nn.BatchNorm2d], None], mode: str = "train") -> Pattern:
    def pattern(model: nn.Module) -> Tensor:
        model.train(mode == "train")
        for i, bn in enumerate(_bns(model)):
            fn(i, bn)
        return _input()

    return pattern


def _frozen_bn(i, bn):  # fine-tuning with frozen BN statistics
    bn.eval()


def _recalibrate(i, bn):  # model.eval(), BNs re-estimate their statistics
    bn.train()


def _mixed(i, bn):  # flags differ inside one block
    bn.train(i % 3 != 1)


def _momentum_none(i, bn):
    bn.momentum = None


def _momentum_per_bn(i, bn):
    bn.momentum = 0.05 * (1 + i % 4)


def _eps_per_bn(i, bn):
    bn.eps = 10.0 ** -(1 + i % 5)


def _untracked_in_training(i, bn):  # flag set False later: batch stats, no update
    if i % 2:
        bn.track_running_stats = False


def _untracked_in_eval(i, bn):  # eval with running buffers present still uses them
    bn.track_running_stats = False


def _layers_eval_with_dropout(model: nn.Module) -> Tensor:
    """Dropout switched on after construction but every dense layer in eval mode: no dropout
    (torchvision passes ``training=self.training`` of the layer to F.dropout)."""
    model.train()
    for layer in _layers(model):
        layer.drop_rate = 0.5
        layer.eval()
        for bn in _bns(layer):
            bn.train()
    return _input()


def _drop_rate_set_later(model: nn.Module) -> Tensor:
    """``layer.drop_rate`` changed after construction, some layers training, some not."""
    model.train()
    for i, layer in enumerate(_layers(model)):
        layer.drop_rate = 0.2 + 0.1 * (i % 3)
        layer.train(i % 4 != 3)
    return _input()


def _empty_batch(model: nn.Module) -> Tensor:
    model.train()
    return _input((0, *SHAPE[1:]))


PATTERNS: dict[str, Pattern] = {
    "train": _each_bn(lambda i, bn: None),
    "eval": _each_bn(lambda i, bn: None, mode="eval"),
    "frozen_bn": _each_bn(_frozen_bn),
    "recalibrate_bn": _each_bn(_recalibrate, mode="eval"),
    "mixed_bn_flags": _each_bn(_mixed),
    "momentum_none": _each_bn(_momentum_none),
    "momentum_per_bn": _each_bn(_momentum_per_bn),
    "eps_per_bn": _each_bn(_eps_per_bn),
    "untracked_in_training": _each_bn(_untracked_in_training),
    "untracked_in_eval": _each_bn(_untracked_in_eval, mode="eval"),
    "layers_eval_with_dropout": _layers_eval_with_dropout,
    "drop_rate_set_later": _drop_rate_set_later,
    "empty_batch": _empty_batch,
}
# Patterns that draw dropout masks: only the reference backend promises F.dropout's masks (the
# cpp backend's own masks are tested in test_backend_cpp.py).
NEEDS_TORCH_MASKS = {"drop_rate_set_later"}

MODELS = {
    "densenet_bc_22": lambda **kw: densenet_bc(depth=22, growth_rate=4, **kw),
    "densenet_10": lambda **kw: densenet(depth=10, growth_rate=4, **kw),
}


def model_pair(model: str, backend: str, memory: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    naive = MODELS[model](efficient=False).double()
    randomize_bn(naive, torch.Generator().manual_seed(1))
    efficient = MODELS[model](efficient=True, backend=backend, memory=memory).double()
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    "backend, memory", [("reference", "min"), ("cpp", "min"), ("cpp", "bottleneck")]
)
def test_pattern_matches_naive(pattern, model, backend, memory):
    cpu_backend_or_skip(backend)
    if pattern in NEEDS_TORCH_MASKS and backend != "reference":
        pytest.skip("the cpp backend draws its own dropout masks")
    naive, efficient = model_pair(model, backend, memory)
    for step in range(2):
        x_naive, x_efficient = PATTERNS[pattern](naive), PATTERNS[pattern](efficient)
        expected = train_step(naive, x_naive, seed=step)
        actual = train_step(efficient, x_efficient, seed=step)
        assert_same_step(actual, expected, TOLERANCE[torch.float64], f"{pattern}, step {step}")


def test_frozen_bn_logits_example_from_the_issue():
    """densenet_bc(depth=22, growth_rate=4), model.train() then every BN .eval(): the logits
    differed by 0.53 and num_batches_tracked was 2 instead of 1."""
    naive, efficient = model_pair("densenet_bc_22", "reference", "min")
    for model in (naive, efficient):
        model.train()
        for bn in _bns(model):
            bn.eval()
    x = _input()
    assert torch.allclose(efficient(x), naive(x), rtol=0, atol=1e-10)
    for bn in _bns(efficient):
        assert int(bn.num_batches_tracked) == 0
