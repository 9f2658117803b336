"""The drop-in contract: whatever a user does to a naive (torchvision-structured) DenseNet, the
efficient one does with the same numbers (float64, 1e-10).

Each usage pattern is one entry of ``PATTERNS``: a function ``(model, step) -> Step`` that does to
a model what a user does (set flags and attributes, copy or pickle it, hook it, trace or export
it, checkpoint it, accumulate gradients, ...) and runs one training step through it (or only a
forward, where that is the use). It runs on a naive model and on the efficient one loaded with
the same state_dict, twice in a row; the two ``Step``s must agree: output, input gradient, every
parameter gradient, every buffer after forward and after backward (so running statistics and
``num_batches_tracked`` evolve identically), and whatever else the use observed (``extras``).
Adding a pattern is one entry. Uses that cannot be supported raise one clear error at the first
call: the tests at the end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import pickle
import re
import types
from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint as checkpoint_utils
from deluge_helpers import add_rounding_floor, cldc_term_scales, randomize
from helpers import (
    TOLERANCE,
    Step,
    ask_for_second_order,
    assert_same_step,
    buffers,
    cpu_backend_or_skip,
    swap_on_conversion,
    train_step,
)
from hypothesis_compat import HealthCheck, assume, given, settings, st
from naive import randomize_bn
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrize, prune
from torch.nn.utils.parametrizations import spectral_norm

from dense_ext.deluge.cldc_params import CLDCParameters
from dense_ext.function import NOT_TWICE_DIFFERENTIABLE
from python_models import DelugeNet, DenseNet, densenet, densenet_bc
from python_models.delugenet import delugenet_cifar

Pattern = Callable[[nn.Module, int], Step]
Prepare = Callable[[nn.Module], Tensor]
SHAPE = (4, 3, 12, 12)


def _input(shape: tuple[int, ...] | None = None, seed: int = 3) -> Tensor:
    """The batch of a pattern: ``SHAPE`` unless given (``_batch_shape`` changes ``SHAPE``)."""
    shape = SHAPE if shape is None else shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@contextlib.contextmanager
def _batch_shape(shape: tuple[int, ...]):
    """Every pattern's batch has ``shape`` inside (the random-model test)."""
    global SHAPE
    saved, SHAPE = SHAPE, shape
    try:
        yield
    finally:
        SHAPE = saved


