"""Kernel benchmarks: every op of ``bench/bench_<op>.py`` at its suite's sizes, every provider side by side
(providers: docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import calibrl_kernels as ck
from calibrl_kernels import reference

from . import harness
from .harness import Timing

CALIBRL, EAGER, COMPILED, COMPILED_CALIBRL, LIGER = "calibrl", "eager", "compiled", "compiled-calibrl", "liger"
ROOFLINE = "roofline"
LOSS_CONFIG = ck.CalibRLConfig()  # CalibRL defaults: PPO dual clip + leaky-ReLU guide against the expert
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIM_ORDER = "NBDVG"  # the order of sizes in x_name


class Unavailable(Exception):
    """A provider with no counterpart of the op on this device (recorded as skipped, with the reason)."""


@dataclasses.dataclass
class Sweep:
    axis: str  # the swept size (the CSV's x)
    values: Tuple[int, ...]
    fixed: Dict[str, int]
    dtype: str = "float32"
    modes: Tuple[str, ...] = ("forward", "full")
    compiled: bool = True  # whether the compiled provider runs here (torch.compile costs minutes per CPU shape)
    timing: Optional[Timing] = None  # overrides the suite's

    def points(self):
        for value in self.values:
            dims = dict(self.fixed, **{self.axis: value})
            yield {key: dims[key] for key in sorted(dims, key=DIM_ORDER.index)}


@dataclasses.dataclass
class Op:
    """One benchmarked op: its inputs, the same computation per provider, and its roofline."""

    name: str
    build: Callable[[Dict[str, int], torch.dtype, torch.device], Dict[str, torch.Tensor]]
    calibrl: Callable[[Dict[str, torch.Tensor]], torch.Tensor]  # the public op, reduced to a scalar
    eager: Callable[[Dict[str, torch.Tensor]], torch.Tensor]  # plain torch; torch.compile compiles it
    floor: str  # "gemm": work in FLOP over the GEMM rate; "copy": work in bytes over the copy bandwidth
    work: Callable[[Dict[str, int], int, str], float]  # (dims, element size, mode) -> FLOP or bytes
    sweeps: Dict[str, List[Sweep]]  # suite part -> sweeps
    grad_bytes: Callable[[Dict[str, int], int], float] = lambda dims, size: 0.0  # what "full" must return
    eager_bytes: Callable[[Dict[str, int], str], float] = lambda dims, mode: 0.0  # eager's peak, for the guard
    liger: Optional[Callable] = None  # (inputs, device) -> (forward, tensors it differentiates)
    differentiable: bool = True


@dataclasses.dataclass(frozen=True)
class Suite:
    device: str
    parts: Tuple[str, ...]  # keys of Op.sweeps
    timing: Timing
    gemm_size: int  # square GEMM timed for the linear roofline
    copy_bytes: int  # buffer copied for the bandwidth roofline
    impls: Tuple[str, ...] = ()  # calibrl-<impl> providers besides the default
    compiled: bool = True
    threads: Optional[int] = None  # torch intra-op threads (None: every core)
    train: Optional[str] = None  # bench_train configuration run after the kernels


_CPU = Timing(warmup=1, min_rounds=3, max_rounds=15, min_time_s=2.0)
_GPU = Timing(warmup=2, min_rounds=3, max_rounds=3, min_time_s=0.0)
SUITES: Dict[str, Suite] = {
    "tiny": Suite("cpu", ("tiny",), Timing(1, 2, 3, 0.0), 64, 1 << 20, ("torch",), False, 1, "tiny"),
    "cpu": Suite("cpu", ("cpu",), _CPU, 2048, 256 << 20, ("torch",), train="cpu"),
    "cpu-vocab": Suite("cpu", ("cpu-vocab",), Timing(1, 3, 3, 0.0), 2048, 256 << 20),
    "cpu-compile": Suite("cpu", ("cpu-compile",), _CPU, 2048, 256 << 20),
    "gpu-targets": Suite("cuda", ("gpu-targets",), _GPU, 8192, 1 << 30),
    "gpu-sweeps": Suite("cuda", ("gpu-sweeps",), _GPU, 8192, 1 << 30, compiled=False),
    "gpu": Suite("cuda", ("gpu-targets", "gpu-sweeps"), _GPU, 8192, 1 << 30, train="gpu"),
}


@contextlib.contextmanager
def forced_impl(impl: Optional[str]):
    """CALIBRL_IMPL set to ``impl`` (unset for None: the default backend) inside the block."""
    previous = os.environ.pop("CALIBRL_IMPL", None)
    os.environ.update({"CALIBRL_IMPL": impl} if impl is not None else {})
    try:
        yield
    finally:
        os.environ.pop("CALIBRL_IMPL", None)
        os.environ.update({"CALIBRL_IMPL": previous} if previous is not None else {})


def split_tokens(num_tokens: int, max_row: int = 512) -> Tuple[int, int]:
    """N tokens as (B rows, T tokens per row): about 8 rows, T at most ``max_row``."""
    tokens = min(max_row, max(1, num_tokens // 8))
    if num_tokens % tokens or num_tokens // tokens < 2:
        raise ValueError(f"N: expected a multiple of T = {tokens} with at least 2 rows, got {num_tokens}")
    return num_tokens // tokens, tokens


def rl_batch(num_tokens: int, vocab: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """A synthetic RL batch of N tokens in groups of rows whose first row is the expert's."""
    rows, tokens = split_tokens(num_tokens)
    size = next(s for s in (4, 3, 2, 1) if rows % s == 0)
    row = torch.arange(rows, device=device)
    group_ids, is_expert = row // size, row % size == 0  # (B,), (B,)
    lengths = torch.randint(max(1, tokens // 2), tokens + 1, (rows,), device=device)
    mask = (torch.arange(tokens, device=device)[None, :] < lengths[:, None]).float()  # (B, T)
    old_logp = -math.log(vocab) + 0.1 * torch.randn(rows, tokens, device=device)  # (B, T)
    stats = ck.group_advantages(torch.rand(rows, device=device), group_ids, is_expert=is_expert)
    targets = torch.randint(0, vocab, (rows, tokens), device=device)
    expert_logp = ck.expert_baseline(old_logp, mask, group_ids, is_expert)
    fields = dict(old_logp=old_logp, advantages=stats.advantages, mask=mask, passed=stats.passed)
    return dict(fields, targets=targets, is_expert=is_expert, expert_logp=expert_logp)


def rl_loss(loss_fn: Callable, inputs: Dict[str, torch.Tensor], *head, **extra) -> torch.Tensor:
    """``loss_fn(*head, old_logp, advantages, mask, <the batch's RL keywords>, **extra).loss`` (CalibRL defaults)."""
    fields = [inputs[key] for key in ("old_logp", "advantages", "mask")]
    keywords = {key: inputs[key] for key in ("expert_logp", "passed", "is_expert")}
    return loss_fn(*head, *fields, config=LOSS_CONFIG, **keywords, **extra).loss


def eager_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log_softmax + gather + entropy in fp32, as an eager trainer writes it."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def eager_calibrl_loss(logits: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    logp, entropy = eager_logprobs_entropy(logits, inputs["targets"])
    return rl_loss(reference.calibrl_loss, inputs, logp, entropy=entropy)


MATERIALISE_LOGITS = (EAGER, COMPILED, f"{CALIBRL}-torch")  # fp32 (N, V) logits: the memory guard's subjects


def _probe(op: Op, suite: Suite, dtype: torch.dtype, device: torch.device) -> Tuple[Callable, float]:
    """The roofline's machine probe and its work per call (FLOP of a square GEMM, or bytes a copy moves)."""
    if op.floor == "gemm":
        a = torch.randn(suite.gemm_size, suite.gemm_size, device=device).to(dtype)
        out = torch.empty_like(a)
        return (lambda: torch.mm(a, a, out=out)), 2.0 * suite.gemm_size**3
    source, target = torch.ones(suite.copy_bytes // 4, device=device), torch.empty(suite.copy_bytes // 4, device=device)
    return (lambda: target.copy_(source)), 2.0 * suite.copy_bytes


def providers(op: Op, inputs, device: torch.device, impls: Sequence[str] = (), compiled: bool = True):
    """{provider: (forward, tensors its full mode differentiates)}, {provider: backend context},
    {provider left out: why}."""
    grads = [t for t in inputs.values() if t.requires_grad]
    forwards, contexts, skipped = {}, {}, {}
    for impl in (None, *impls):
        name = CALIBRL if impl is None else f"{CALIBRL}-{impl}"
        forwards[name] = (lambda: op.calibrl(inputs), grads)
        contexts[name] = lambda impl=impl: forced_impl(impl)
    forwards[EAGER] = (lambda: op.eager(inputs), grads)
    if compiled:
        eager, ours = torch.compile(op.eager, dynamic=False), torch.compile(op.calibrl, dynamic=False, fullgraph=True)
        forwards.update({COMPILED: (lambda: eager(inputs), grads), COMPILED_CALIBRL: (lambda: ours(inputs), grads)})
    try:
        if op.liger is None:
            raise Unavailable("Liger-Kernel has no counterpart of this op")
        forwards[LIGER] = op.liger(inputs, device)
    except (Unavailable, ImportError) as why:
        skipped[LIGER] = str(why)
    return forwards, contexts, skipped


def run_point(op: Op, sweep: Sweep, dims: Dict[str, int], suite: Suite, device, writer, options) -> None:
    dtype, x = DTYPES[sweep.dtype], dims[sweep.axis]
    name = harness.x_name(sweep.axis, dict({k: v for k, v in dims.items() if k != sweep.axis}, dtype=sweep.dtype))
    print(f"{op.name}  {name}  {sweep.axis}={x}", flush=True)
    torch.manual_seed(0)
    inputs = op.build(dims, dtype, device)
    impls = suite.impls if options.impls is None else options.impls
    compiled = (suite.compiled if options.compiled is None else options.compiled) and sweep.compiled
    forwards, contexts, skipped = providers(op, inputs, device, impls, compiled)
    for provider, why in skipped.items():
        writer.event(kind="skipped", kernel=op.name, provider=provider, x=x, reason=why)
    forwards = {p: f for p, f in forwards.items() if not options.providers or p in options.providers}
    probe, probe_work = _probe(op, suite, dtype, device)
    cap = min((options.mem_cap_gib or math.inf) * 2**30, 0.9 * harness.available_bytes(device))
    for mode in [m for m in sweep.modes if m == "forward" or op.differentiable]:
        calls, guarded = {}, {}
        for provider, (forward, grads) in forwards.items():
            estimate = op.eager_bytes(dims, mode) if provider in MATERIALISE_LOGITS else 0.0
            if estimate > cap:
                why = f"not run: estimated peak {estimate / 2**30:.1f} GiB exceeds the memory cap {cap / 2**30:.1f} GiB"
                guarded[provider] = harness.Outcome("not-run", reason=why)
            elif mode == "full":
                calls[provider] = lambda forward=forward, grads=grads: torch.autograd.grad(forward(), grads)
            else:
                calls[provider] = forward
        outcomes = harness.measure(dict(calls, **{ROOFLINE: probe}), device, sweep.timing or suite.timing, contexts)
        rate = probe_work / harness.percentiles(outcomes.pop(ROOFLINE).seconds)[1]  # FLOP/s or bytes/s, this run's
        floor_ms = op.work(dims, dtype.itemsize, mode) / rate * 1e3
        writer.row(op.name, ROOFLINE, mode, "speed", "ms", name, x, [floor_ms] * 3)
        grad_mib = op.grad_bytes(dims, dtype.itemsize) / harness.MIB
        if mode == "full" and grad_mib:
            writer.row(op.name, ROOFLINE, mode, "memory", "MiB", name, x, [grad_mib] * 3)
        for provider in forwards:
            writer.outcome(op.name, provider, mode, name, x, guarded.get(provider) or outcomes[provider])
    del inputs, forwards, probe
    harness.release(device)


def all_ops() -> Dict[str, Op]:
    names = ("fused_linear_calibrl_loss", "fused_calibrl_loss", "token_logprobs", "group_advantages")
    return {name: importlib.import_module(f".bench_{name}", __package__).OP for name in names}


def run_suite(suite_name: str, ops: Sequence[Op], options: argparse.Namespace) -> Path:
    """Every sweep of ``ops`` in the suite, then its train step, plots and tables; returns the results folder."""
    from . import bench_train, table

    suite = SUITES[suite_name]
    device = harness.resolve_device(options.device or suite.device)
    out = harness.results_folder(options.out, device)
    with harness.intra_op_threads(suite.threads):
        writer = harness.Writer(out, "kernels", device)
        threads = torch.get_num_threads()
        print(f"suite {suite_name} on {writer.device} ({threads} threads), {writer.version}; in {out}", flush=True)
        writer.event(kind="run", suite=suite_name, threads=threads)
        for op in ops:
            for sweep in [sweep for part in suite.parts for sweep in op.sweeps.get(part, ())]:
                for dims in sweep.points():
                    run_point(op, sweep, dims, suite, device, writer, options)
        if suite.train and not options.no_train:
            bench_train.run(suite.train, device, out, timestamp=writer.timestamp)
    table.report(out, plots=not options.no_plot, out=None if options.no_table else out / "tables.md")
    return out


def parser(prog: str, ops: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark calibrl_kernels' ops side by side.")
    p.add_argument("--suite", choices=sorted(SUITES), default="tiny")
    p.add_argument("--ops", nargs="+", choices=ops, default=None, help="only these ops (default: every one)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, auto (default: the suite's)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    p.add_argument("--providers", nargs="+", default=None, help="keep only these (roofline rows are always written)")
    p.add_argument("--impls", nargs="*", choices=("triton", "cpp", "torch"), help="calibrl-<impl> providers")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, help="run the torch.compile providers")
    p.add_argument("--mem-cap-gib", type=float, help="guard's cap (default: 90%% of the free memory)")
    for flag in ("--no-train", "--no-plot", "--no-table"):
        p.add_argument(flag, action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None, only: Optional[str] = None) -> int:
    """``python -m bench`` (every op), or ``python -m bench.bench_<only>`` (one op, no train step)."""
    ops = all_ops()
    prog = "python -m bench" if only is None else f"python -m bench.bench_{only}"
    options = parser(prog, sorted(ops)).parse_args(argv)
    if only:
        options.ops, options.no_train = [only], True
    run_suite(options.suite, [op for name, op in ops.items() if not options.ops or name in options.ops], options)
    return 0
