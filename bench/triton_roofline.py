"""Microbenchmark of each Triton kernel of the dense block against its roofline (GPU).

For dense-layer shapes of DenseNet-BC-100 (k=12, CIFAR, batch 64) and DenseNet-121 (k=32,
ImageNet block 1, batch 64), every op the triton backend launches per layer is timed with
``triton.testing.do_bench`` (median and 20/80 % quantiles) and set against

* its roofline time ``max(bytes / BW, flops / PEAK)``, where ``bytes`` is the compulsory traffic
  (each operand read once, each output written once) and ``BW``/``PEAK`` are *measured* on this
  GPU in the same run (a large device-to-device copy; a large ``torch.mm`` in the same dtype and
  TF32 setting), so the percentages do not rely on datasheet numbers;
* for the forward ops, the unfused PyTorch sequence computing the same thing
  (``batch_norm -> relu -> conv2d`` on channels_last tensors: cuDNN).

    python bench/triton_roofline.py [--dtype float32|bfloat16|float16] [--out bench/results]
    TRITON_INTERPRET=1 python bench/triton_roofline.py --smoke   # CPU: run every op once, no timing

Rows record GPU name, dtype, torch/triton versions and the git commit. Results go to
``<out>/triton_roofline_<gpu>_<dtype>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, N, H, W, C_in, k, bn_size): first, middle and last layer of a block
SHAPES = [
    ("BC-100 blk1 l1", 64, 32, 32, 24, 12, 4),
    ("BC-100 blk1 l16", 64, 32, 32, 204, 12, 4),
    ("BC-100 blk3 l16", 64, 8, 8, 444, 12, 4),
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


def measured_peaks(dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(bytes/s of a large copy counted as read + write, flop/s of a large mm in ``dtype``)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    bw = 2 * src.numel() / (ms * 1e-3)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = do_bench(lambda: torch.mm(a, b), warmup=25, rep=200)
    return bw, 2 * n**3 / (ms * 1e-3)


def layer_ops(label, n, h, w, c_in, k, bn_size, dtype, device):
    """(op name, callable, bytes, flops, baseline callable or None) for one layer's kernels."""
    from dense_ext.backends.triton.conv_dgrad import (
        conv_dgrad_bn_relu_apply,
        conv_dgrad_bn_relu_reduce,
    )
    from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd, conv_weight_taps
    from dense_ext.backends.triton.conv_wgrad import bn_relu_conv_wgrad
    from dense_ext.backends.triton.stats import channel_stats

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor([], dtype=dtype).element_size()
    m = n * h * w
    c_total = c_in + k
    mid = bn_size * k
    feat = torch.randn(n, c_total, h, w, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    grad = torch.randn_like(feat)
    stats = torch.empty(2, c_total, device=device, dtype=acc)

    def bn(c):
        return (
            torch.randn(c, device=device, dtype=acc) * 0.1,
            torch.rand(c, device=device, dtype=acc) + 0.5,
            torch.rand(c, device=device, dtype=acc) + 0.5,
            torch.randn(c, device=device, dtype=acc) * 0.1,
        )

    def unfused(x, c, bnp, weight, pad):
        mean, invstd, gamma, beta = bnp
        var = invstd.pow(-2) - 1e-5
        return lambda: F.conv2d(
            F.relu(F.batch_norm(x, mean, var, gamma, beta, False, 0.0, 1e-5)), weight, padding=pad
        )

    ops = []
    bn1 = bn(c_in)
    prefix = feat[:, :c_in]
    ops.append(
        ("stats", lambda: channel_stats(feat, 0, c_in, stats, 0, c_total), m * c_in * s, 0, None)
    )
    if bn_size:
        w1 = torch.randn(mid, c_in, 1, 1, device=device, dtype=dtype) * 0.1
        w2 = torch.randn(k, mid, 3, 3, device=device, dtype=dtype) * 0.1
        w1t, w2t = conv_weight_taps(w1, dtype), conv_weight_taps(w2, dtype)
        y1 = torch.randn(m, mid, device=device, dtype=dtype)
        y1_4d = y1.view(n, h, w, mid).permute(0, 3, 1, 2)
        dy1 = torch.empty_like(y1)
        stats2 = torch.empty(2, mid, device=device, dtype=acc)
        bn2 = bn(mid)
        f1, f3 = 2 * m * c_in * mid, 2 * m * 9 * mid * k
        sums2 = torch.zeros(2, mid, device=device, dtype=acc)
        sums1 = torch.zeros(2, c_in, device=device, dtype=acc)
        ops += [
            (
                "fwd 1x1 (+bn1 relu, stats)",
                lambda: bn_relu_conv_fwd(
                    feat, 0, c_in, *bn1, w1t, y1, 0, None, stats2, 0, mid, h, w
                ),
                (m * c_in + m * mid) * s,
                f1,
                unfused(prefix, c_in, bn1, w1, 0),
            ),
            (
                "fwd 3x3 (+bn2 relu, stats)",
                lambda: bn_relu_conv_fwd(
                    y1, 0, mid, *bn2, w2t, feat, c_in, None, stats, c_in, c_total + c_in, h, w
                ),
                (m * mid + m * k) * s,
                f3,
                unfused(y1_4d, mid, bn2, w2, 1),
            ),
            (
                "wgrad 3x3",
                lambda: bn_relu_conv_wgrad(grad, c_in, k, None, y1, 0, mid, *bn2, 3, h, w),
                (m * mid + m * k) * s,
                f3,
                None,
            ),
            (
                "dgrad 3x3 reduce",
                lambda: conv_dgrad_bn_relu_reduce(grad, c_in, None, w2t, y1, 0, mid, *bn2, h, w),
                (m * mid + m * k) * s,
                f3,
                None,
            ),
            (
                "dgrad 3x3 apply",
                lambda: conv_dgrad_bn_relu_apply(
                    grad, c_in, None, w2t, y1, 0, mid, *bn2, sums2, dy1, 0, True, False, h, w
                ),
                (2 * m * mid + m * k) * s,
                f3,
                None,
            ),
            (
                "wgrad 1x1",
                lambda: bn_relu_conv_wgrad(dy1, 0, mid, None, feat, 0, c_in, *bn1, 1, h, w),
                (m * mid + m * c_in) * s,
                f1,
                None,
            ),
            (
                "dgrad 1x1 reduce",
                lambda: conv_dgrad_bn_relu_reduce(dy1, 0, None, w1t, feat, 0, c_in, *bn1, h, w),
                (m * mid + m * c_in) * s,
                f1,
                None,
            ),
            (
                "dgrad 1x1 apply (+=)",
                lambda: conv_dgrad_bn_relu_apply(
                    dy1, 0, None, w1t, feat, 0, c_in, *bn1, sums1, grad, 0, True, True, h, w
                ),
                (m * mid + 3 * m * c_in) * s,
                f1,
                None,
            ),
        ]
    else:
        wc = torch.randn(k, c_in, 3, 3, device=device, dtype=dtype) * 0.1
        wct = conv_weight_taps(wc, dtype)
        f3 = 2 * m * 9 * c_in * k
        sums1 = torch.zeros(2, c_in, device=device, dtype=acc)
        ops += [
            (
                "fwd 3x3 (+bn1 relu, stats)",
                lambda: bn_relu_conv_fwd(
                    feat, 0, c_in, *bn1, wct, feat, c_in, None, stats, c_in, c_total + c_in, h, w
                ),
                (m * c_in + m * k) * s,
                f3,
                unfused(prefix, c_in, bn1, wc, 1),
            ),
            (
                "wgrad 3x3",
                lambda: bn_relu_conv_wgrad(grad, c_in, k, None, feat, 0, c_in, *bn1, 3, h, w),
                (m * c_in + m * k) * s,
                f3,
                None,
            ),
            (
                "dgrad 3x3 reduce",
                lambda: conv_dgrad_bn_relu_reduce(grad, c_in, None, wct, feat, 0, c_in, *bn1, h, w),
                (m * c_in + m * k) * s,
                f3,
                None,
            ),
            (
                "dgrad 3x3 apply (+=)",
                lambda: conv_dgrad_bn_relu_apply(
                    grad, c_in, None, wct, feat, 0, c_in, *bn1, sums1, grad, 0, True, True, h, w
                ),
                (3 * m * c_in + m * k) * s,
                f3,
                None,
            ),
        ]
    return ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--smoke", action="store_true", help="run every op once on tiny CPU shapes")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the interpreted kernels: set TRITON_INTERPRET=1")
        for shape in SMOKE_SHAPES:
            for name, fn, _, _, baseline in layer_ops(*shape, dtype, torch.device("cpu")):
                fn()
                if baseline is not None:
                    baseline()
                print(f"smoke {shape[0]:<12} {name}: ran")
        return 0

    if not torch.cuda.is_available():
        sys.exit("triton_roofline needs a CUDA GPU (use --smoke on CPU)")
    import triton
    from triton.testing import do_bench

    device = torch.device("cuda")
    bw, peak = measured_peaks(dtype, device)
    gpu = torch.cuda.get_device_name(device)
    meta = {
        "gpu": gpu,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "tf32": torch.backends.cudnn.allow_tf32,
        "measured_copy_bandwidth_GBps": bw / 1e9,
        "measured_mm_TFLOPs": peak / 1e12,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(meta))
    rows = []
    for shape in SHAPES:
        for name, fn, nbytes, flops, baseline in layer_ops(*shape, dtype, device):
            med, lo, hi = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            roof = max(nbytes / bw, flops / peak) * 1e3
            row = {
                "shape": shape[0],
                "op": name,
                "ms": med,
                "ms_p20": lo,
                "ms_p80": hi,
                "roofline_ms": roof,
                "pct_of_roofline": 100 * roof / med,
                "GBps": nbytes / (med * 1e-3) / 1e9,
                "TFLOPs": flops / (med * 1e-3) / 1e12,
            }
            if baseline is not None:
                row["unfused_torch_ms"] = do_bench(baseline, warmup=25, rep=100)
            rows.append(row)
            extra = f"  unfused {row['unfused_torch_ms']:.4f} ms" if baseline is not None else ""
            print(
                f"{shape[0]:<16} {name:<30} {med:.4f} ms  roofline {roof:.4f} ms "
                f"({row['pct_of_roofline']:.0f} %){extra}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"triton_roofline_{gpu.replace(' ', '_')}_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# Triton kernels vs roofline: {gpu}, {args.dtype}, torch {torch.__version__}, "
        f"triton {triton.__version__}, commit {meta['commit']}",
        "",
        f"Measured copy bandwidth {bw / 1e9:.0f} GB/s, mm {peak / 1e12:.1f} TFLOP/s.",
        "",
        "| shape | op | ms (p20-p80) | roofline ms | % of roofline | unfused torch ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = f"{r['unfused_torch_ms']:.4f}" if "unfused_torch_ms" in r else ""
        lines.append(
            f"| {r['shape']} | {r['op']} | {r['ms']:.4f} ({r['ms_p20']:.4f}-{r['ms_p80']:.4f}) | "
            f"{r['roofline_ms']:.4f} | {r['pct_of_roofline']:.0f} | {base} |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