def _trained(prepare: Prepare) -> Pattern:
    """The pattern: ``prepare(model)`` sets the model up and returns the batch; one train step."""

    def pattern(model: nn.Module, step: int) -> Step:
        return train_step(model, prepare(model), seed=step)

    return pattern


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The dense blocks of a DenseNet, the stages of a DelugeNet."""
    block = re.compile(r"denseblock\d+|stage\d+")
    return [m for name, m in model.named_modules() if block.fullmatch(name.rsplit(".", 1)[-1])]


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _layers(model: nn.Module) -> list[nn.Module]:
    return [
        m for name, m in model.named_modules() if name.rsplit(".", 1)[-1].startswith("denselayer")
    ]


def _each_bn(fn: Callable[[int, nn.BatchNorm2d], None], mode: str = "train") -> Pattern:
    def prepare(model: nn.Module) -> Tensor:
        model.train(mode == "train")
        for i, bn in enumerate(_bns(model)):
            fn(i, bn)
        return _input()

    return _trained(prepare)


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


# ----------------------------------------------------------------------------- steps of other kinds


def _grad_for(out: Tensor, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(out.shape, dtype=out.dtype, generator=generator)


def _record(model, output, input_grad, after_forward, extras=None) -> Step:
    """A ``Step`` from what a use produced; gradients and buffers read from ``model``."""
    grads = {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }
    return Step(output.detach(), input_grad, grads, after_forward, buffers(model), extras or {})


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _deepcopy(model: nn.Module, step: int) -> Step:
    model.train()
    return train_step(copy.deepcopy(model), _input(), seed=step)


def _pickled(model: nn.Module, step: int) -> Step:
    """The whole module through pickle (what ``torch.save(model)`` writes; loading it back
    needs ``weights_only=False``, which this repository never calls: tests/test_checkpoint.py)."""
    model.train()
    return train_step(pickle.loads(pickle.dumps(model)), _input(), seed=step)


def _state_dict_round_trip(model: nn.Module, step: int) -> Step:
    """state_dict saved, the weights wiped, loaded back (weights_only, strict)."""
    model.train()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    return train_step(model, _input(), seed=step)


def _functional_call(model: nn.Module, step: int) -> Step:
    """torch.func.functional_call with parameters and buffers of its own (training mode)."""
    model.train()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    state = {n: b.clone() for n, b in model.named_buffers()}
    x = _input().requires_grad_()
    torch.manual_seed(step)
    out = functional_call(model, (params, state), (x,))
    after_forward = {n: b.clone() for n, b in state.items()}
    out.backward(_grad_for(out, step))
    grads = {n: p.grad for n, p in params.items()}
    return Step(out.detach(), x.grad, grads, after_forward, state)


def _func_grad(mode: str) -> Pattern:
    """torch.func.grad of a loss through functional_call, buffers passed in."""

    def pattern(model: nn.Module, step: int) -> Step:
        model.train(mode == "train")
        params = {n: p.detach() for n, p in model.named_parameters()}
        state = {n: b.clone() for n, b in model.named_buffers()}
        x = _input()
        with torch.no_grad():
            shape = functional_call(
                model, ({**params}, {n: b.clone() for n, b in state.items()}), (x,)
            ).shape
        v = _grad_for(torch.empty(shape, dtype=x.dtype), step)

        def loss(p, inp, s):
            out = functional_call(model, (p, s), (inp,))
            return (out * v).sum(), out

        (grads, input_grad), out = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(
            params, x, state
        )
        return Step(out.detach(), input_grad, grads, dict(state), dict(state))

    return pattern


def _vmap_eval(model: nn.Module, step: int) -> Step:
    """A forward ``vmap``-ed over the samples, in eval mode (no layout questions either)."""
    model.eval()
    _zero_grads(model)
    out = torch.func.vmap(lambda sample: model(sample.unsqueeze(0)).squeeze(0))(_input())
    state = buffers(model)
    return _record(model, out, None, state)


def _per_sample_grads(model: nn.Module, step: int) -> Step:
    """Per-sample gradients by torch.func's recipe, ``vmap`` over ``grad`` of a one-sample
    loss, in eval mode (each sample normalised by the running statistics). Under ``vmap``
    a tensor cannot answer layout questions: no path may ask one."""
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    state = {n: b.clone() for n, b in model.named_buffers()}
    x = _input()
    with torch.no_grad():
        v = _grad_for(model(x), step)

    def loss(p, sample, target):
        out = functional_call(model, (p, state), (sample.unsqueeze(0),)).squeeze(0)
        return (out * target).sum(), out

    per_sample = torch.func.vmap(
        torch.func.grad(loss, argnums=(0, 1), has_aux=True), in_dims=(None, 0, 0)
    )
    (grads, input_grad), out = per_sample(params, x, v)
    return Step(out, input_grad, grads, dict(state), dict(state))


def _grad_accumulation(model: nn.Module, step: int) -> Step:
    """Two micro-batches, two backward calls, gradients summed in .grad."""
    model.train()
    _zero_grads(model)
    outs, input_grads = [], []
    for micro in range(2):
        x = _input((2, *SHAPE[1:]), seed=10 * step + micro).requires_grad_()
        out = model(x)
        out.backward(_grad_for(out, 10 * step + micro))
        outs.append(out.detach())
        input_grads.append(x.grad)
    state = buffers(model)
    return _record(model, torch.cat(outs), torch.cat(input_grads), state)


def _retain_graph(model: nn.Module, step: int) -> Step:
    """backward twice through one graph (retain_graph=True), with different gradients."""
    model.train()
    _zero_grads(model)
    x = _input().requires_grad_()
    out = model(x)
    after_forward = buffers(model)
    out.backward(_grad_for(out, step), retain_graph=True)
    out.backward(_grad_for(out, step + 7))
    return _record(model, out, x.grad, after_forward)


def _forward_only(context: Callable, mode: str = "train") -> Pattern:
    def pattern(model: nn.Module, step: int) -> Step:
        model.train(mode == "train")
        _zero_grads(model)
        with context():
            out = model(_input())
        state = buffers(model)
        return _record(model, out, None, state)

    return pattern


def _input_without_grad(model: nn.Module, step: int) -> Step:
    model.train()
    _zero_grads(model)
    out = model(_input())
    after_forward = buffers(model)
    out.backward(_grad_for(out, step))
    return _record(model, out, None, after_forward)


def _frozen_backbone(model: nn.Module) -> Tensor:
    """Fine-tuning the classifier only: every feature parameter frozen."""
    model.train()
    for name, p in model.named_parameters():
        if not name.startswith("classifier."):
            p.requires_grad_(False)
    return _input()


def _channels_last_input(model: nn.Module) -> Tensor:
    model.train()
    return _input().contiguous(memory_format=torch.channels_last)


def _channels_last_model(model: nn.Module) -> Tensor:
    model.train().to(memory_format=torch.channels_last)
    return _input().contiguous(memory_format=torch.channels_last)


def _with_nan(x: Tensor) -> Tensor:
    """``x`` with one NaN pixel (sample 1, channel 0, near row 2 and column 3)."""
    x[1, 0, min(2, x.shape[2] - 1), min(3, x.shape[3] - 1)] = float("nan")
    return x


def _nan_input(model: nn.Module) -> Tensor:
    model.train()
    return _with_nan(_input())


def _nan_input_eval(model: nn.Module) -> Tensor:
    """A NaN pixel in evaluation (frozen statistics): the naive model's input gradient is NaN
    only where a NaN reaches it through the convolutions' receptive fields, never from a
    BN's eval backward, which does not read its input."""
    model.eval()
    return _with_nan(_input())


def _hooked(register: Callable[[nn.Module, dict], list]) -> Pattern:
    """``register(model, extras)`` installs hooks (returning their handles), which may change
    values and record observations into ``extras``; one training step; the hooks are removed."""

    def pattern(model: nn.Module, step: int) -> Step:
        model.train()
        extras: dict[str, Tensor] = {}
        handles = register(model, extras)
        try:
            result = train_step(model, _input(), seed=step)
        finally:
            for handle in handles:
                handle.remove()
        result.extras = extras
        return result

    return pattern


