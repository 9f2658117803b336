"""``@triton.jit`` helpers shared by the convolution kernels, and the host helpers around them.

Conventions of every kernel in this package:

* A "rows" operand is a ``[M, C]`` matrix with row stride ``*_row_stride`` and unit channel
  stride: the ``rows`` view of a channels_last ``[N, C, H, W]`` buffer or a contiguous 2-D
  scratch tensor; row ``m`` is the pixel ``(n, h, w)`` with ``m = (n*H + h)*W + w``.
* Convolution weights are passed as ``[KS*KS, C_in, C_out]`` contiguous (tap-major).
* A 3x3 tap ``(ky, kx)`` reads the pixel ``(h + ky - 1, w + kx - 1)``; outside the image the
  *post-activation* value is 0 (zero padding of ``relu(bn(x))``, not of ``x``).
* BN-ReLU is ``relu((x - mean) * (gamma * invstd) + beta)`` in the accumulation dtype
  (float32, float64 for float64 buffers): the same arithmetic as the reference backend,
  which keeps the result exact to rounding on data with a large mean (``x*scale + shift``
  would cancel catastrophically there). The ReLU propagates NaN like ``torch.relu``.
* Matrix-multiply operands are rounded to what the tensor cores read (``mma_operand``): the
  buffer dtype, or TF32 (round to nearest, ties away) for float32 with TF32 allowed.
* Row counts (``M``, and what derives from the batch size) are not specialised by Triton
  (``do_not_specialize``), so a new batch size does not recompile the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode
from triton import knobs
from triton.runtime.driver import driver

from dense_ext.backends.triton import interpret_requested

INTERPRETED = interpret_requested()


def _patch_interpreter_loop_bounds() -> None:
    """Triton < 3.7's interpreter turns a loop bound into a Python int with ``int(ndarray)`` on a
    shape-(1,) array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted");
    every kernel here loops to a bound computed from its arguments. Do what Triton 3.7+ does
    (``int(data.squeeze())``). A no-op on versions that already do."""
    import inspect

    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if "squeeze" in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _patch_interpreter_loop_bounds()

# Whether float32 convolutions on CPU (interpreted kernels) emulate TF32 when the fp32
# precision setting allows it. Off by default (PyTorch's CPU convolutions never use TF32);
# tests switch it on to check the TF32 arithmetic of the GPU kernels under the interpreter.
EMULATE_TF32_ON_CPU = False

# Integers that change with the batch size (or per layer) and that the kernels do not need
# specialised: Triton would otherwise compile a variant per value class (== 1, % 16 == 0).
UNSPECIALISED = ("M", "rows_per_split", "num_tiles", "part_row", "layer")


def kernel(fn):
    """``triton.jit`` with the batch-dependent integer arguments not specialised."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in UNSPECIALISED if n in names])


# Triton's interpreter converts float32 to bfloat16 by truncation and has no inline PTX;
# compiled kernels round to nearest even and round TF32 operands with ``cvt.rna``. Under the
# interpreter both roundings are done by hand, bit for bit the same. The variant is picked here,
# once, rather than by a constexpr global (Triton re-checks those on every launch). Each variant
# is defined under the name the kernels call: torch.compile (inductor) re-emits a user kernel's
# helpers from their source under their function names, so an alias (``round_tf32 =
# _round_tf32_compiled``) would leave the name the kernel calls undefined.
if INTERPRETED:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """``x.to(dtype)`` with round-to-nearest-even also under the interpreter."""
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def round_tf32(x):
        """float32 rounded to TF32 (10-bit mantissa), to nearest with ties away from zero, as
        the PTX ``cvt.rna.tf32.f32`` does (by hand here: the interpreter has no inline PTX)."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, rounded)

else:

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """``x.to(dtype)``: compiled conversions round to nearest even."""
        return x.to(dtype)

    @triton.jit
    def round_tf32(x):
        """float32 rounded to TF32 (10-bit mantissa), to nearest with ties away from zero: the
        PTX ``cvt.rna.tf32.f32``. The tensor cores read only the top 19 bits of an fp32
        operand, i.e. they *truncate*; rounding first halves the error (what cuDNN and cuBLAS
        do)."""
        return tl.inline_asm_elementwise(
            "cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def round_tf32_kernel(X_ptr, Y_ptr, N, BLOCK: tl.constexpr):
    """``Y = round_tf32(X)`` over ``N`` float32 values: the in-kernel rounding, for checks."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y_ptr + r, round_tf32(tl.load(X_ptr + r, mask=r < N)), mask=r < N)


