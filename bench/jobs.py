"""What a benchmark run measures: its settings and the plan, a list of typed ``Job`` records.

``plan(settings, backends, device, suites)`` turns the settings into jobs; it runs nothing and
imports no model code, so a plan can be printed and tested without measuring anything
(``python -m bench.run --dry-run``). ``bench/run.py`` runs each job in a fresh worker process
(``bench/worker.py``), passing it as JSON (``Job.to_json`` / ``Job.from_json``).

Suites:

* ``main``: DenseNet-BC-100 (k=12, 32x32): every variant, memory, time and max batch;
* ``imagenet``: DenseNet-121 at 224x224: every variant, memory and time;
* ``depth``: DenseNet-BC memory against depth (naive, checkpointing, the best backend's two
  memory modes), plus deeper optional points measured only when they are predicted to fit;
* ``scale`` (not in the default run: ``make bench-scale``): DenseNet-BC with 1000 layers at
  batch 64 with the best backend's ``min`` mode, measured, beside naive estimated, and the
  measured points from which the deepest DenseNet-BC fitting ``scale_budget_gib`` is derived
  (``bench/scale.py``);
* ``deluge``: DelugeNet-146 (CIFAR, 32x32): naive (a list of slots, one ``F.batch_norm`` per
  CLDC input) and its channels_last peer against every stage backend in both memory modes:
  memory, time and max batch;
* ``deluge-depth``: DelugeNet memory against depth (``delugenet_cifar_<n>``, depth 18n+2),
  naive and the best backend's two memory modes; the floor is every stage's slots.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import KW_ONLY, dataclass, field

from bench.variants import MEMORY_MODES, variant_names

GIB = 1 << 30
SUITES = ("main", "imagenet", "depth", "scale", "deluge", "deluge-depth")
DEFAULT_SUITES = ("main", "imagenet", "depth", "deluge", "deluge-depth")


@dataclass(frozen=True)
class Settings:
    """Batches, repetitions, budgets and limits of one run (stored in the result JSON).

    CPU values keep ``make bench`` near 15 minutes on a 2-core machine; GPU values are
    sized for one H100-class card.
    """

    device: str
    main_model: str = "densenet_bc_100"
    main_batch: int = 16
    main_warmup: int = 2
    main_steps: int = 5
    budget_gib: float = 1.0  # max-batch budget
    imagenet_model: str = "densenet121"
    imagenet_batch: int = 4
    imagenet_warmup: int = 1
    imagenet_steps: int = 3
    sweep_depths: list[int] = field(default_factory=lambda: [40, 64, 100, 136, 172, 208, 250])
    sweep_batch: int = 8
    sweep_extra_depths: list[int] = field(default_factory=lambda: [400])
    # Deeper sweep points predicted above this are estimated instead of measured (None: never).
    measure_limit_gib: float | None = 2.0
    # Optional jobs (extra depths, estimator check) are skipped once 85 % of this has gone.
    time_budget_s: float | None = 900.0
    dtypes: list[str] = field(default_factory=lambda: ["fp32"])
    max_batch: bool = True
    max_batch_dtypes: list[str] = field(default_factory=lambda: ["fp32"])  # searched dtypes
    compile: bool = True  # the torch.compile peers (naive and the best backend)
    graphs: bool = False  # CUDA: the CUDA-graph rows (naive peers and every backend)
    scale_depth: int = 1000
    scale_batch: int = 64
    scale_fit_depths: list[int] = field(default_factory=lambda: [100, 250, 400])
    scale_budget_gib: float = 4.0
    # The scale suite's warm-up batch: it only has to create the optimizer state, which does
    # not depend on the batch, and a batch-64 step of a 1000-layer network takes minutes on a
    # CPU. None: warm up at the measured batch (GPU).
    scale_warmup_batch: int | None = 2
    deluge_model: str = "delugenet146"
    deluge_batch: int = 16
    deluge_warmup: int = 1
    deluge_steps: int = 3
    deluge_sweep_ns: list[int] = field(default_factory=lambda: [2, 4, 8, 12, 16])
    deluge_sweep_batch: int = 8

    @classmethod
    def for_device(cls, device: str, **overrides) -> Settings:
        """Defaults for ``device`` ("cpu" or "cuda"), with ``overrides`` (None values ignored)."""
        base: dict = {}
        if device == "cuda":
            base = dict(
                main_batch=64,
                main_warmup=3,
                main_steps=20,
                budget_gib=8.0,
                imagenet_batch=32,
                imagenet_warmup=3,
                imagenet_steps=10,
                sweep_batch=64,
                sweep_extra_depths=[1000],
                measure_limit_gib=None,
                time_budget_s=None,
                scale_warmup_batch=None,
                deluge_batch=64,
                deluge_warmup=3,
                deluge_steps=20,
                deluge_sweep_batch=64,
                dtypes=["fp32", "bf16"],
                graphs=True,
            )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(device=device, **base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One measurement: a model run as one variant at one batch and dtype, in its own process.

    Attributes:
        suite, model, variant, batch, dtype, device: what runs (``bench/variants.py``).
        warmup: untimed steps before measuring (the first creates the optimizer state).
        warmup_batch: the batch of those steps (None: ``batch``).
        steps: timed steps (0: memory only).
        memory: measure activation memory with the probe (``bench/memory.py``).
        max_batch_bytes: also search the largest batch fitting this many bytes (None: no).
        optional: dropped, with a note, once the run's time budget is used up.
        extrapolate: a deeper sweep point: measured only if the fit of the measured points
            predicts it under the measuring limit, else estimated.
        estimate_only: never run the model; estimate its memory (``bench/estimate.py``).
        reason: why the job is estimated (goes into the row).
        seed: the model's and the batch's seed.
        git_commit: the commit measured (set by the runner).
    """

    suite: str
    model: str
    variant: str
    batch: int
    dtype: str
    device: str
    _: KW_ONLY
    warmup: int = 2
    warmup_batch: int | None = None
    steps: int = 0
    memory: bool = True
    max_batch_bytes: int | None = None
    optional: bool = False
    extrapolate: bool = False
    estimate_only: bool = False
    reason: str = ""
    seed: int = 0
    git_commit: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))

    def replace(self, **changes) -> Job:
        return dataclasses.replace(self, **changes)

    def ident(self) -> dict:
        """The keys that name a row: suite, model, variant, batch, dtype, device."""
        return {
            "suite": self.suite,
            "model": self.model,
            "variant": self.variant,
            "batch": self.batch,
            "dtype": self.dtype,
            "device": self.device,
        }

    def label(self) -> str:
        return f"{self.model} {self.variant} b{self.batch} {self.dtype}"