def _spectral_norm(model, extras):
    """spectral_norm on every conv and CLDC weight (installed once): reading such a weight runs
    one power iteration, which advances the vectors kept as buffers, so the efficient model may
    read each weight exactly as often as the naive one. ``extras`` counts the reads."""
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, CLDCParameters))]
    torch.manual_seed(5)  # the power iteration's random start vectors
    for module in weighted:
        if not parametrize.is_parametrized(module, "weight"):
            spectral_norm(module)
    reads = torch.zeros(())
    extras["weight reads"] = reads

    def count(*_):
        reads.add_(1)

    return [m.parametrizations.weight[0].register_forward_hook(count) for m in weighted]


def _pruned_convs(model, extras):
    """torch.nn.utils.prune on every conv (installed once, kept): the weight becomes
    ``weight_orig * weight_mask``, recomputed by a forward pre-hook; ``weight`` is no longer a
    parameter, and ``weight_orig`` gets the gradient."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and not prune.is_pruned(module):
            prune.l1_unstructured(module, "weight", amount=0.3)
    return []


def _pruning_made_permanent(model: nn.Module) -> Tensor:
    """Pruned, then ``prune.remove``: plain conv weights with zeros where the mask was, as a
    pruned model is saved and fine-tuned."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and not prune.is_pruned(module):
            prune.l1_unstructured(module, "weight", amount=0.3)
            prune.remove(module, "weight")
    return _input()


def _forward_hook_on_blocks(model, extras):
    return [b.register_forward_hook(lambda m, args, out: out * 0.5) for b in _blocks(model)]


def _forward_pre_hook_on_blocks(model, extras):
    return [b.register_forward_pre_hook(lambda m, args: (args[0] * 2,)) for b in _blocks(model)]


def _full_backward_hook_on_blocks(model, extras):
    def hook(module, grad_input, grad_output):
        extras[f"grad_output {len(extras)}"] = grad_output[0].clone()
        return (grad_input[0] * 3,)

    return [b.register_full_backward_hook(hook) for b in _blocks(model)]


def _forward_hook_on_inner_norms(model, extras):
    """A hook inside a block: the efficient block must run its modules as torchvision does."""
    norms = [layer.norm1 for layer in _layers(model)]
    return [bn.register_forward_hook(lambda m, args, out: out + 0.25) for bn in norms]


def _forward_hook_on_inner_convs(model, extras):
    def record(name):
        def hook(module, args, out):
            extras[name] = out.detach().clone()

        return hook

    return [
        layer.conv1.register_forward_hook(record(f"conv1 of layer {i}"))
        for i, layer in enumerate(_layers(model))
    ]


def _full_backward_hook_on_inner_convs(model, extras):
    """(On the convs: a full backward hook on a BN fails in torchvision's model too, whose
    in-place ReLU then modifies the hook's view.)"""

    def hook(module, grad_input, grad_output):
        return (grad_input[0] * 0.5,)

    return [layer.conv1.register_full_backward_hook(hook) for layer in _layers(model)]


def _global_forward_hook(model, extras):
    counts = {"calls": 0}

    def hook(module, args, out):
        counts["calls"] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)

    class Recorder:  # records the count when the hooks are removed
        def remove(self):
            handle.remove()
            extras["global hook calls"] = torch.tensor(float(counts["calls"]))

    return [Recorder()]


def _grad_cam(model, extras):
    """grad-CAM: the last block's activation and its gradient, kept by hooks (the gradient as
    ``g.detach()``, an alias)."""
    kept = {}
    last = _blocks(model)[-1]

    def forward_hook(module, args, out):
        kept["activation"] = out.detach()
        out.register_hook(lambda g: kept.__setitem__("gradient", g.detach()))

    handle = last.register_forward_hook(forward_hook)

    class Recorder:
        def remove(self):
            handle.remove()
            extras.update(kept)

    return [Recorder()]


def _checkpointed_blocks(model: nn.Module, step: int) -> Step:
    """Each block under torch.utils.checkpoint (non-reentrant): its forward runs again in
    backward, so BNs see two forwards in both models."""
    model.train()
    originals = {}
    for block in _blocks(model):
        forward = block.forward
        originals[block] = forward
        block.forward = lambda x, f=forward: checkpoint_utils.checkpoint(f, x, use_reentrant=False)
    try:
        return train_step(model, _input(), seed=step)
    finally:
        for block in originals:
            del block.forward


def _jit_traced(model: nn.Module, step: int) -> Step:
    model.eval()
    traced = torch.jit.trace(model, (_input(),), check_trace=False)
    return train_step(traced, _input(seed=4), seed=step)


def _fx_traced(model: nn.Module, step: int) -> Step:
    """torch.fx.symbolic_trace (what torchvision's create_feature_extractor and FX graph-mode
    quantization run) of the whole model, the traced module trained: no proxy may decide a
    branch or meet a check that wants a tensor."""
    model.train()
    traced = torch.fx.symbolic_trace(model)
    result = train_step(traced, _input(seed=4), seed=step)
    # FX does not proxy buffers: a CLDC's per-slot running statistics (column slices of its
    # buffers, naive and efficient alike) enter the graph as copies, _tensor_constantN,
    # numbered in tracing order. They are not state of the model.
    for state in (result.buffers_after_forward, result.buffers_after_backward):
        for name in [n for n in state if n.startswith("_tensor_constant")]:
            del state[name]
    return result