@triton.jit
def mma_operand(x, dtype: tl.constexpr, TF32: tl.constexpr):
    """A GEMM operand computed in registers, rounded to what the tensor cores consume."""
    if TF32:
        return round_tf32(x.to(tl.float32))
    else:
        return round_to(x, dtype)


@triton.jit
def relu(z):
    """``max(z, 0)`` keeping NaN (``tl.maximum`` alone returns 0 for NaN; torch returns NaN)."""
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tap_source(rm, row_ok, hh, ww, H, W, dy, dx, KS: tl.constexpr):
    """Rows read by tap offset (dy, dx) for output rows ``rm`` and whether they lie in the image."""
    if KS == 1:
        return rm, row_ok
    else:
        src = rm + dy * W + dx
        ok = row_ok & (hh + dy >= 0) & (hh + dy < H) & (ww + dx >= 0) & (ww + dx < W)
        return src, ok


@triton.jit
def row_offsets(rows, row_stride, col, ALIGN: tl.constexpr):
    """Element offsets ``rows * row_stride + col`` (int64) of a rows operand's channel ``col``,
    declared multiples of ``ALIGN`` (``vec_align`` of stride and column, computed on the host)
    so that loads and stores along the channels vectorise: Triton itself only knows about
    integers divisible by 16, and DenseNet channel counts (216, 300, ...) rarely are."""
    offsets = rows.to(tl.int64) * row_stride + col
    if ALIGN > 1:
        offsets = tl.multiple_of(offsets, ALIGN)
    return offsets


@triton.jit
def weight_rows(rows, C_IN, ALIGN: tl.constexpr):
    """Element offsets ``rows * C_IN`` (int32: a weight is far below 2**31 elements) of a 1x1
    conv weight's rows, declared multiples of ``ALIGN`` (which divides ``C_IN``) as
    ``row_offsets`` does for activations."""
    offsets = rows * C_IN
    if ALIGN > 1:
        offsets = tl.multiple_of(offsets, ALIGN)
    return offsets


