"""The triton backend's eager layer loop: every launch of a block prepared once per shape.

At the sizes of a dense layer a kernel runs for a few microseconds, so the host must not spend
much more per launch. ``backend.py``'s traced loop (the one ``torch.compile`` sees) calls the
ops with keyword arguments, and each launcher works out its block sizes, grid, strides and
alignments, then Triton binds and specialises the arguments: about 50 us per launch here.
This loop instead keeps, per block shape (``BlockPlan``: shapes, dtype, the fp32 precision
setting, each BN's train/eval flag and eps, dropout rates), the ``LaunchSite`` of every kernel
of every layer, built by the very functions the launchers use (``fwd_sites``, ``dgrad_site``,
``wgrad_site``, ...). A step then does, per layer, the launches, the tensor operations that are
launches on a GPU too (BN normalisers, 3x3 weight transposes, the partial-sum reductions) and
little else. Each launch calls the compiled kernel's launcher directly (``LaunchSite.bound``)
when every buffer and parameter is 16-byte aligned (checked once per step), else takes
Triton's checked path. The arithmetic and the kernels are those of the traced loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dense_ext.backends.base import BlockCall, ForwardState, NormCall
from dense_ext.backends.triton import conv_dgrad, conv_fwd, conv_wgrad, dropout, stats
from dense_ext.backends.triton._common import (
    INTERPRETED,
    LaunchSite,
    _launch_hooks,
    current_stream,
)

_APPLY_STORE = conv_dgrad._Pass(apply=True)


@dataclass(frozen=True)
class LayerPlan:
    """The launch sites of one layer (``None`` where the layer has no such launch)."""

    c_in: int
    conv1: conv_fwd.FwdSites | None  # bottleneck conv (KS=1) into Y1, with BN2's statistics
    conv2: conv_fwd.FwdSites  # the 3x3 conv into the buffer, with BN1 statistics and dropout
    recompute: conv_fwd.FwdSites | None  # conv1 again in backward (memory="min")
    dropout: LaunchSite | None  # backward mask of the layer's gradient slice
    taps: LaunchSite  # the layer's 3x3 weight into the kernels' layout (conv_weight_taps)
    # backward of the 3x3 conv (over Y1, or over the prefix for plain layers); a weight
    # gradient's launches: the partials, the sum over their splits (None: one split)
    wgrad2: tuple[LaunchSite, tuple[int, ...], LaunchSite | None]
    reduce2: tuple[LaunchSite, tuple[int, ...]]
    apply2: LaunchSite
    # backward of the bottleneck conv (bottleneck layers)
    wgrad1: tuple[LaunchSite, tuple[int, ...], LaunchSite | None] | None
    reduce1: tuple[LaunchSite, tuple[int, ...]] | None
    apply1: LaunchSite | None


@dataclass(frozen=True)
class BlockPlan:
    """Every launch of one block shape, and the per-step scratch it needs."""

    initial_stats: tuple[LaunchSite, LaunchSite] | None  # statistics of the block input
    layers: tuple[LayerPlan, ...]
    stats_scratch: int  # elements of the partial-statistics scratch shared by the forward
    uniform_bn1: float | None  # the eps of every BN1 when all use batch statistics
    uniform_bn2: float | None  # the same for the bottleneck BNs
    # Whether the forward's statistics merges also write the BN normalisers (``uniform_bn*``
    # set and float32 statistics: stats.merge_site), so no layer computes them with tensor ops.
    merged_inv1: bool
    merged_inv2: bool


def plan_key(call: BlockCall, shape: Sequence[int], dtype, device, dot, seeds: bool) -> tuple:
    """What a ``BlockPlan`` depends on besides the tensors themselves."""
    flags = tuple((norm.batch_stats, norm.eps) for norm in call.norms)
    return (call.spec, tuple(shape), dtype, device, dot, flags, tuple(call.drop_rates), seeds)


def build_plan(call: BlockCall, shape, dtype, device, dot, seeds: bool) -> BlockPlan:
    """The ``BlockPlan`` of ``call`` for a feature buffer of ``shape`` (N, C_total, H, W)."""
    spec = call.spec
    n, c_total, h, w = shape
    m, k, mid = n * h * w, spec.growth_rate, spec.mid_channels
    hw = (h, w)
    uniform_bn1 = _uniform_eps([call.bn1(i) for i in range(spec.num_layers)])
    uniform_bn2 = None
    if spec.has_bottleneck:
        uniform_bn2 = _uniform_eps([call.bn2(i) for i in range(spec.num_layers)])
    # The merges' normalisers: eps arrives as a float32 argument, so float32 statistics only.
    inv_eps1 = None if _fp64(dtype) else uniform_bn1
    inv_eps2 = None if _fp64(dtype) else uniform_bn2
    acc_elems = 0
    initial = None
    if call.stats1_needed:
        inv0 = None if inv_eps1 is None else (0, inv_eps1)
        tile, merge, part_shape = stats.stats_sites(
            m, c_total, 0, spec.num_input_features, 0, c_total, device, inv0
        )
        initial = (tile.own(), merge.own())
        acc_elems = _numel(part_shape)
    layers = []
    for index in range(spec.num_layers):
        c_in = spec.in_channels(index)
        p = call.drop_rates[index]
        drop = (index, float(p)) if seeds and p > 0 else None
        stats1 = (c_in, c_total + c_in) if call.stats1_needed else None
        inv1 = None if inv_eps1 is None else (c_in, inv_eps1)

        # Every site of the plan is its own (LaunchSite.own): the direct launch may assume the
        # alignments of this plan's tensors only. The 1x1 convolutions read their weight as it
        # is (W_AS_CONV; backend._WeightForms.taps passes it in place).
        def fwd(x_stride, c_from, y_stride, y_col, c_out, ks, stats_offsets, dropout_of, inv=None):
            sites = conv_fwd.fwd_sites(
                m, x_stride, 0, y_stride, y_col, c_from, c_out, ks, h, w, dtype, device, dot,
                stats_offsets, dropout_of, inv, w_as_conv=ks == 1,
            )  # fmt: skip
            merge = None if sites.merge is None else sites.merge.own()
            return replace(sites, conv=sites.conv.own(), merge=merge)

        def dgrad(strides, cols, c_from, c_out, ks, what):
            site, part_shape = conv_dgrad.dgrad_site(
                m, strides, cols, c_from, c_out, ks, hw, dtype, device, dot, what, ks == 1
            )
            return site.own(), part_shape

        def wgrad(dy_stride, dy_col, x_stride, c_from, c_out, ks):
            site, part_shape = conv_wgrad.wgrad_site(
                m, dy_stride, dy_col, x_stride, 0, c_from, c_out, ks, hw, dtype, device, dot
            )
            summed = conv_wgrad.sum_splits_site(part_shape)
            return site.own(), part_shape, None if summed is None else summed.own()

        drop_site = None
        if drop is not None:
            fp64 = _fp64(dtype)
            drop_site = dropout.dropout_site(m, c_total, c_in, k, index, drop[1], fp64).own()
        norm1 = call.bn1(index)
        prefix_pass = conv_dgrad._Pass(apply=True, batch_stats=norm1.batch_stats, accumulate=True)
        if spec.has_bottleneck:
            norm2 = call.bn2(index)
            stats2 = (index * 2 * mid, index * 2 * mid + mid) if norm2.batch_stats else None
            inv2 = None if inv_eps2 is None else (index * mid, inv_eps2)
            conv1 = fwd(c_total, c_in, mid, 0, mid, 1, stats2, None, inv2)
            conv2 = fwd(mid, mid, c_total, c_in, k, 3, stats1, drop, inv1)
            recompute = None
            if not spec.saves_bottleneck_outputs:
                recompute = fwd(c_total, c_in, mid, 0, mid, 1, None, None)
            from_new = ((c_total, mid, 0), (c_in, 0, 0))
            mid_pass = conv_dgrad._Pass(apply=True, batch_stats=norm2.batch_stats)
            from_y1 = ((mid, c_total, 0), (0, 0, 0))
            into_prefix = ((mid, c_total, c_total), (0, 0, 0))
            plan = LayerPlan(
                c_in=c_in,
                conv1=conv1,
                conv2=conv2,
                recompute=recompute,
                dropout=drop_site,
                taps=conv_fwd.weight_taps_site(k, mid, 3).own(),
                wgrad2=wgrad(c_total, c_in, mid, mid, k, 3),
                reduce2=dgrad(*from_new, mid, k, 3, conv_dgrad._REDUCE),
                apply2=dgrad((c_total, mid, mid), (c_in, 0, 0), mid, k, 3, mid_pass)[0],
                wgrad1=wgrad(mid, 0, c_total, c_in, mid, 1),
                reduce1=dgrad(*from_y1, c_in, mid, 1, conv_dgrad._REDUCE),
                apply1=dgrad(*into_prefix, c_in, mid, 1, prefix_pass)[0],
            )
            acc_elems = max(acc_elems, *(_numel(s.part_shape) for s in (conv1, conv2)))
        else:
            conv2 = fwd(c_total, c_in, c_total, c_in, k, 3, stats1, drop, inv1)
            from_new = ((c_total, c_total, 0), (c_in, 0, 0))
            into_prefix = ((c_total, c_total, c_total), (c_in, 0, 0))
            plan = LayerPlan(
                c_in=c_in,
                conv1=None,
                conv2=conv2,
                recompute=None,
                dropout=drop_site,
                taps=conv_fwd.weight_taps_site(k, c_in, 3).own(),
                wgrad2=wgrad(c_total, c_in, c_total, c_in, k, 3),
                reduce2=dgrad(*from_new, c_in, k, 3, conv_dgrad._REDUCE),
                apply2=dgrad(*into_prefix, c_in, k, 3, prefix_pass)[0],
                wgrad1=None,
                reduce1=None,
                apply1=None,
            )
            acc_elems = max(acc_elems, _numel(conv2.part_shape))
        layers.append(plan)
    return BlockPlan(
        initial_stats=initial,
        layers=tuple(layers),
        stats_scratch=acc_elems,
        uniform_bn1=uniform_bn1,
        uniform_bn2=uniform_bn2,
        merged_inv1=inv_eps1 is not None,
        merged_inv2=inv_eps2 is not None,
    )


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for s in shape:
        count *= s
    return count


def _fp64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


def _uniform_eps(norms: Sequence[NormCall]) -> float | None:
    """The common eps of ``norms`` if all normalise with batch statistics, else None."""
    eps = {norm.eps for norm in norms}
    if len(eps) == 1 and all(norm.batch_stats for norm in norms):
        return eps.pop()
    return None


def launcher(tensors: Sequence[Tensor]):
    """``go(site, *tensors)``: the direct launch when every tensor in ``tensors`` (the buffers
    and parameters of the step; fresh allocations are aligned) is 16-byte aligned and nothing
    listens to Triton's launch hooks, else Triton's checked path."""
    if not INTERPRETED and not _launch_hooks() and all(t.data_ptr() & 15 == 0 for t in tensors):
        stream = current_stream()
        return lambda site, *args: site.bound(stream, *args)
    return lambda site, *args: site(*args)


def invstd(var: Tensor, eps: float) -> Tensor:
    """``rsqrt(var + eps)`` (the normaliser every kernel takes), as the reference computes it."""
    return torch.add(var, eps).rsqrt_()


def normaliser(norm: NormCall, mean: Tensor | None, var: Tensor | None, acc: torch.dtype):
    """``(mean, invstd)`` of one BN: of the batch (``mean``, ``var``) or of its running
    statistics."""
    if not norm.batch_stats:
        assert norm.running_mean is not None and norm.running_var is not None
        mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    assert mean is not None and var is not None
    return mean, invstd(var, norm.eps)


def bn_vector(p: Tensor, acc: torch.dtype) -> Tensor:
    """A BN parameter as the kernels read it: contiguous, in the accumulation dtype. Kernels
    only read its memory, so a parameter already in that form is passed as is (detached only
    for the interpreter, which converts arguments to numpy arrays)."""
    if p.dtype == acc and p.is_contiguous():
        return p.detach() if INTERPRETED else p
    return p.detach().to(acc).contiguous()


def alignment_bases(call: BlockCall, params: Sequence[Tensor], *buffers: Tensor) -> list[Tensor]:
    """The tensors whose 16-byte alignment decides the direct launch path (``launcher``)."""
    bases = [*buffers, *params]
    for norm in call.norms:
        if not norm.batch_stats and norm.running_mean is not None:
            bases.append(norm.running_mean)
            if norm.running_var is not None:
                bases.append(norm.running_var)
    return bases


def run_forward(plan: BlockPlan, feat: Tensor, state: ForwardState, params, call, taps, seeds):
    """The layer loop of the forward: fills ``feat``'s new channels and the statistics."""
    spec = call.spec
    acc = state.stats1.dtype
    dev = feat.device
    stats1, stats2 = state.stats1, state.stats2
    # The normalisers the statistics merges write (BlockPlan.merged_inv*); else each layer
    # computes its own from the variances.
    inv1_all = torch.empty(stats1.shape[1], dtype=acc, device=dev) if plan.merged_inv1 else None
    inv2_all = None
    if plan.merged_inv2:
        inv2_all = torch.empty((spec.num_layers, spec.mid_channels), dtype=acc, device=dev)
    bases = [feat, stats1, stats2, *(t for t in (inv1_all, inv2_all) if t is not None)]
    go = launcher(alignment_bases(call, params, *bases))
    scratch = torch.empty(plan.stats_scratch, dtype=acc, device=dev)
    into1 = stats1 if inv1_all is None else inv1_all  # the merges' third tensor
    into2 = stats2 if inv2_all is None else inv2_all
    var1 = stats1[1] if plan.layers and call.stats1_needed and inv1_all is None else None
    rows2: Sequence[Tensor] = ()  # per layer: BN2's [2, mid] statistics
    vars2: Sequence[Tensor] = ()  # its variances, or the merge's normalisers (merged_inv2)
    if spec.has_bottleneck and call.stats2_needed:
        rows2 = stats2.unbind(0)
        vars2 = stats2[:, 1].unbind(0) if inv2_all is None else inv2_all.unbind(0)
    keep = call.save and spec.saves_bottleneck_outputs
    n, _, h, w = feat.shape
    y1_shape = (n * h * w, spec.mid_channels)
    y1_scratch = None
    if spec.has_bottleneck and not keep:
        y1_scratch = torch.empty(y1_shape, dtype=feat.dtype, device=dev)
    if plan.initial_stats is not None:
        tile, merge = plan.initial_stats
        go(tile, feat, scratch)
        go(merge, scratch, stats1, into1)
    ppl = spec.params_per_layer
    for index, layer in enumerate(plan.layers):
        p = params[index * ppl : (index + 1) * ppl]
        if inv1_all is not None:
            mean1, inv1 = stats1, inv1_all
        elif plan.uniform_bn1 is not None:
            mean1, inv1 = stats1, invstd(var1, plan.uniform_bn1)
        else:
            mean1, inv1 = normaliser(call.bn1(index), stats1, var1, acc)
        bn1 = (mean1, inv1, bn_vector(p[0], acc), bn_vector(p[1], acc))
        conv2 = layer.conv2
        if layer.conv1 is None:  # plain layer: BN1-ReLU-conv3x3 of the prefix
            w1 = taps(p[2], layer.taps, go)
            drop = seeds if conv2.conv.constexprs["DROPOUT"] else mean1
            go(conv2.conv, feat, *bn1, w1, feat, scratch, drop)
            if conv2.merge is not None:
                go(conv2.merge, scratch, stats1, into1)
            continue
        y1 = y1_scratch
        if keep:
            y1 = torch.empty(y1_shape, dtype=feat.dtype, device=dev)
        w1 = taps(p[2])
        go(layer.conv1.conv, feat, *bn1, w1, y1, scratch, mean1)
        if layer.conv1.merge is not None:
            go(layer.conv1.merge, scratch, stats2, into2)
        if keep:
            state.bottlenecks.append(y1)
        row, var2 = (rows2[index], vars2[index]) if rows2 else (None, None)
        if inv2_all is not None and row is not None:
            mean2, inv2 = row, var2  # vars2 holds the merges' normalisers
        elif plan.uniform_bn2 is not None and row is not None:
            mean2, inv2 = row, invstd(var2, plan.uniform_bn2)
        else:
            mean2, inv2 = normaliser(call.bn2(index), row, var2, acc)
        drop = seeds if conv2.conv.constexprs["DROPOUT"] else mean2
        go(conv2.conv, y1, mean2, inv2, bn_vector(p[3], acc), bn_vector(p[4], acc),
           taps(p[5], layer.taps, go), feat, scratch, drop)  # fmt: skip
        if conv2.merge is not None:
            go(conv2.merge, scratch, stats1, into1)