def _exported(mode: str) -> Pattern:
    """torch.export.export (training IR in train mode), the exported module trained."""

    def pattern(model: nn.Module, step: int) -> Step:
        model.train(mode == "train")
        exported = torch.export.export(model, (_input(),)).module()
        return train_step(exported, _input(seed=4), seed=step)

    return pattern


def _meta_then_to_empty(model: nn.Module, step: int) -> Step:
    """Deferred initialisation: a copy on the meta device (its forward gives shapes only),
    materialised with to_empty and given the weights."""
    model.train()
    state = model.state_dict()
    meta = copy.deepcopy(model).to("meta")
    shape = meta(_input().to("meta")).shape
    meta.to_empty(device="cpu")
    meta.load_state_dict(state)
    result = train_step(meta, _input(), seed=step)
    result.extras = {"meta output shape": torch.tensor(shape, dtype=torch.float64)}
    return result


def _swapping_conversions(model: nn.Module, step: int) -> Step:
    """Conversions that swap each parameter's contents (``torch.utils.swap_tensors``): what
    ``nn.Module._apply`` and ``load_state_dict`` do under PyTorch's future flag, and ``_apply``
    does for tensor subclasses. ``swap_tensors`` refuses a tensor that anything references
    weakly. A dtype round trip and a state_dict load, between steps (the second call of a
    pattern follows a training step)."""
    model.train()
    state = copy.deepcopy(model.state_dict())
    with swap_on_conversion():
        model.float().double()
        model.load_state_dict(state)
        return train_step(model, _input(), seed=step)


def _swa_update_bn(model: nn.Module) -> Tensor:
    """torch.optim.swa_utils.update_bn (stochastic weight averaging): every BN's running
    statistics reset and re-estimated as a cumulative average (momentum None) over a loader,
    the momenta restored."""
    loader = [_input(seed=seed) for seed in (11, 12)]
    torch.optim.swa_utils.update_bn(loader, model)
    model.train()
    return _input()


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
    "layers_eval_with_dropout": _trained(_layers_eval_with_dropout),
    "drop_rate_set_later": _trained(_drop_rate_set_later),
    "empty_batch": _trained(_empty_batch),
    "deepcopy": _deepcopy,
    "pickle": _pickled,
    "state_dict_round_trip": _state_dict_round_trip,
    "functional_call": _functional_call,
    "torch_func_grad_train": _func_grad("train"),
    "torch_func_grad_eval": _func_grad("eval"),
    "vmap_eval": _vmap_eval,
    "per_sample_grads": _per_sample_grads,
    "grad_accumulation": _grad_accumulation,
    "retain_graph": _retain_graph,
    "no_grad": _forward_only(torch.no_grad),
    "inference_mode": _forward_only(torch.inference_mode),
    "no_grad_eval": _forward_only(torch.no_grad, mode="eval"),
    "input_without_grad": _input_without_grad,
    "frozen_backbone": _trained(_frozen_backbone),
    "channels_last_input": _trained(_channels_last_input),
    "channels_last_model": _trained(_channels_last_model),
    "nan_input": _trained(_nan_input),
    "nan_input_eval": _trained(_nan_input_eval),
    "forward_hook_on_blocks": _hooked(_forward_hook_on_blocks),
    "forward_pre_hook_on_blocks": _hooked(_forward_pre_hook_on_blocks),
    "full_backward_hook_on_blocks": _hooked(_full_backward_hook_on_blocks),
    "forward_hook_on_inner_norms": _hooked(_forward_hook_on_inner_norms),
    "forward_hook_on_inner_convs": _hooked(_forward_hook_on_inner_convs),
    "full_backward_hook_on_inner_convs": _hooked(_full_backward_hook_on_inner_convs),
    "global_forward_hook": _hooked(_global_forward_hook),
    "grad_cam": _hooked(_grad_cam),
    "spectral_norm": _hooked(_spectral_norm),
    "pruned_convs": _hooked(_pruned_convs),
    "pruning_made_permanent": _trained(_pruning_made_permanent),
    "checkpointed_blocks": _checkpointed_blocks,
    "jit_trace": _jit_traced,
    "fx_symbolic_trace": _fx_traced,
    "export_train": _exported("train"),
    "export_eval": _exported("eval"),
    "meta_then_to_empty": _meta_then_to_empty,
    "swapping_conversions": _swapping_conversions,
    "swa_update_bn": _trained(_swa_update_bn),
}
# Patterns that draw dropout masks: only the reference backend promises F.dropout's masks (the
# cpp backend's own masks are tested in test_backend_cpp.py).
NEEDS_TORCH_MASKS = {"drop_rate_set_later"}

# Patterns that use a block's output itself: a DelugeNet stage's is a different object (the
# documented [N, S*C, H, W] buffer) from the naive stage's list of slots.
STAGE_OUTPUT_PATTERNS = {"forward_hook_on_blocks", "full_backward_hook_on_blocks", "grad_cam"}

MODELS = {
    "densenet_bc_22": lambda **kw: densenet_bc(depth=22, growth_rate=4, **kw),
    "densenet_10": lambda **kw: densenet(depth=10, growth_rate=4, **kw),
    "delugenet_20": lambda **kw: delugenet_cifar(1, 0.25, **kw),
    # ImageNet stems (conv 7x7/2, BN, ReLU, max pool 3x3/2): fused by the efficient models
    "densenet_imagenet": lambda **kw: DenseNet(4, (2, 2), 8, bn_size=2, num_classes=5, **kw),
    "delugenet_imagenet": lambda **kw: DelugeNet((2, 3), (8, 16), 8, 5, small_inputs=False, **kw),
}
# The stem does not depend on the blocks' backend and memory mode: one of them suffices.
STEM_MODELS = {"densenet_imagenet", "delugenet_imagenet"}


