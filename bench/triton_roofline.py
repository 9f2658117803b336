"""The Triton kernels against their roofline: measured on a GPU, predicted without one.

Three modes (docs/triton_kernels.md explains the model and what only a GPU can confirm):

    python bench/triton_roofline.py --predict            # no GPU: bytes, FLOPs and H100
                                                          # roofline per kernel for one training
                                                          # step, triton vs cuDNN naive, and
                                                          # the host overhead (mocked launches)
    TRITON_INTERPRET=0 python bench/triton_roofline.py --host   # host time per layer, mocked
                                                          # (bench.triton_host's measurement)
    python bench/triton_roofline.py [--dtype float32|bfloat16|float16] [--out bench/results]
                                                          # GPU: time every op of a layer
    TRITON_INTERPRET=1 python bench/triton_roofline.py --smoke  # CPU: run every op once

GPU mode: for dense-layer shapes of DenseNet-BC-100 (k=12, CIFAR, batch 64) and DenseNet-121
(k=32, ImageNet, batch 64) every op the triton backend launches per layer is timed with
``triton.testing.do_bench_cudagraph`` (replays of a captured CUDA graph: GPU time without the
host's launch overhead, which for these small kernels would otherwise be most of the number)
and set against its roofline ``max(bytes / BW, flops / PEAK)``: ``bytes`` is the compulsory
traffic, ``BW`` a large device-to-device copy and ``PEAK`` a large ``torch.mm`` in the *same
arithmetic as the kernels* (TF32 tensor cores for float32 when the fp32 precision setting allows
TF32, as the kernels do), both measured in the same run. Rows named ``probe: ...`` time
alternatives that are not in the backend yet (``probe_rows``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (label, N, H, W, C_in, k, bn_size): first, middle and last layer of a block
SHAPES = [
    ("BC-100 blk1 l1", 64, 32, 32, 24, 12, 4),
    ("BC-100 blk1 l16", 64, 32, 32, 204, 12, 4),
    ("BC-100 blk3 l16", 64, 8, 8, 330, 12, 4),
    ("D-121 blk1 l1", 64, 56, 56, 64, 32, 4),
    ("D-121 blk1 l6", 64, 56, 56, 224, 32, 4),
    ("D-121 blk3 l24", 64, 14, 14, 992, 32, 4),
    ("plain k=12 l1", 64, 32, 32, 16, 12, 0),
]
SMOKE_SHAPES = [("smoke", 2, 5, 7, 19, 6, 4), ("smoke plain", 2, 5, 7, 19, 6, 0)]


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except Exception:  # pragma: no cover
        return "unknown"


# ----------------------------------------------------------------------------------------------
# The per-layer op list: what the backend launches, with compulsory bytes and FLOPs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    bytes: int
    flops: int


def triton_layer_ops(m: int, c_in: int, k: int, bn_size: int, s: int, drop: bool) -> list[Op]:
    """One layer's forward + backward (``memory="min"``, batch statistics) as the triton
    backend runs it; ``s`` bytes per element. Each operand is read once, each output written
    once (tap re-reads of 3x3 convolutions hit L1/L2); statistics partials are negligible."""
    mid = bn_size * k
    ops = []
    if bn_size:
        f1, f3 = 2 * m * c_in * mid, 2 * 9 * m * mid * k
        ops += [
            Op("fwd 1x1 (+bn1 relu, stats)", (m * c_in + m * mid) * s, f1),
            Op("fwd 3x3 (+bn2 relu, dropout, stats)", (m * mid + m * k) * s, f3),
        ]
        if drop:
            ops.append(Op("dropout backward", 2 * m * k * s, 0))
        ops += [
            Op("fwd 1x1 recompute", (m * c_in + m * mid) * s, f1),
            Op("wgrad 3x3", (m * k + m * mid) * s, f3),
            Op("dgrad 3x3 reduce", (m * k + m * mid) * s, f3),
            Op("dgrad 3x3 apply", (m * k + 2 * m * mid) * s, f3),
            Op("wgrad 1x1", (m * mid + m * c_in) * s, f1),
            Op("dgrad 1x1 reduce", (m * mid + m * c_in) * s, f1),
            Op("dgrad 1x1 apply (+=)", (m * mid + 3 * m * c_in) * s, f1),
        ]
    else:
        f3 = 2 * 9 * m * c_in * k
        ops += [Op("fwd 3x3 (+bn1 relu, dropout, stats)", (m * c_in + m * k) * s, f3)]
        if drop:
            ops.append(Op("dropout backward", 2 * m * k * s, 0))
        ops += [
            Op("wgrad 3x3", (m * k + m * c_in) * s, f3),
            Op("dgrad 3x3 reduce", (m * k + m * c_in) * s, f3),
            Op("dgrad 3x3 apply (+=)", (m * k + 3 * m * c_in) * s, f3),
        ]
    return ops


def naive_layer_ops(m: int, c_in: int, k: int, bn_size: int, s: int) -> list[Op]:
    """The same layer as torchvision's ``_DenseLayer`` runs it on cuDNN (cat, BN, ReLU, conv as
    separate kernels; training-mode BN reads its input twice; autograd adds each layer's
    concatenated-input gradient into the earlier features)."""
    mid = bn_size * k
    f1, f3 = 2 * m * c_in * mid, 2 * 9 * m * mid * k
    ops = [
        Op("cat", 2 * m * c_in * s, 0),
        Op("bn1 fwd", 3 * m * c_in * s, 0),
        Op("relu1", 2 * m * c_in * s, 0),
        Op("conv1", (m * c_in + m * mid) * s, f1),
        Op("bn2 fwd", 3 * m * mid * s, 0),
        Op("relu2", 2 * m * mid * s, 0),
        Op("conv2", (m * mid + m * k) * s, f3),
        Op("conv2 dgrad", (m * k + m * mid) * s, f3),
        Op("conv2 wgrad", (m * k + m * mid) * s, f3),
        Op("relu2 bwd", 3 * m * mid * s, 0),
        Op("bn2 bwd", 5 * m * mid * s, 0),
        Op("conv1 dgrad", (m * mid + m * c_in) * s, f1),
        Op("conv1 wgrad", (m * mid + m * c_in) * s, f1),
        Op("relu1 bwd", 3 * m * c_in * s, 0),
        Op("bn1 bwd", 5 * m * c_in * s, 0),
        Op("cat bwd (grad accumulation)", 3 * m * c_in * s, 0),
    ]
    return ops


# DenseNet-121 (224x224) and DenseNet-BC-100 (32x32, k=12): (C0, layers, resolution) per block.
NETWORKS = {
    "DenseNet-121 224x224 b64": (32, 4, [(64, 6, 56), (128, 12, 28), (256, 24, 14), (512, 16, 7)]),
    "DenseNet-BC-100 32x32 b64": (12, 4, [(24, 16, 32), (108, 16, 16), (150, 16, 8)]),
}

# H100 SXM datasheet peaks (dense): HBM3 bandwidth, tensor-core and CUDA-core throughput.
H100 = {"bandwidth": 3.35e12, "bf16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12}


def roofline_s(op: Op, peak_flops: float) -> float:
    return max(op.bytes / H100["bandwidth"], op.flops / peak_flops)


def predict_network(name: str, batch: int, s: int, peak: float, host_us_per_layer: float | None):
    """Rows per op kind (summed over every layer of every block) for both implementations."""
    k, bn_size, blocks = NETWORKS[name]
    totals = {"triton": {}, "naive cuDNN": {}}
    layers = 0
    for c0, num_layers, res in blocks:
        m = batch * res * res
        for layer in range(num_layers):
            c_in = c0 + layer * k
            layers += 1
            for backend, ops in (
                ("triton", triton_layer_ops(m, c_in, k, bn_size, s, drop=False)),
                ("naive cuDNN", naive_layer_ops(m, c_in, k, bn_size, s)),
            ):
                for op in ops:
                    row = totals[backend].setdefault(op.name, [0, 0, 0.0, 0])
                    row[0] += op.bytes
                    row[1] += op.flops
                    row[2] += roofline_s(op, peak)
                    row[3] += 1
    lines = [f"## {name} ({layers} dense layers), one training step, dense blocks only", ""]
    for backend, rows in totals.items():
        lines += [
            f"{backend}:",
            f"  {'kernel':<38} {'launches':>8} {'GB':>8} {'GFLOP':>9} {'roofline ms':>12}",
        ]
        for op_name, (b, f, t, count) in rows.items():
            lines.append(
                f"  {op_name:<38} {count:>8} {b / 1e9:>8.2f} {f / 1e9:>9.1f} {t * 1e3:>12.3f}"
            )
        b = sum(r[0] for r in rows.values())
        f = sum(r[1] for r in rows.values())
        t = sum(r[2] for r in rows.values())
        n = sum(r[3] for r in rows.values())
        lines.append(f"  {'total':<38} {n:>8} {b / 1e9:>8.2f} {f / 1e9:>9.1f} {t * 1e3:>12.3f}")
        if backend == "triton" and host_us_per_layer is not None:
            host = host_us_per_layer * layers / 1e3
            lines.append(
                f"  host time (measured, mocked launches): {host:.2f} ms -> predicted step "
                f"max(GPU, host) = {max(t * 1e3, host):.2f} ms"
            )
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------
# Host overhead with mocked launches (no GPU)
# ----------------------------------------------------------------------------------------------


def host_us_per_layer(trials: int = 5, reps: int = 5) -> dict[str, tuple[float, float]]:
    """Per network of ``bench.triton_host`` (DenseNet-BC-100, DenseNet-121; their dense blocks
    at batch 64): CPU microseconds per layer forward + backward of the triton backend with
    every kernel launch mocked (``mock_gpu``), and Triton launches per layer."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("--host needs compiled kernels: run with TRITON_INTERPRET=0")
    from bench import triton_host

    results = triton_host.measure(trials, reps)
    return {
        name: (r["us_per_layer"], r["launches_per_layer"])
        for name, r in results.items()
        if name in triton_host.NETWORKS
    }


