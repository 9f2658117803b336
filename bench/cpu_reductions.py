"""Time the CPU reduction kernels of two builds of the extension against each other.

    python -m bench.cpu_reductions OLD.so NEW.so [--rounds 7] [--reps 20] [--step]

Each round runs one fresh process per library, alternately (the two builds register the same
``torch.ops.dense_ext`` names, so they cannot share a process); a process loads its library with
``torch.ops.load_library`` and reports, per kernel, the median of ``--reps`` calls. Printed: per
kernel and library, the median over rounds, and new/old. Shapes are those of DenseNet-BC-100
(k = 12) at batch 16 on CIFAR (first block: M = 16*32*32 rows, 216 channels at the end, the
12 new channels and the 48-channel bottleneck whose statistics a layer computes) and of a
DelugeNet CLDC over 4 slots of 64 channels at 16x16.

``--step`` times a whole training step instead (forward and backward, backend "cpp"; ``--model``
DenseNet-BC-100 at batch 16 or DenseNet-121 at 224x224, batch 4; ``--memory`` "min" or
"bottleneck"): each process imports a copy of this checkout's ``dense_ext`` package with the
given library as its extension.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
torch.ops.load_library(sys.argv[1])
reps = int(sys.argv[2])
ops = torch.ops.dense_ext
g = torch.Generator().manual_seed(0)

def cl(*shape):
    x = torch.randn(*shape, generator=g) * 1.5 + 0.5
    return x.contiguous(memory_format=torch.channels_last)

def bn_args(c):
    mean = torch.randn(c, generator=g) * 0.1 + 0.5
    var = torch.rand(c, generator=g) + 1.0
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g) * 0.1
    return mean, var, gamma, beta

def median_ms(fn):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]

x216, g216 = cl(16, 216, 32, 32), cl(16, 216, 32, 32)
x48, g48 = cl(16, 48, 32, 32), cl(16, 48, 32, 32)
x12 = cl(16, 12, 32, 32)
stats216, stats48, stats12 = torch.empty(2, 216), torch.empty(2, 48), torch.empty(2, 12)
m216, v216, ga216, b216 = bn_args(216)
dx216 = torch.empty_like(x216)
dgamma, dbeta = torch.empty(216), torch.empty(216)
sums = torch.zeros(2, 216)
chunk = x216[:2]  # block.cpp's chunks of about 2048 rows: 2 images of 32x32
gchunk, dchunk = g216[:2], dx216[:2]
xc, gc = cl(16, 4 * 64, 16, 16), cl(16, 64, 16, 16)
cmean, calpha = torch.randn(4, 64, generator=g) * 0.1, torch.rand(4, 64, generator=g)
csums, cdx = torch.empty(5, 64), torch.zeros_like(xc)

kernels = {
    "channel_stats [16384, 216]": lambda: ops.channel_stats(x216, stats216, 0),
    "channel_stats [16384, 48]": lambda: ops.channel_stats(x48, stats48, 0),
    "channel_stats [16384, 12]": lambda: ops.channel_stats(x12, stats12, 0),
    "bn_relu_backward [16384, 216]": lambda: ops.bn_relu_backward(
        g216, x216, m216, v216, ga216, b216, 1e-5, True, False, dx216, dgamma, dbeta),
    "bn_relu_backward_reduce [2048, 216]": lambda: ops.bn_relu_backward_reduce(
        gchunk, chunk, m216, v216, ga216, b216, 1e-5, dchunk, sums),
    "cldc_grad_step [4096, 4x64]": lambda: ops.cldc_grad_step(
        gc, xc, cmean, calpha, cdx, csums, None, None, None, None),
}
print(json.dumps({name: median_ms(fn) for name, fn in kernels.items()}))
"""

STEP_CHILD = r"""
import json, sys, time
import torch
import dense_ext
import python_models
assert dense_ext.__file__.startswith(sys.argv[1]), dense_ext.__file__
reps, which, memory = int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
if which == "densenet121":
    model = python_models.densenet121(efficient=True, memory=memory, backend="cpp")
    x, y, name = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,)), "DenseNet-121 b4"
else:
    model = python_models.densenet_bc(100, 12, efficient=True, memory=memory, backend="cpp")
    x, y, name = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), "DenseNet-BC-100 b16"

def step():
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()

step()
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({f"{name} cpp {memory} step": 1e3 * times[len(times) // 2]}))
"""


def run_once(lib: str, reps: int) -> dict[str, float]:
    """One child process on ``lib``: per kernel, the median time of ``reps`` calls (ms)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, lib, str(reps)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def package_with(lib: str, root: Path) -> Path:
    """A copy of this checkout's ``dense_ext`` under ``root`` with ``lib`` as its extension."""
    repo = Path(__file__).resolve().parents[1]
    target = root / "dense_ext"
    shutil.copytree(repo / "dense_ext", target, ignore=shutil.ignore_patterns("_C*.so"))
    shutil.copy(lib, target / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0]))
    return root


def run_step_once(root: Path, reps: int, model: str, memory: str) -> dict[str, float]:
    """One child process importing ``dense_ext`` from ``root``: the median step time (ms)."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", STEP_CHILD, str(root), str(reps), model, memory],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{root}:{repo}"},
        cwd=root,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the extension library (.so) before the change")
    parser.add_argument("new", help="the extension library (.so) after the change")
    parser.add_argument("--rounds", type=int, default=7, help="processes per library")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per kernel or steps")
    parser.add_argument("--step", action="store_true", help="time a whole training step")
    parser.add_argument(
        "--model", choices=["densenet_bc_100", "densenet121"], default="densenet_bc_100"
    )
    parser.add_argument("--memory", choices=["min", "bottleneck"], default="min")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        roots = {
            which: package_with(lib, Path(tmp) / which) if args.step else Path(lib)
            for which, lib in (("old", args.old), ("new", args.new))
        }
        for _ in range(args.rounds):
            for which in ("old", "new"):
                if args.step:
                    runs[which].append(
                        run_step_once(roots[which], args.reps, args.model, args.memory)
                    )
                else:
                    runs[which].append(run_once(str(roots[which]), args.reps))
    print(f"{'kernel':40s} {'old ms':>8s} {'new ms':>8s} {'new/old':>8s}")
    for name in runs["old"][0]:
        old = statistics.median(r[name] for r in runs["old"])
        new = statistics.median(r[name] for r in runs["new"])
        print(f"{name:40s} {old:8.3f} {new:8.3f} {new / old:8.3f}")


if __name__ == "__main__":
    main()