def best_backend(backends: list[str], device: str) -> str:
    """The backend the depth, scale and compiled rows use: the fastest available."""
    for name in ("triton", "cpp", "reference") if device == "cuda" else ("cpp", "reference"):
        if name in backends:
            return name
    return backends[0]


def plan(settings: Settings, backends: list[str], suites: list[str]) -> list[Job]:
    """The jobs of ``suites``, in the order they run (and appear in the table)."""
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    best = best_backend(backends, settings.device)
    jobs: list[Job] = []
    if "main" in suites:
        jobs += _comparison_jobs(settings, backends, best, "main")
    if "imagenet" in suites:
        jobs += _comparison_jobs(settings, backends, best, "imagenet")
    if "depth" in suites:
        jobs += _depth_jobs(settings, best)
    if "scale" in suites:
        jobs += _scale_jobs(settings, best)
    if "deluge" in suites:
        jobs += _deluge_jobs(settings, backends)
    if "deluge-depth" in suites:
        jobs += _deluge_depth_jobs(settings, best)
    return jobs


def _comparison_jobs(s: Settings, backends: list[str], best: str, suite: str) -> list[Job]:
    main = suite == "main"
    model, batch = (s.main_model, s.main_batch) if main else (s.imagenet_model, s.imagenet_batch)
    warmup, steps = (s.main_warmup, s.main_steps) if main else (s.imagenet_warmup, s.imagenet_steps)
    jobs = []
    for dtype in s.dtypes:
        # Compiled rows in fp32 only: compiling costs minutes per row (GPU: bf16 eager only).
        compiled = s.compile and dtype == "fp32"
        for v in variant_names(backends, compiled, best, s.graphs):
            # The search resizes the batch, which would recompile a compiled model; a CUDA
            # graph's replay allocates nothing (its memory is the eager row's).
            graph = v.endswith("-graph")
            search = main and s.max_batch and dtype in s.max_batch_dtypes
            search = search and not graph and not v.endswith("-compile")
            jobs.append(
                Job(
                    suite=suite,
                    model=model,
                    variant=v,
                    batch=batch,
                    dtype=dtype,
                    device=s.device,
                    warmup=warmup,
                    steps=steps,
                    memory=not graph,
                    max_batch_bytes=int(s.budget_gib * GIB) if search else None,
                )
            )
    return jobs