def _host_of(hosts: dict[str, tuple[float, float]] | None, name: str) -> float | None:
    """The measured host time per layer of the roofline network ``name``."""
    if hosts is None:
        return None
    key = "DenseNet-121" if name.startswith("DenseNet-121") else "DenseNet-BC-100 (k=12)"
    return hosts[key][0]


# ----------------------------------------------------------------------------------------------
# GPU measurement
# ----------------------------------------------------------------------------------------------


def measured_peaks(dtype: torch.dtype, device: torch.device) -> tuple[float, float, str]:
    """(bytes/s of a large copy counted as read + write, flop/s of a large mm in the kernels'
    arithmetic, which arithmetic)."""
    from triton.testing import do_bench

    from dense_ext.backends.triton._common import dot_config

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    bw = 2 * src.numel() / (ms * 1e-3)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    tf32 = dot_config(dtype, device)[2]
    arithmetic = "tf32" if tf32 else str(dtype).replace("torch.", "")
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        ms = do_bench(lambda: torch.mm(a, b), warmup=25, rep=200)
    finally:
        matmul.fp32_precision = saved
    return bw, 2 * n**3 / (ms * 1e-3), arithmetic


def layer_ops(label, n, h, w, c_in, k, bn_size, dtype, device):
    """(op name, callable, bytes, flops, baseline callable or None) for one layer's kernels."""
    from dense_ext.backends.triton.conv_dgrad import (
        conv_dgrad_bn_relu_apply_,
        conv_dgrad_bn_relu_reduce_,
    )
    from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd_, conv_weight_taps
    from dense_ext.backends.triton.conv_wgrad import bn_relu_conv_wgrad_
    from dense_ext.backends.triton.stats import channel_stats_

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor([], dtype=dtype).element_size()
    m = n * h * w
    c_total = c_in + k
    mid = bn_size * k
    hw = {"height": h, "width": w}
    feat = torch.randn(n, c_total, h, w, device=device, dtype=dtype)
    feat = feat.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(feat)
    stats = torch.empty(2, c_total, device=device, dtype=acc)

    def bn(c):
        return (
            torch.randn(c, device=device, dtype=acc) * 0.1,
            torch.rand(c, device=device, dtype=acc) + 0.5,
            torch.rand(c, device=device, dtype=acc) + 0.5,
            torch.randn(c, device=device, dtype=acc) * 0.1,
        )

    def unfused(x, bnp, weight, pad):
        mean, invstd, gamma, beta = bnp
        var = invstd.pow(-2) - 1e-5
        return lambda: F.conv2d(
            F.relu(F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-5)), weight, padding=pad
        )

    bn1 = bn(c_in)
    ops = [
        (
            "stats",
            lambda: channel_stats_(
                feat, stats, x_col=0, channels=c_in, mean_off=0, var_off=c_total
            ),
            m * c_in * s,
            0,
            None,
        )
    ]
    new = {"y_col": c_in, "mean_off": c_in, "var_off": c_total + c_in}
    for op in triton_layer_ops(m, c_in, k, bn_size, s, drop=False):
        ops.append([op.name, None, op.bytes, op.flops, None])
    if bn_size:
        w1 = torch.randn(mid, c_in, 1, 1, device=device, dtype=dtype) * 0.1
        w2 = torch.randn(k, mid, 3, 3, device=device, dtype=dtype) * 0.1
        # the 1x1 weight as the backend passes it (read in place), the 3x3 as taps
        w1t, w2t = w1, conv_weight_taps(w2, dtype)
        y1 = torch.randn(m, mid, device=device, dtype=dtype)
        y1_4d = y1.view(n, h, w, mid).permute(0, 3, 1, 2)
        dy1 = torch.empty_like(y1)
        stats2 = torch.empty(2, mid, device=device, dtype=acc)
        bn2 = bn(mid)
        sums1, sums2 = (
            torch.zeros(2, c_in, device=device, dtype=acc),
            torch.zeros(2, mid, device=device, dtype=acc),
        )
        from_new = {"dy_col": c_in, "x_col": 0, "c_in": mid, **hw}
        from_y1 = {"dy_col": 0, "x_col": 0, "c_in": c_in, **hw}

        def recompute(weight):  # the 1x1 forward without statistics, over W1 in either layout
            return lambda: bn_relu_conv_fwd_(
                feat, *bn1, weight, y1, None, None, x_col=0, c_in=c_in, y_col=0, **hw
            )

        def reduce1(weight):  # the 1x1 data gradient's reduce pass, likewise
            return lambda: conv_dgrad_bn_relu_reduce_(dy1, weight, feat, *bn1, **from_y1)

        # Before, the 1x1 kernels read W1 transposed (a copy per step): is the in-place layout
        # as fast? (Compared with the rows of the same names.)
        w1_taps = conv_weight_taps(w1, dtype)
        layout_probes = [
            ("fwd 1x1 recompute", recompute(w1_taps)),
            ("dgrad 1x1 reduce", reduce1(w1_taps)),
        ]
        calls = [
            (
                lambda: bn_relu_conv_fwd_(
                    feat,
                    *bn1,
                    w1t,
                    y1,
                    stats2,
                    None,
                    x_col=0,
                    c_in=c_in,
                    y_col=0,
                    mean_off=0,
                    var_off=mid,
                    **hw,
                ),
                unfused(feat[:, :c_in], bn1, w1, 0),
            ),  # noqa: E501
            (
                lambda: bn_relu_conv_fwd_(
                    y1, *bn2, w2t, feat, stats, None, x_col=0, c_in=mid, **new, **hw
                ),
                unfused(y1_4d, bn2, w2, 1),
            ),  # noqa: E501
            (recompute(w1t), None),
            (lambda: bn_relu_conv_wgrad_(grad, y1, *bn2, c_out=k, kernel_size=3, **from_new), None),
            (lambda: conv_dgrad_bn_relu_reduce_(grad, w2t, y1, *bn2, **from_new), None),
            (
                lambda: conv_dgrad_bn_relu_apply_(
                    grad,
                    w2t,
                    y1,
                    *bn2,
                    sums2,
                    dy1,
                    dx_col=0,
                    batch_stats=True,
                    accumulate=False,
                    **from_new,
                ),
                None,
            ),  # noqa: E501
            (
                lambda: bn_relu_conv_wgrad_(dy1, feat, *bn1, c_out=mid, kernel_size=1, **from_y1),
                None,
            ),
            (reduce1(w1t), None),
            (
                lambda: conv_dgrad_bn_relu_apply_(
                    dy1,
                    w1t,
                    feat,
                    *bn1,
                    sums1,
                    grad,
                    dx_col=0,
                    batch_stats=True,
                    accumulate=True,
                    **from_y1,
                ),
                None,
            ),  # noqa: E501
        ]
    else:
        wc = torch.randn(k, c_in, 3, 3, device=device, dtype=dtype) * 0.1
        wct = conv_weight_taps(wc, dtype)
        sums1 = torch.zeros(2, c_in, device=device, dtype=acc)
        from_new = {"dy_col": c_in, "x_col": 0, "c_in": c_in, **hw}
        calls = [
            (
                lambda: bn_relu_conv_fwd_(
                    feat, *bn1, wct, feat, stats, None, x_col=0, c_in=c_in, **new, **hw
                ),
                unfused(feat[:, :c_in], bn1, wc, 1),
            ),  # noqa: E501
            (
                lambda: bn_relu_conv_wgrad_(grad, feat, *bn1, c_out=k, kernel_size=3, **from_new),
                None,
            ),
            (lambda: conv_dgrad_bn_relu_reduce_(grad, wct, feat, *bn1, **from_new), None),
            (
                lambda: conv_dgrad_bn_relu_apply_(
                    grad,
                    wct,
                    feat,
                    *bn1,
                    sums1,
                    grad,
                    dx_col=0,
                    batch_stats=True,
                    accumulate=True,
                    **from_new,
                ),
                None,
            ),  # noqa: E501
        ]
    for row, (fn, baseline) in zip(ops[1:], calls):
        row[1], row[4] = fn, baseline
    rows = [tuple(r) for r in ops]
    if bn_size:
        rows += probe_rows(m, mid, k, s, y1, bn2, w2t, feat, grad, stats, new, hw)
        for name, fn in layout_probes:  # the same launch over the 1x1 weight transposed
            row = next(r for r in rows if r[0] == name)
            rows.append((f"probe: {name}, transposed W1", fn, *row[2:4], None))
    return rows


