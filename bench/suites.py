"""Named benchmark configurations: which kernels, which sizes, which providers, how long to time.

- ``tiny``: seconds on a CPU; what the test suite and ``gpu_check.sh --dry-run`` run.
- ``cpu``: a developer's sweep over N, V and D on a CPU (minutes).
- ``readme-cpu``: the README's CPU table: the targets' shapes (N 2048, D 512, V 32000 fp32 and the
  Qwen-size head D 896, V 151936 at N 1024 and 8192) plus short N sweeps, the train step, plots and the table.
- ``cpu-vocab``: the fused lm_head loss over the vocabulary (V 8k to 256k at N 1024, D 896, fp32,
  forward+backward), every provider, for the README's sweep plot (about 10 minutes on 2 cores).
- ``gpu``: Qwen-scale shapes in bf16 (N up to 16384, D 4096, V 151936), target points first so that
  a time limit cuts only the sweeps. ``gpu_check.sh`` runs it in two parts, in separate steps:
  ``gpu-targets`` (the README targets' points, first) and ``gpu-sweeps`` (the rest, last, if time is left).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .harness import TimingConfig
from .workloads import Point


@dataclass(frozen=True)
class Sweep:
    kernel: str
    axis: str  # the swept dimension
    values: Tuple[int, ...]
    fixed: Tuple[Tuple[str, int], ...]  # the other dimensions
    dtype: str = "float32"
    modes: Tuple[str, ...] = ("forward", "full")
    compiled_at: Optional[Tuple[int, ...]] = None  # x values where `compiled` runs (None: every value)
    isolate: bool = False  # each provider in a child process under the memory cap (huge shapes)
    timing: Optional[TimingConfig] = None  # overrides the suite's timing

    def points(self):
        """One Point per swept value, dimensions in a fixed order (N/B, D, V, G) so x_name is stable."""
        order = ("N", "B", "D", "V", "G")
        for value in self.values:
            dims = dict(self.fixed, **{self.axis: value})
            unknown = set(dims) - set(order)
            if unknown:
                raise ValueError(f"Sweep {self.kernel}: expected dimensions among {order}, got {sorted(unknown)}")
            yield Point(self.kernel, self.axis, tuple((key, dims[key]) for key in order if key in dims), self.dtype)

    def compiled_enabled(self, x: int) -> bool:
        return self.compiled_at is None or x in self.compiled_at


@dataclass(frozen=True)
class Suite:
    name: str
    device: str  # "cpu", "cuda" or "auto"
    sweeps: Tuple[Sweep, ...]
    timing: TimingConfig
    gemm_size: int  # square GEMM measured for the linear roofline
    copy_bytes: int  # buffer copied for the bandwidth roofline
    compiled_default: bool = True  # whether `compiled` runs unless --compiled/--no-compiled says otherwise
    train: Optional[str] = None  # bench_train configuration run by this suite (None: none)
    targets: Optional[str] = None  # the README target set evaluated at the end ("cpu" / "gpu")
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, every core)
    impls_excluded: Tuple[str, ...] = ()  # calibrl backends not measured as calibrl-<impl> (--all-impls adds them)


_LINEAR = "fused_linear_calibrl_loss"
_LOGITS = "fused_calibrl_loss"
_TOKENS = "token_logprobs"
_GROUPS = "group_advantages"

TINY = Suite(
    name="tiny",
    device="cpu",
    sweeps=(
        Sweep(_TOKENS, "N", (8, 16), (("V", 96),)),
        Sweep(_LOGITS, "N", (8, 16), (("V", 96),)),
        Sweep(_LINEAR, "N", (8, 16), (("D", 16), ("V", 96))),
        Sweep(_GROUPS, "B", (8, 64), (("G", 4),), modes=("forward",)),
    ),
    timing=TimingConfig(warmup=1, min_reps=2, max_reps=3, min_time_s=0.0),
    gemm_size=64,
    copy_bytes=1 << 20,
    compiled_default=False,  # torch.compile costs tens of seconds per shape on a CPU
    train="tiny",
    threads=1,  # toy sizes: one thread avoids barrier stalls on a loaded machine
    targets="cpu",
)

_CPU_TIMING = TimingConfig(warmup=1, min_reps=3, max_reps=15, min_time_s=2.0)
_CPU_TARGET_TIMING = TimingConfig(warmup=1, min_reps=5, max_reps=15, min_time_s=2.0)  # the README targets' shapes
_QWEN_HEAD_TIMING = TimingConfig(warmup=1, min_reps=2, max_reps=2, min_time_s=0.0)

README_CPU = Suite(
    name="readme-cpu",
    device="cpu",
    sweeps=(
        Sweep(_LINEAR, "N", (2048,), (("D", 512), ("V", 32000)), timing=_CPU_TARGET_TIMING),
        Sweep(_LINEAR, "N", (1024, 8192), (("D", 896), ("V", 151936)), modes=("full",), compiled_at=(1024,),
              isolate=True, timing=_QWEN_HEAD_TIMING),
        Sweep(_LINEAR, "N", (1024, 512), (("D", 512), ("V", 32000)), compiled_at=()),
        Sweep(_LOGITS, "N", (2048,), (("V", 32000),), timing=_CPU_TARGET_TIMING),
        Sweep(_LOGITS, "N", (1024, 512), (("V", 32000),), compiled_at=()),
        Sweep(_TOKENS, "N", (2048,), (("V", 32000),), timing=_CPU_TARGET_TIMING),
        Sweep(_TOKENS, "N", (1024, 512), (("V", 32000),), compiled_at=()),
        Sweep(_GROUPS, "B", (1024, 16384, 262144), (("G", 8),), modes=("forward",), compiled_at=(16384,)),
    ),
    timing=_CPU_TIMING,
    gemm_size=2048,
    copy_bytes=256 << 20,
    train="cpu",
    targets="cpu",
)

CPU = Suite(
    name="cpu",
    device="cpu",
    sweeps=(
        Sweep(_LINEAR, "N", (256, 512, 1024, 2048, 4096), (("D", 512), ("V", 32000)), compiled_at=(2048,)),
        Sweep(_LINEAR, "D", (256, 1024), (("N", 2048), ("V", 32000)), compiled_at=()),
        Sweep(_LINEAR, "V", (8000, 64000), (("N", 2048), ("D", 512)), compiled_at=()),
        Sweep(_LOGITS, "N", (256, 512, 1024, 2048, 4096), (("V", 32000),), compiled_at=(2048,)),
        Sweep(_LOGITS, "V", (8000, 64000), (("N", 2048),), compiled_at=()),
        Sweep(_TOKENS, "N", (256, 512, 1024, 2048, 4096), (("V", 32000),), compiled_at=(2048,)),
        Sweep(_TOKENS, "V", (8000, 64000), (("N", 2048),), compiled_at=()),
        Sweep(_GROUPS, "B", (1024, 16384, 262144), (("G", 8),), modes=("forward",), compiled_at=()),
    ),
    timing=_CPU_TIMING,
    gemm_size=2048,
    copy_bytes=256 << 20,
    train="cpu",
    targets="cpu",
)

CPU_VOCAB = Suite(
    name="cpu-vocab",
    device="cpu",
    sweeps=(  # small vocabularies get more timed rounds (sub-second steps are the noisiest)
        # in one process, providers interleaved round by round (eager peaks at ~4 GiB at V 256000)
        Sweep(_LINEAR, "V", (8000, 32000, 64000), (("N", 1024), ("D", 896)), modes=("full",),
              timing=_CPU_TARGET_TIMING),
        Sweep(_LINEAR, "V", (151936, 256000), (("N", 1024), ("D", 896)), modes=("full",),
              timing=TimingConfig(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0)),
    ),
    timing=_QWEN_HEAD_TIMING,
    gemm_size=2048,
    copy_bytes=256 << 20,
    impls_excluded=("torch",),  # calibrl-torch is in the readme-cpu table; --all-impls adds it
)

_GPU_TIMING = TimingConfig(warmup=2, min_reps=5, max_reps=50, min_time_s=0.3)

# the targets' shapes (readme_table's gpu targets)
_GPU_TARGET_SWEEPS = (
    Sweep(_LINEAR, "N", (16384,), (("D", 4096), ("V", 151936)), dtype="bfloat16"),
    Sweep(_LOGITS, "N", (16384,), (("V", 151936),), dtype="bfloat16"),
    Sweep(_TOKENS, "N", (16384,), (("V", 151936),), dtype="bfloat16", compiled_at=()),
)

GPU = Suite(
    name="gpu",
    device="cuda",
    sweeps=_GPU_TARGET_SWEEPS + (  # the targets' shapes first: a time limit then cuts only the sweeps
        Sweep(_LINEAR, "N", (2048, 4096, 8192), (("D", 4096), ("V", 151936)), dtype="bfloat16", compiled_at=()),
        Sweep(_LOGITS, "N", (2048, 4096, 8192), (("V", 151936),), dtype="bfloat16", compiled_at=()),
        Sweep(_TOKENS, "N", (2048, 4096, 8192), (("V", 151936),), dtype="bfloat16", compiled_at=()),
        Sweep(_LINEAR, "D", (1024, 2048), (("N", 16384), ("V", 151936)), dtype="bfloat16", compiled_at=()),
        Sweep(_LINEAR, "V", (32000, 65536), (("N", 16384), ("D", 4096)), dtype="bfloat16", compiled_at=()),
        Sweep(_GROUPS, "B", (4096, 65536, 1048576), (("G", 8),), dtype="float32", modes=("forward",), compiled_at=()),
    ),
    timing=_GPU_TIMING,
    gemm_size=8192,
    copy_bytes=1 << 30,
    train="gpu",
    targets="gpu",
    impls_excluded=("torch",),  # the torch backend is the reference (eager covers it): seconds of device time saved
)

# gpu_check.sh's two kernel steps: the targets' points (with the README table), then the sweeps.
GPU_TARGETS = dataclasses.replace(GPU, name="gpu-targets", sweeps=_GPU_TARGET_SWEEPS, train=None)
GPU_SWEEPS = dataclasses.replace(GPU, name="gpu-sweeps", sweeps=GPU.sweeps[len(_GPU_TARGET_SWEEPS):], train=None,
                                 targets=None)

SUITES: Dict[str, Suite] = {suite.name: suite for suite in (TINY, CPU, README_CPU, CPU_VOCAB, GPU, GPU_TARGETS, GPU_SWEEPS)}