def _depth_jobs(s: Settings, best: str) -> list[Job]:
    sweep = ["naive", "naive-checkpoint", *(f"efficient-{best}-{m}" for m in MEMORY_MODES)]
    common = dict(suite="depth", batch=s.sweep_batch, dtype="fp32", device=s.device, warmup=1)
    jobs = [
        Job(model=f"densenet_bc_{d}", variant=v, **common) for d in s.sweep_depths for v in sweep
    ]
    for d in s.sweep_extra_depths:
        for v in ("naive", f"efficient-{best}-min"):
            jobs.append(
                Job(model=f"densenet_bc_{d}", variant=v, optional=True, extrapolate=True, **common)
            )
    return jobs


def _scale_jobs(s: Settings, best: str) -> list[Job]:
    common = dict(
        suite="scale",
        batch=s.scale_batch,
        dtype="fp32",
        device=s.device,
        warmup_batch=s.scale_warmup_batch,
    )
    efficient = f"efficient-{best}-min"
    jobs = [
        Job(model=f"densenet_bc_{d}", variant=efficient, warmup=1, **common)
        for d in s.scale_fit_depths
        if d < s.scale_depth
    ]
    jobs.append(
        Job(model=f"densenet_bc_{s.scale_depth}", variant=efficient, warmup=1, steps=1, **common)
    )
    jobs.append(
        Job(
            model=f"densenet_bc_{s.scale_depth}",
            variant="naive",
            estimate_only=True,
            reason="the naive model's activations would not fit this machine",
            **common,
        )
    )
    return jobs


def _deluge_jobs(s: Settings, backends: list[str]) -> list[Job]:
    """DelugeNet-146: the naive peers (no checkpointing or torch.compile variant: neither is a
    DelugeNet option users have) and every backend in both memory modes."""
    names = ["naive", "naive-channels_last"]
    names += [f"efficient-{b}-{m}" for b in backends for m in MEMORY_MODES]
    jobs = []
    for dtype in s.dtypes:
        for v in names:
            search = s.max_batch and dtype in s.max_batch_dtypes
            jobs.append(
                Job(
                    suite="deluge",
                    model=s.deluge_model,
                    variant=v,
                    batch=s.deluge_batch,
                    dtype=dtype,
                    device=s.device,
                    warmup=s.deluge_warmup,
                    steps=s.deluge_steps,
                    max_batch_bytes=int(s.budget_gib * GIB) if search else None,
                )
            )
    return jobs


def _deluge_depth_jobs(s: Settings, best: str) -> list[Job]:
    sweep = ["naive", *(f"efficient-{best}-{m}" for m in MEMORY_MODES)]
    common = dict(
        suite="deluge-depth", batch=s.deluge_sweep_batch, dtype="fp32", device=s.device, warmup=1
    )
    return [
        Job(model=f"delugenet_cifar_{n}", variant=v, **common)
        for n in s.deluge_sweep_ns
        for v in sweep
    ]