@triton.jit
def channels_ok(rc, C, ALIGN: tl.constexpr):
    """``rc < C``, written so that Triton sees the mask constant over groups of ``ALIGN``
    channels (else it cannot vectorise a masked load): the host's ``ALIGN`` divides ``C``, and
    channel tiles start at multiples of their (>= 16) width."""
    if ALIGN > 1:
        return (rc // ALIGN) < (C // ALIGN)
    else:
        return rc < C


@triton.jit
def load_bn_params(MEAN_ptr, INVSTD_ptr, GAMMA_ptr, BETA_ptr, rc, c_ok):
    """Per-channel ``mean, invstd, scale = gamma*invstd, beta`` (accumulation dtype)."""
    mean = tl.load(MEAN_ptr + rc, mask=c_ok, other=0.0)
    invstd = tl.load(INVSTD_ptr + rc, mask=c_ok, other=0.0)
    gamma = tl.load(GAMMA_ptr + rc, mask=c_ok, other=0.0)
    beta = tl.load(BETA_ptr + rc, mask=c_ok, other=0.0)
    return mean, invstd, gamma * invstd, beta


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc += a @ b`` with the accumulator's dtype as the product dtype (float64 needs it
    spelled out: ``tl.dot`` defaults to a float32 ``out_dtype``).

    An IEEE float32 dot is a chain of FMAs into its accumulator: fed ``acc``, a reduction over
    M rows becomes one M-term chain whose rounding error grows with M (on the H200 the wgrad of
    a 1024-row batch had 2.65x cuDNN's error: 6.1e-7 against 2.3e-7). So there each block
    sums into a fresh tile that is then added to ``acc``: a BLOCK-term chain plus an
    M/BLOCK-term one (host emulation, tools/emulate_fp32_dot_chain.py: 4.8e-7 -> 2.3e-7).
    The fresh tile is ``acc * 0``, not a constant: Triton folds ``acc + dot(a, b, 0)`` back
    into ``dot(a, b, acc)`` (the PTX is then identical), and IEEE forbids folding ``x * 0``.
    Tensor-core dots (TF32, half types) and float64 keep the fused accumulator."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if INPUT_PRECISION == "ieee" and a.dtype == tl.float32 and acc.dtype == tl.float32:
        fresh = acc * 0.0
        return acc + tl.dot(a, b, fresh, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def launch(kernel, grid: tuple[int, ...], *args, **constexprs) -> tuple | None:
    """``kernel[grid](*args, **constexprs)``: every non-constexpr argument positional, in order.

    While torch traces or functionalises (``torch.compile``, ``make_fx``, fake tensors) the
    kernel goes through ``torch.library.wrap_triton`` so that the launch becomes a graph node;
    under the interpreter it runs as is; otherwise through ``FastLaunch``, and the compiled
    kernel's launch entry is returned (``LaunchSite`` keeps it).
    """
    if INTERPRETED:
        kernel[grid](*args, **constexprs)
    elif _tracing():
        _wrapped(kernel)[grid](*args, **constexprs)
    else:
        return _fast(kernel)(grid, args, constexprs)
    return None


@functools.cache
def _wrapped(kernel):
    return torch.library.wrap_triton(kernel)


@functools.cache
def _fast(kernel) -> FastLaunch:
    return FastLaunch(kernel)


_INT32 = range(-(2**31), 2**31)


def _launch_hooks() -> bool:
    """Whether anything (a profiler) listens to Triton's launch hooks."""
    hook = knobs.runtime.launch_enter_hook
    return bool(hook.calls) if hasattr(hook, "calls") else hook is not None


class FastLaunch:
    """Launches a compiled kernel with a fraction of Triton's host time per launch.

    ``kernel[grid](...)`` binds the arguments, asks Triton's specialiser about each one, builds
    a cache key and checks globals on every launch: ~14 us of host time here, for kernels that
    run for a few microseconds. The first launch of each *specialisation* goes through Triton
    (compiling if needed); later ones call the compiled kernel's launcher directly. The key
    holds at least what Triton specialises on: every constexpr and launch option, each
    tensor's dtype and 16-byte alignment, each specialised integer's ``== 1`` / ``% 16 == 0``,
    and every integer's 32/64-bit width. Launch hooks (profilers) take Triton's path.
    """

    def __init__(self, kernel) -> None:
        params = kernel.params
        self.kernel = kernel
        self.num_args = sum(not p.is_constexpr for p in params)
        if any(p.is_constexpr for p in params[: self.num_args]):
            raise TypeError(f"{kernel.fn.__name__}: constexpr parameters must come last")
        self.free = [bool(p.do_not_specialize) for p in params[: self.num_args]]
        self.constexpr_names = [p.name for p in params[self.num_args :]]
        self.compiled: dict[tuple, tuple] = {}

    def key(self, args: tuple, constexprs: dict) -> tuple:
        key: list = [tuple(constexprs.items())]
        for arg, free in zip(args, self.free):
            if isinstance(arg, torch.Tensor):
                key.append((arg.dtype, arg.data_ptr() & 15 == 0))
            elif type(arg) is int:
                key.append(arg in _INT32 if free else (arg in _INT32, arg == 1, arg & 15 == 0))
            else:  # floats and bools: typed, not specialised on value
                key.append(type(arg))
        return tuple(key)

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict) -> tuple:
        """Launch; returns ``(run, function, packed metadata, constexpr values)`` of the compiled
        kernel that ran (what a later direct launch of the same specialisation needs)."""
        if len(args) != self.num_args:
            raise TypeError(f"{self.kernel.fn.__name__}: {len(args)} of {self.num_args} arguments")
        key = self.key(args, constexprs)
        hit = self.compiled.get(key)
        if hit is None or _launch_hooks():
            compiled = self.kernel[grid](*args, **constexprs)
            tail = [constexprs[name] for name in self.constexpr_names]
            hit = (compiled.run, compiled.function, compiled.packed_metadata, tail)
            self.compiled[key] = hit
            return hit
        run, function, packed, tail = hit
        grid = (*grid, 1, 1)
        run(grid[0], grid[1], grid[2], current_stream(), function, packed, None, None, None,
            *args, *tail)  # fmt: skip
        return hit


def current_stream() -> int:
    """The stream Triton launches on: the current stream of the current device."""
    return driver.active.get_current_stream(driver.active.get_current_device())


class LaunchSite:
    """One launch of a kernel with everything but its tensors fixed: the grid, the scalar
    arguments (which follow the tensors in every kernel here) and the constexprs.

    The launchers build their sites from integers (``functools.lru_cache``), and the backend's
    eager layer loop keeps them for a whole block, so a step's host work per launch is the
    launch itself. ``site(*tensors)`` checks what Triton specialises on (through
    ``launch``/``FastLaunch``); ``site.bound(stream, *tensors)`` calls the compiled kernel's
    launcher directly, for tensors the caller guarantees to have the dtypes and 16-byte
    alignments of the first ``bound`` launch of this site (the backend checks the alignment of
    every buffer once per step; offsets of views into them are fixed by the shapes).
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "_entry")

    def __init__(self, kernel, grid: tuple[int, ...], scalars: tuple, constexprs: dict) -> None:
        self.kernel = kernel
        self.grid = (*grid, 1, 1)[:3]
        self.scalars = tuple(scalars)
        self.constexprs = constexprs
        self._entry: tuple | None = None

    def __call__(self, *tensors) -> tuple | None:
        return launch(self.kernel, self.grid, *tensors, *self.scalars, **self.constexprs)

    def own(self) -> LaunchSite:
        """The same launch with its own direct-launch entry: the builders' cache shares a site
        between every caller with the same integers, whose tensors may be views at offsets of
        different alignment (a bottleneck BN's statistics row of another layer index)."""
        return LaunchSite(self.kernel, self.grid, self.scalars, self.constexprs)

    def variant(self, **constexprs) -> LaunchSite:
        """The same launch with some constexprs changed (another compiled variant of the kernel;
        the benchmark's probes and the tests use it)."""
        return LaunchSite(self.kernel, self.grid, self.scalars, self.constexprs | constexprs)

    def bound(self, stream: int, *tensors) -> None:
        entry = self._entry
        if entry is None or INTERPRETED:
            hit = self(*tensors)
            if hit is not None and not INTERPRETED:
                run, function, packed, tail = hit
                self._entry = (run, function, packed, (*self.scalars, *tail))
            return
        run, function, packed, tail = entry
        g = self.grid
        run(g[0], g[1], g[2], stream, function, packed, None, None, None, *tensors, *tail)


def _tracing() -> bool:
    # is_compiling() first: dynamo folds it to True and never traces the dispatch-mode query
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host (``triton.cdiv`` costs microseconds per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def device_guard(device: torch.device):
    """Make ``device`` current while kernels launch: Triton launches on the current device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def on_tensor_device(launcher):
    """Decorator: run ``launcher`` with its first tensor argument's device made current."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with device_guard(device):
            return launcher(*args, **kwargs)

    guarded.device_guarded = True
    return guarded


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of a buffer dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_fp32_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what PyTorch's cuDNN convolutions use for float32.

    The fused kernels replace cuDNN convolutions, so they follow the same setting: the new API
    (``torch.backends.cudnn.conv.fp32_precision``, falling back to ``torch.backends.cudnn.
    fp32_precision`` then ``torch.backends.fp32_precision`` while a level says ``"none"``), or
    on older torch ``torch.backends.cudnn.allow_tf32``. Reading ``allow_tf32`` once a user has
    set the new API raises in recent torch, so the new API is read whenever it exists.
    """
    backends = torch.backends
    conv = getattr(getattr(backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is None:  # torch without the fp32_precision API
        return "tf32" if backends.cudnn.allow_tf32 else "ieee"
    # torch.backends.fp32_precision is set up at run time (unknown to the type stubs)
    top = getattr(backends, "fp32_precision", "none")
    for level in (conv, backends.cudnn.fp32_precision, top):
        if level != "none":
            return "tf32" if level == "tf32" else "ieee"
    return "ieee"


def dot_config(dtype: torch.dtype, device: torch.device) -> tuple[bool, str, bool]:
    """``(DOT_FP32, INPUT_PRECISION, TF32)`` of the GEMMs for a buffer dtype on ``device``.

    float32 uses TF32 tensor cores, with both operands *rounded* (``TF32``), where the fp32
    precision setting allows TF32 for convolutions; ``"ieee"`` means true fp32 products. On
    CPU (the interpreter) float32 is IEEE unless ``EMULATE_TF32_ON_CPU``. The interpreter
    cannot multiply bfloat16 blocks correctly, so there the operands (already rounded to
    bfloat16) are multiplied in float32: the same products.
    """
    if dtype == torch.float32:
        on_gpu = device.type == "cuda" or EMULATE_TF32_ON_CPU
        if on_gpu and conv_fp32_precision() == "tf32":
            return False, "tf32", True
        return False, "ieee", False
    return (INTERPRETED and dtype == torch.bfloat16), "ieee", False


def round_tf32_(t: torch.Tensor) -> torch.Tensor:
    """Host twin of ``round_tf32`` (same bits), in place on a contiguous float32 tensor."""
    bits = t.view(torch.int32)
    rounded = (bits + 0x1000).bitwise_and_(-0x2000)  # -0x2000 == 0xFFFFE000 as int32
    nan = t.isnan()
    bits.copy_(torch.where(nan, bits, rounded))
    return t


def rows_stride(t: torch.Tensor, what: str) -> int:
    """Row stride of a rows operand (channels_last 4-D buffer or contiguous 2-D matrix)."""
    if t.dim() == 4:
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(
                f"dense_ext triton: {what} must be channels_last, got strides {t.stride()}"
            )
        return t.shape[1]
    if t.dim() == 2:
        if not t.is_contiguous():
            raise ValueError(f"dense_ext triton: {what} must be a contiguous [M, C] matrix")
        return t.shape[1]
    raise ValueError(
        f"dense_ext triton: {what} must be [N, C, H, W] or [M, C], got {tuple(t.shape)}"
    )


def vec_align(*values: int) -> int:
    """The largest power of two <= 16 dividing every value: the ``ALIGN`` of ``row_offsets`` and
    ``channels_ok`` for an operand's row stride, first channel and channel count."""
    common = 0
    for v in values:
        common = math.gcd(common, v)
    return 16 if common == 0 else min(16, common & -common)


def weight_layout(w: torch.Tensor) -> tuple[int, int, bool]:
    """``(KS, C_out, as_conv)`` of a kernel's weight operand: 3-D taps ``[KS*KS, C_in, C_out]``
    (``conv_fwd.conv_weight_taps``), or a 1x1 conv weight ``[C_out, C_in, 1, 1]`` as it is,
    which the kernels read in place (``W_AS_CONV``): no transposed copy per step."""
    if w.dim() == 4:
        if w.shape[2:] != (1, 1) or not w.is_contiguous():
            raise ValueError(
                f"a conv weight operand must be a contiguous 1x1 weight, got {tuple(w.shape)}"
            )
        return 1, w.shape[0], True
    taps, _, c_out = w.shape
    return (3 if taps == 9 else 1), c_out, False


def num_rows(t: torch.Tensor) -> int:
    """``M``: the number of pixel rows of a rows operand."""
    return t.shape[0] * t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[0]