def model_pair(model: str, backend: str, memory: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    naive = MODELS[model](efficient=False).double()
    if model.startswith("delugenet"):  # every BN and CLDC (a CLDC's bias sets its BN's mean)
        randomize(naive, seed=1)
    else:
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
    if model in STEM_MODELS and (backend, memory) != ("cpp", "min"):
        pytest.skip("ImageNet-stem models run with the cpp backend's min mode only")
    if model == "delugenet_imagenet" and pattern == "frozen_bn":
        pytest.skip(
            "stage1.layer1.norm2.bias's gradient vanishes exactly there (a training BN follows): "
            "both models give rounding noise of 1e-15, with or without the fused stem"
        )
    if model.startswith("delugenet") and pattern in STAGE_OUTPUT_PATTERNS:
        pytest.skip(
            "a DelugeNet stage returns its slot buffer (the naive stage a list of slots): "
            "hooks that change or keep a stage's output see different objects"
        )
    if pattern in NEEDS_TORCH_MASKS and backend != "reference":
        pytest.skip("the cpp backend draws its own dropout masks")
    naive, efficient = model_pair(model, backend, memory)
    # A DelugeNet CLDC's gradients vanish up to rounding where a training BN follows it: they
    # are compared against the size of their terms (tests/deluge_helpers.py).
    scales = cldc_term_scales(naive, _input()) if model.startswith("delugenet") else None
    for step in range(2):
        expected = PATTERNS[pattern](naive, step)
        actual = PATTERNS[pattern](efficient, step)
        what = f"{pattern}, step {step}"
        assert_same_step(actual, expected, TOLERANCE[torch.float64], what, scales=scales)


# Patterns for random models: training, evaluation and BN flags, copies, accumulation, layouts,
# NaN, hooks inside blocks (hooks on a block's output differ for DelugeNet stages by design).
RANDOM_MODEL_PATTERNS = [
    "train", "eval", "frozen_bn", "mixed_bn_flags", "momentum_none", "momentum_per_bn",
    "eps_per_bn", "untracked_in_training", "untracked_in_eval", "empty_batch", "deepcopy",
    "state_dict_round_trip", "grad_accumulation", "no_grad", "input_without_grad",
    "frozen_backbone", "channels_last_input", "channels_last_model", "nan_input",
    "forward_hook_on_inner_norms", "checkpointed_blocks",
]  # fmt: skip


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    deluge=st.booleans(),
    k=st.integers(1, 6),
    blocks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    init=st.integers(1, 8),
    bn_size=st.sampled_from([None, 1, 2, 4]),
    compression=st.sampled_from([1.0, 0.5, 0.3]),
    small=st.booleans(),
    n=st.integers(2, 3),
    extra=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    pattern=st.sampled_from(RANDOM_MODEL_PATTERNS),
    backend_memory=st.sampled_from([("reference", "min"), ("cpp", "min"), ("cpp", "bottleneck")]),
)
def test_random_models_match_naive(
    deluge, k, blocks, init, bn_size, compression, small, n, extra, pattern, backend_memory
):
    """Random DenseNets (growth rate, blocks, stem width, bottleneck, compression, stem) and
    DelugeNets (slots per stage, widths, stem) under random usage patterns, naive against
    efficient, two steps each. Inputs are sized so the deepest map is at least 2x2 over a
    batch of 2-3: a training BN over 2 values is so ill-conditioned that the naive model in
    channels_last differs from itself by more than the efficient one does (hypothesis found
    such cases; docs/decisions.md, "Random whole models")."""
    backend, memory = cpu_backend_or_skip(backend_memory[0]), backend_memory[1]
    reduction = 2 ** (len(blocks) - 1) * (1 if small else 4)  # transitions (and the stem)
    shape = (n, 3, 2 * reduction + extra[0], 2 * reduction + extra[1])
    torch.manual_seed(0)
    if deluge:
        widths = tuple(4 * k * 2**i for i in range(len(blocks)))
        config = dict(stage_slots=tuple(blocks), stage_channels=widths, stem_channels=init + 1,
                      small_inputs=small)  # fmt: skip
    else:
        channels = init
        for layers in blocks[:-1]:  # a transition flooring to 0 channels raises (test_models)
            channels = int((channels + layers * k) * compression)
            assume(channels >= 1)
        config = dict(growth_rate=k, block_config=tuple(blocks), num_init_features=init,
                      bn_size=bn_size, compression=compression, small_inputs=small)  # fmt: skip
    model = DelugeNet if deluge else DenseNet
    naive = model(**config, num_classes=3, efficient=False).double()
    if deluge:  # every BN and CLDC (a CLDC's bias sets its BN's mean)
        randomize(naive, seed=1)
    else:
        randomize_bn(naive, torch.Generator().manual_seed(1))
    efficient = model(**config, num_classes=3, efficient=True, backend=backend, memory=memory)
    efficient = efficient.double()
    efficient.load_state_dict(naive.state_dict())
    with _batch_shape(shape):
        scales = cldc_term_scales(naive, _input()) if deluge else {}
        for step in range(2):
            expected = PATTERNS[pattern](naive, step)
            actual = PATTERNS[pattern](efficient, step)
            add_rounding_floor(scales, expected, TOLERANCE[torch.float64])
            what = f"{pattern}, {config}, {backend_memory}, input {shape}, step {step}"
            assert_same_step(actual, expected, TOLERANCE[torch.float64], what, scales=scales)


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


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("model", list(MODELS))
def test_exported_program_holds_only_aten_operators(model, mode):
    """Under torch.export every efficient module runs torchvision's modules (or the naive
    DelugeNet's), so the exported program holds ATen operators only: what ONNX, ExecuTorch and
    AOTInductor take. Before, the dense blocks exported as dense_ext custom operators, on which
    torch.onnx.export stopped."""
    efficient = MODELS[model](efficient=True).double().train(mode == "train")
    program = torch.export.export(efficient, (_input(),))
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    foreign = {
        str(t)
        for t in targets
        if t is not operator.getitem
        and not (isinstance(t, torch._ops.OpOverload) and t.namespace == "aten")
    }
    assert not foreign, f"non-ATen operators in the exported program: {sorted(foreign)}"