def probe_rows(m, mid, k, s, y1, bn2, w2t, feat, grad, stats, new, hw) -> list:
    """Rows for design questions only a GPU answers. Would the 3x3 convolution's kernels be
    faster over a Y1 normalised once (``NORMALIZE=False``: no BN-ReLU prologue) than with the
    BN-ReLU applied to every tap as it is loaded (nine times per Y1 element)?

    * forward: a BN2-ReLU pass over Y1 (in place: Y1 is scratch in ``memory="min"``) plus the
      plain convolution, against the "fwd 3x3" row (same statistics epilogue and merge, no
      dropout, like that row);
    * weight gradient: the plain kernel against the "wgrad 3x3" row; the normalised Y1 would
      come from the backward's recompute of Y1 as a second output (one more write of Y1's
      size, not timed here).

    And one more: the 3x3 data gradient's two passes with dZ kept between them in the
    bottleneck gradient's buffer (``DZ_IN_DX``: one product instead of two, one more write
    and read of Y1's size) against the sum of the "dgrad 3x3 reduce" and "apply" rows.
    """
    from dense_ext.backends.triton._common import dot_config, rows_stride
    from dense_ext.backends.triton.conv_dgrad import _REDUCE, _Pass, dgrad_site
    from dense_ext.backends.triton.conv_fwd import fwd_sites
    from dense_ext.backends.triton.conv_wgrad import sum_splits, wgrad_site

    dtype, device = feat.dtype, feat.device
    dot = dot_config(dtype, device)
    y1_stride, feat_stride = rows_stride(y1, "y1"), rows_stride(feat, "feat")
    fwd = fwd_sites(
        m, y1_stride, 0, feat_stride, new["y_col"], mid, k, 3, hw["height"], hw["width"],
        dtype, device, dot, (new["mean_off"], new["var_off"]), None,
    )  # fmt: skip
    plain_fwd = fwd.conv.variant(NORMALIZE=False)
    acc = bn2[0].dtype
    part = torch.empty(fwd.part_shape, dtype=acc, device=device)

    def plain_conv():
        plain_fwd(y1, *bn2, w2t, feat, part, bn2[0])
        fwd.merge(part, stats, stats)

    wgrad, wgrad_shape = wgrad_site(
        m, feat_stride, new["y_col"], y1_stride, 0, mid, k, 3, (hw["height"], hw["width"]),
        dtype, device, dot,
    )  # fmt: skip
    plain_wgrad = wgrad.variant(NORMALIZE=False)
    wgrad_part = torch.empty(wgrad_shape, dtype=acc, device=device)

    def plain_weight_grad():
        plain_wgrad(grad, y1, *bn2, wgrad_part)
        return sum_splits(wgrad_part)

    strides, cols = (feat_stride, y1_stride, y1_stride), (new["y_col"], 0, 0)
    size = (hw["height"], hw["width"])
    (reduce_site, part_shape), (apply_site, _) = (
        dgrad_site(m, strides, cols, mid, k, 3, size, dtype, device, dot, what)
        for what in (_REDUCE, _Pass(apply=True, batch_stats=True))
    )
    reduce_kept, apply_kept = (s.variant(DZ_IN_DX=True) for s in (reduce_site, apply_site))
    reduce_part = torch.empty(part_shape, dtype=acc, device=device)
    dy1 = torch.empty_like(y1)

    def dgrad_with_dz_kept():
        reduce_kept(grad, w2t, y1, *bn2, bn2[0], reduce_part, dy1)
        apply_kept(grad, w2t, y1, *bn2, reduce_part.sum(dim=0), bn2[0], dy1)

    mean, invstd, gamma, beta = bn2
    kernel = _bn_relu_rows_kernel()
    block_c = 1 << (mid - 1).bit_length()

    def bn_relu_pass():
        kernel[(-(-m // 64),)](y1, mean, invstd, gamma, beta, m, mid, BLOCK_M=64, BLOCK_C=block_c)

    f3 = 2 * 9 * m * mid * k
    return [
        ("probe: bn2 relu pass over Y1", bn_relu_pass, 2 * m * mid * s, 0, None),
        ("probe: fwd 3x3 of normalised Y1", plain_conv, (m * mid + m * k) * s, f3, None),
        ("probe: wgrad 3x3 of normalised Y1", plain_weight_grad, (m * k + m * mid) * s, f3, None),
        (
            "probe: dgrad 3x3 reduce + apply, dZ kept",
            dgrad_with_dz_kept,
            (m * k + 4 * m * mid) * s,
            f3,
            None,
        ),
    ]


_BN_RELU_ROWS = None


def _bn_relu_rows_kernel():
    """``Y = relu((Y - mean) * invstd * gamma + beta)`` in place over rows ``[M, C]`` (the
    probe's elementwise pass; defined on first use, so the module imports without a GPU)."""
    global _BN_RELU_ROWS
    if _BN_RELU_ROWS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def bn_relu_rows(Y, MEAN, INVSTD, GAMMA, BETA, M, C, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr):  # fmt: skip
            rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
            rc = tl.arange(0, BLOCK_C)
            c_ok = rc < C
            ok = (rm < M)[:, None] & c_ok[None, :]
            scale = tl.load(INVSTD + rc, mask=c_ok, other=0.0) * tl.load(GAMMA + rc, mask=c_ok)
            shift = tl.load(BETA + rc, mask=c_ok) - tl.load(MEAN + rc, mask=c_ok) * scale
            ptrs = Y + rm[:, None] * C + rc[None, :]
            y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            z = tl.maximum(y * scale[None, :] + shift[None, :], 0.0)
            tl.store(ptrs, z.to(Y.dtype.element_ty), mask=ok)

        _BN_RELU_ROWS = bn_relu_rows
    return _BN_RELU_ROWS


def gpu_main(args) -> int:
    if not torch.cuda.is_available():
        sys.exit("triton_roofline needs a CUDA GPU (use --predict or --smoke without one)")
    import triton
    from triton.testing import do_bench_cudagraph

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    bw, peak, arithmetic = measured_peaks(dtype, device)
    gpu = torch.cuda.get_device_name(device)
    meta = {
        "gpu": gpu,
        "dtype": args.dtype,
        "arithmetic": arithmetic,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "measured_copy_bandwidth_GBps": bw / 1e9,
        "measured_mm_TFLOPs": peak / 1e12,
        "timing": "do_bench_cudagraph (GPU time, host launch overhead excluded)",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(meta))
    rows = []
    for shape in SHAPES:
        for name, fn, nbytes, flops, baseline in layer_ops(*shape, dtype, device):
            fn()  # compile outside the graph capture
            ms = do_bench_cudagraph(fn, rep=100)
            roof = max(nbytes / bw, flops / peak) * 1e3
            row = {
                "shape": shape[0],
                "op": name,
                "ms": ms,
                "roofline_ms": roof,
                "pct_of_roofline": 100 * roof / ms,
                "GBps": nbytes / (ms * 1e-3) / 1e9,
                "TFLOPs": flops / (ms * 1e-3) / 1e12,
            }
            if baseline is not None:
                row["unfused_torch_ms"] = do_bench_cudagraph(baseline, rep=100)
            rows.append(row)
            extra = f"  unfused {row['unfused_torch_ms']:.4f} ms" if baseline is not None else ""
            print(
                f"{shape[0]:<16} {name:<36} {ms:.4f} ms  roofline {roof:.4f} ms "
                f"({row['pct_of_roofline']:.0f} %){extra}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"triton_roofline_{gpu.replace(' ', '_')}_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Triton kernels vs roofline: {gpu}, {args.dtype} ({arithmetic}), torch "
        f"{torch.__version__}, triton {triton.__version__}, commit {meta['commit']}",
        "",
        f"Measured copy bandwidth {bw / 1e9:.0f} GB/s, mm ({arithmetic}) {peak / 1e12:.1f} "
        "TFLOP/s. Times: CUDA-graph replays (no host overhead).",
        "",
        "| shape | op | ms | roofline ms | % of roofline | unfused torch ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = f"{r['unfused_torch_ms']:.4f}" if "unfused_torch_ms" in r else ""
        lines.append(
            f"| {r['shape']} | {r['op']} | {r['ms']:.4f} | {r['roofline_ms']:.4f} | "
            f"{r['pct_of_roofline']:.0f} | {base} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")
    return 0


def predict_main(args) -> int:
    hosts = None if args.no_host else host_us_per_layer()
    lines = [
        "# Predicted H100 SXM roofline of one training step (datasheet peaks: "
        f"{H100['bandwidth'] / 1e12:.2f} TB/s, bf16 {H100['bf16'] / 1e12:.0f} / TF32 "
        f"{H100['tf32'] / 1e12:.0f} TFLOP/s dense)",
        "",
    ]
    for net, (us, launches) in (hosts or {}).items():
        lines += [
            f"Host overhead, triton backend, {net} (python -m bench.triton_host, mocked "
            f"launches): {us:.0f} us per layer forward+backward ({launches:.1f} Triton launches "
            "per layer).",
            "",
        ]
    for name, dtype, s, peak in (
        ("DenseNet-121 224x224 b64", "bf16 autocast", 2, H100["bf16"]),
        ("DenseNet-BC-100 32x32 b64", "bf16 autocast", 2, H100["bf16"]),
        ("DenseNet-BC-100 32x32 b64", "float32 (TF32)", 4, H100["tf32"]),
    ):
        lines.append(f"# {name}, {dtype}")
        lines += predict_network(name, 64, s, peak, _host_of(hosts, name))
    print("\n".join(lines))
    return 0


def smoke_main(args) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke runs the interpreted kernels: set TRITON_INTERPRET=1")
    for shape in SMOKE_SHAPES:
        for name, fn, _, _, baseline in layer_ops(*shape, getattr(torch, args.dtype), "cpu"):
            fn()
            if baseline is not None:
                baseline()
            print(f"smoke {shape[0]:<12} {name}: ran")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="run every op once on tiny CPU shapes")
    mode.add_argument("--predict", action="store_true", help="roofline prediction, no GPU")
    mode.add_argument("--host", action="store_true", help="host time per layer, mocked launches")
    parser.add_argument("--no-host", action="store_true", help="--predict without host timing")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke_main(args)
    if args.predict:
        return predict_main(args)
    if args.host:
        for net, (us, launches) in host_us_per_layer().items():
            print(
                f"{net}: host time per layer forward+backward {us:.0f} us ({launches:.1f} launches)"
            )
        return 0
    return gpu_main(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