def run_backward(plan: BlockPlan, grad_feat: Tensor, feat: Tensor, state: ForwardState, params,
                 call: BlockCall, taps) -> list[Tensor | None]:  # fmt: skip
    """The layer loop of the backward, in reverse layer order; returns the parameter gradients
    (``grad_feat[:, :C0]`` holds the input gradient afterwards)."""
    spec = call.spec
    stats1, stats2, seeds = state.stats1, state.stats2, state.dropout
    acc = stats1.dtype
    bases = [grad_feat, feat, stats1, stats2]
    if seeds is not None:
        bases.append(seeds)
    go = launcher(alignment_bases(call, params, *bases))
    n, _, h, w = feat.shape
    m, mid = n * h * w, spec.mid_channels
    dev = feat.device
    var1 = stats1[1] if call.stats1_needed else None
    # Statistics are final in backward: one normaliser serves every layer when all BNs agree.
    inv1_all = None if plan.uniform_bn1 is None else invstd(var1, plan.uniform_bn1)
    rows2: Sequence[Tensor] = ()
    inv2_all: Sequence[Tensor] = ()
    grad_y1 = y1_scratch = None
    if spec.has_bottleneck:
        if call.stats2_needed:
            rows2 = stats2.unbind(0)
        if plan.uniform_bn2 is not None:
            inv2_all = invstd(stats2[:, 1], plan.uniform_bn2).unbind(0)
        grad_y1 = torch.empty((m, mid), dtype=feat.dtype, device=dev)
        if not spec.saves_bottleneck_outputs:
            y1_scratch = torch.empty((m, mid), dtype=feat.dtype, device=dev)
    grads: list[Tensor | None] = [None] * len(params)
    ppl = spec.params_per_layer
    for index in reversed(range(spec.num_layers)):
        layer = plan.layers[index]
        first = index * ppl
        p = params[first : first + ppl]
        if layer.dropout is not None:
            go(layer.dropout, grad_feat, seeds)
        if inv1_all is not None:
            mean1, inv1 = stats1, inv1_all
        else:
            mean1, inv1 = normaliser(call.bn1(index), stats1, var1, acc)
        bn1 = (mean1, inv1, bn_vector(p[0], acc), bn_vector(p[1], acc))
        if layer.conv1 is None:  # plain layer
            w1 = taps(p[2], layer.taps, go)
            grad_w1 = _wgrad(go, layer.wgrad2, grad_feat, feat, bn1, acc, dev)
            sums1 = _reduce(go, layer.reduce2, grad_feat, w1, feat, bn1, dev)
            go(layer.apply2, grad_feat, w1, feat, *bn1, sums1, mean1, grad_feat)
            beta1, gamma1 = sums1.unbind(0)
            layer_grads = [gamma1, beta1, grad_w1]
        else:
            w1 = taps(p[2])
            if layer.recompute is not None:
                y1 = y1_scratch
                go(layer.recompute.conv, feat, *bn1, w1, y1, mean1, mean1)
            else:
                y1 = state.bottlenecks[index]
            row = rows2[index] if rows2 else None
            if inv2_all:
                mean2, inv2 = row, inv2_all[index]
            else:
                mean2, inv2 = normaliser(call.bn2(index), row, None if row is None else row[1], acc)
            bn2 = (mean2, inv2, bn_vector(p[3], acc), bn_vector(p[4], acc))
            w2 = taps(p[5], layer.taps, go)
            grad_w2 = _wgrad(go, layer.wgrad2, grad_feat, y1, bn2, acc, dev)
            sums2 = _reduce(go, layer.reduce2, grad_feat, w2, y1, bn2, dev)
            go(layer.apply2, grad_feat, w2, y1, *bn2, sums2, mean2, grad_y1)
            grad_w1 = _wgrad(go, layer.wgrad1, grad_y1, feat, bn1, acc, dev)
            sums1 = _reduce(go, layer.reduce1, grad_y1, w1, feat, bn1, dev)
            go(layer.apply1, grad_y1, w1, feat, *bn1, sums1, mean1, grad_feat)
            beta1, gamma1 = sums1.unbind(0)
            beta2, gamma2 = sums2.unbind(0)
            layer_grads = [gamma1, beta1, grad_w1, gamma2, beta2, grad_w2]
        for i, g in enumerate(layer_grads):
            dtype = params[first + i].dtype
            grads[first + i] = g if g.dtype == dtype else g.to(dtype)
    return grads


def _wgrad(go, sites, dy, x, bn, acc, dev) -> Tensor:
    """A weight gradient (accumulation dtype): the partials over row splits, then their sum."""
    site, part_shape, summed = sites
    part = torch.empty(part_shape, dtype=acc, device=dev)
    go(site, dy, x, *bn, part)
    if summed is None:
        return part[0]
    grad = torch.empty(part_shape[1:], dtype=acc, device=dev)
    go(summed, part, grad)
    return grad


def _reduce(go, site_shape, dy, w_taps, x, bn, dev) -> Tensor:
    site, part_shape = site_shape
    part = torch.empty(part_shape, dtype=bn[0].dtype, device=dev)
    go(site, dy, w_taps, x, *bn, bn[0], part, x)
    return part.sum(dim=0)