@pytest.mark.parametrize("model", list(MODELS))
def test_onnx_export_computes_the_model(model):
    """torch.onnx.export (its default, torch.export-based converter), evaluated by onnx's
    reference evaluator: the efficient model's output, in eval mode."""
    import onnx  # a test dependency (requirements.txt), with onnxscript
    from onnx.reference import ReferenceEvaluator

    _, efficient = model_pair(model, "cpp", "min")
    efficient.eval()
    x = _input()
    program = torch.onnx.export(efficient, (x,), dynamo=True, verbose=False)
    onnx.checker.check_model(program.model_proto)
    session = ReferenceEvaluator(program.model_proto)
    (out,) = session.run(None, {session.input_names[0]: x.numpy()})
    assert_close_f64(torch.from_numpy(out), efficient(x).detach())


# ----------------------------------------------------------------------------- not supported


def _double_backward_cases():
    """(name, module builder, input shape) for every efficient module kind."""
    from dense_ext import EfficientDenseBlock, EfficientTransition

    return {
        "block": (lambda b: EfficientDenseBlock(2, 3, 2, 2, memory="min", backend=b), (2, 3, 4, 4)),
        "transition": (lambda b: EfficientTransition(5, 3), (2, 5, 4, 4)),
        "model": (
            lambda b: densenet_bc(depth=10, growth_rate=2, efficient=True, backend=b),
            (2, 3, 8, 8),
        ),
    }


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", ["block", "transition", "model"])
@pytest.mark.parametrize("how", ["constant_v", "v_requires_grad", "grad_wrt_inputs", "penalty"])
def test_double_backward_raises_one_clear_error(backend, case, how):
    """Second-order gradients are not supported: every way of asking for them raises
    NOT_TWICE_DIFFERENTIABLE, never a silently wrong gradient. Before, a constant ``v`` dropped
    the second-order term silently and transitions failed with an in-place-view error."""
    cpu_backend_or_skip(backend)
    build, shape = _double_backward_cases()[case]
    torch.manual_seed(0)
    module = build(backend).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="dense_ext blocks are not twice differentiable"):
        ask_for_second_order(module, x, how)


def test_create_graph_alone_gives_first_order_gradients():
    """create_graph=True without differentiating again is fine (torch.func.grad does it)."""
    naive, efficient = model_pair("densenet_bc_22", "reference", "min")
    grads = []
    for model in (naive, efficient):
        x = _input().requires_grad_()
        out = model(x)
        (g,) = torch.autograd.grad(out, x, _grad_for(out, 0), create_graph=True)
        grads.append(g.detach())
    assert_close_f64(grads[1], grads[0])


def assert_close_f64(actual: Tensor, expected: Tensor) -> None:
    from helpers import assert_close

    assert_close(actual, expected, TOLERANCE[torch.float64], "gradient")


def test_double_backward_message_is_the_one_constant():
    assert NOT_TWICE_DIFFERENTIABLE.startswith("dense_ext blocks are not twice differentiable")


def _scripted_cases():
    """(name, builder) for every efficient module kind and every model holding them."""
    import torchvision

    from dense_ext import EfficientDenseBlock, EfficientTransition
    from dense_ext.convert import convert
    from dense_ext.deluge.modules import (
        EfficientCLDC,
        EfficientDelugeHead,
        EfficientDelugeStage,
        EfficientDelugeTransition,
        EfficientPreActBottleneck,
    )

    return {
        "block": lambda: EfficientDenseBlock(2, 3, 2, 2),
        "transition": lambda: EfficientTransition(5, 3),
        "densenet": lambda: densenet_bc(depth=10, growth_rate=2, efficient=True),
        "densenet_imagenet": lambda: MODELS["densenet_imagenet"](efficient=True),
        "converted_torchvision": lambda: convert(torchvision.models.densenet121()),
        "cldc": lambda: EfficientCLDC(4, 2),
        "stage": lambda: EfficientDelugeStage(4, 3),
        "deluge_transition": lambda: EfficientDelugeTransition(4, 3, 8),
        "deluge_entry": lambda: EfficientPreActBottleneck(3, 2, 4),
        "deluge_head": lambda: EfficientDelugeHead(4, 3),
        "delugenet": lambda: delugenet_cifar(1, 0.25, efficient=True),
    }


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("case", list(_scripted_cases()))
def test_torch_jit_script_raises_one_clear_error(case):
    """torch.jit.script (deprecated by PyTorch) cannot compile the fused paths: it names the
    supported captures instead of TorchScript's report on the first construct it rejects."""
    module = _scripted_cases()[case]()
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.export"):
        torch.jit.script(module)


# ----------------------------------------------------------------------------- modules changed
# A user may change a module inside a model after building it: an activation swapped, a BN
# removed, a conv given a bias or another padding. The fused paths compute from parameters
# alone, so where they would not see such a change the module must run itself. Every change
# below gave wrong numbers without an error before (a conv's bias, padding mode or dilation,
# a transition's pool or ReLU replaced by nn.Identity, a DelugeNet transition's stride), or
# raised where naive runs (a grouped conv, an nn.Identity BN).


def _new_conv(conv: nn.Conv2d, **changes) -> nn.Conv2d:
    """A conv like ``conv`` with ``changes`` (fresh parameters, from the global seed)."""
    args = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    return nn.Conv2d(**{**args, **changes}).double()


def _in_blocks(name: str) -> bool:
    """A module of a dense layer, transition, DelugeNet stage or entry (not the stem's)."""
    return any(part in name for part in ("layer", "transition", "entry"))


def _set_padding_mode(conv: nn.Conv2d) -> nn.Conv2d:
    conv.padding_mode = "reflect"  # changed in place: the same module object
    return conv


def _slimmed(module: nn.Module, drop_out: bool, drop_in: bool) -> nn.Module:
    """A copy of a bias-free conv or an affine BN without its last output (and/or input)
    channel, its parameters and statistics sliced from the original's."""
    if isinstance(module, nn.BatchNorm2d):
        new = nn.BatchNorm2d(module.num_features - 1).double()
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).data.copy_(getattr(module, name).data[:-1])
        return new
    assert isinstance(module, nn.Conv2d) and module.bias is None
    weight = module.weight.data[: -1 if drop_out else None, : -1 if drop_in else None]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        module.kernel_size,
        module.stride,
        module.padding,
        bias=False,
    ).double()
    new.weight.data.copy_(weight)
    return new


def _prune_bottleneck(layer: nn.Module) -> nn.Module:
    """``layer`` (a dense or DelugeNet composite layer) with one bottleneck channel less."""
    if hasattr(layer, "conv3"):  # DelugeNet: conv1 (C -> mid), conv2 (mid -> mid), conv3
        path = [("conv1", 1, 0), ("norm1", 0, 0), ("conv2", 1, 1), ("norm2", 0, 0), ("conv3", 0, 1)]
    else:  # DenseNet: conv1 (C -> mid), norm2, conv2 (mid -> k)
        path = [("conv1", 1, 0), ("norm2", 0, 0), ("conv2", 0, 1)]
    for name, drop_out, drop_in in path:
        setattr(layer, name, _slimmed(getattr(layer, name), bool(drop_out), bool(drop_in)))
    return layer


def _without_parameter(module: nn.Module, name: str) -> nn.Module:
    module.register_parameter(name, None)
    return module


def _patch_forward(module: nn.Module, scale: float) -> nn.Module:
    """``module.forward`` replaced on the instance by a bound method (deepcopy binds it to the
    copy, as it does accelerate's ``functools.partial``) that scales the class's forward."""

    def forward(self: nn.Module, *args: Tensor) -> Tensor:
        return type(self).forward(self, *args) * scale

    module.forward = types.MethodType(forward, module)
    return module


# name -> (which children to change: (qualified name, child name, child) -> bool, the change)
MUTATIONS: dict[str, tuple[Callable[[str, str, nn.Module], bool], Callable]] = {
    "conv_bias": (
        lambda full, name, m: isinstance(m, nn.Conv2d) and _in_blocks(full),
        lambda m: _new_conv(m, bias=True),
    ),
    "conv3x3_reflect_padding": (
        lambda full, name, m: (
            isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and "layer" in full
        ),
        _set_padding_mode,
    ),
    "conv3x3_dilated": (
        lambda full, name, m: (
            isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and "layer" in full
        ),
        lambda m: _new_conv(m, dilation=2, padding=2),
    ),
    "conv1x1_grouped": (
        lambda full, name, m: (
            name == "conv1"
            and "layer" in full
            and m.in_channels % 2 == 0
            and m.out_channels % 2 == 0
        ),
        lambda m: _new_conv(m, groups=2),
    ),
    "layer_relu_identity": (
        lambda full, name, m: isinstance(m, nn.ReLU) and "layer" in full,
        lambda m: nn.Identity(),
    ),
    "norm_identity": (
        lambda full, name, m: isinstance(m, nn.BatchNorm2d) and _in_blocks(full),
        lambda m: nn.Identity(),
    ),
    "norm_group_norm": (
        lambda full, name, m: isinstance(m, nn.BatchNorm2d) and _in_blocks(full),
        lambda m: nn.GroupNorm(1, m.num_features).double(),
    ),
    "transition_relu_identity": (
        lambda full, name, m: isinstance(m, nn.ReLU) and "transition" in full,
        lambda m: nn.Identity(),
    ),
    "transition_pool_identity": (
        lambda full, name, m: isinstance(m, nn.AvgPool2d) and "transition" in full,
        lambda m: nn.Identity(),
    ),
    # Every BN (stems and heads included) with one of its affine parameters removed.
    "norm_bias_only": (
        lambda full, name, m: isinstance(m, nn.BatchNorm2d),
        lambda m: _without_parameter(m, "weight"),
    ),
    "norm_weight_only": (
        lambda full, name, m: isinstance(m, nn.BatchNorm2d),
        lambda m: _without_parameter(m, "bias"),
    ),
    # One bottleneck channel pruned out of every bottleneck layer, as structured pruning does
    # (the block's or stage's spec no longer gives the channel counts).
    "bottleneck_pruned": (
        lambda full, name, m: (
            (name.startswith("denselayer") and hasattr(m, "conv2"))
            or (name.startswith("layer") and hasattr(m, "conv3"))
        ),
        lambda m: _prune_bottleneck(m),
    ),
    # A forward replaced on the instance (as HF accelerate's hooks do): the modules must run.
    "norm_forward_patched": (
        lambda full, name, m: isinstance(m, nn.BatchNorm2d) and _in_blocks(full),
        lambda m: _patch_forward(m, 1.5),
    ),
    "conv_forward_patched": (
        lambda full, name, m: isinstance(m, nn.Conv2d) and _in_blocks(full),
        lambda m: _patch_forward(m, 0.5),
    ),
    # The containers and stem modules the efficient models do not call as a whole.
    "features_or_stem_forward_patched": (
        lambda full, name, m: name in ("features", "stem"),
        lambda m: _patch_forward(m, 2.0),
    ),
    "stem_pool_forward_patched": (
        lambda full, name, m: name == "pool0" or full.endswith("stem.pool"),
        lambda m: _patch_forward(m, 2.0),
    ),
    # Fused still (the transition calls its conv module on the pooled map): must stay right.
    "transition_conv_bias": (
        lambda full, name, m: isinstance(m, nn.Conv2d) and "transition" in full,
        lambda m: _new_conv(m, bias=True),
    ),
    "transition_conv_stride_1": (
        lambda full, name, m: isinstance(m, nn.Conv2d) and "transition" in full,
        lambda m: _new_conv(m, stride=1),
    ),
}


def _mutate(model: nn.Module, mutation: str) -> int:
    """Applies ``mutation`` to ``model`` (seeded: the same new parameters in every model);
    returns how many modules it changed."""
    wanted, change = MUTATIONS[mutation]
    torch.manual_seed(5)
    changed = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if wanted(f"{parent_name}.{name}", name, child):
                setattr(parent, name, change(child))
                changed += 1
    return changed


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "model", ["densenet_bc_22", "densenet_imagenet", "delugenet_20", "delugenet_imagenet"]
)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_changed_module_matches_naive(mutation, model, mode):
    naive, efficient = model_pair(model, "cpp", "min")
    changed = _mutate(naive, mutation)
    if changed == 0:
        pytest.skip(f"{model} has no module that {mutation} changes")
    assert _mutate(efficient, mutation) == changed
    efficient.load_state_dict(naive.state_dict())
    # The ImageNet stem's /4 would leave 1x1 maps in block 2, too small for reflect padding.
    x = _input((3, 3, 32, 32)) if model.endswith("imagenet") else _input()
    scales = cldc_term_scales(naive, x) if model.startswith("delugenet") else {}
    if mode == "train":
        # A bias that a batch-statistics BN follows through linear modules only (a conv's; a
        # BN's whose ReLU is gone) has a gradient of zero up to rounding: measured against its
        # terms, each O(1) (the output gradient is standard normal).
        biases = [
            f"{name}.bias"
            for name, m in naive.named_modules()
            if isinstance(m, nn.Conv2d) or ("relu" in mutation and isinstance(m, nn.BatchNorm2d))
        ]
        scales |= {f"grad of {name}": 1.0 for name, p in naive.named_parameters() if name in biases}
    for step in range(2):
        naive.train(mode == "train"), efficient.train(mode == "train")
        expected, actual = train_step(naive, x, seed=step), train_step(efficient, x, seed=step)
        what = f"{mutation}, step {step}"
        assert_same_step(actual, expected, TOLERANCE[torch.float64], what, scales=scales)


def test_changed_modules_name_the_reason_or_stay_fused():
    """The reason a changed block runs its modules names the position; a transition whose 1x1
    conv has a bias or groups stays fused (it calls the conv module itself)."""
    from dense_ext import EfficientDenseBlock, EfficientTransition
    from dense_ext.block import unfused_reason

    block = EfficientDenseBlock(2, 4, 2, 2)
    assert unfused_reason(block) is None
    block.denselayer2.conv2 = _new_conv(block.denselayer2.conv2, bias=True)
    assert unfused_reason(block) == "denselayer2: conv2 has a bias"
    block.denselayer1.relu1 = nn.SiLU()
    assert unfused_reason(block) == "denselayer1: relu1 is a SiLU, not a ReLU"
    transition = EfficientTransition(4, 2)
    transition.conv = nn.Conv2d(4, 2, 1, bias=True, groups=2)
    assert unfused_reason(transition) is None
    transition.pool = nn.AvgPool2d(2, ceil_mode=True)
    assert unfused_reason(transition) == (
        "pool is not a 2x2, stride-2, unpadded floor-mode average pool"
    )
