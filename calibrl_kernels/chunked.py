"""Chunked path of the fused lm_head ops: from hidden states and the lm_head weight, never (N, V) logits.

``linear_token_logprobs`` and ``fused_linear_calibrl_loss`` stream the N = B*T token rows in chunks (the
``KERNELS`` that the ``calibrl::`` operators of ``library`` call on the torch and cpp backends).
For each chunk of n rows:

1. logits chunk Z (n, V) = h (n, D) @ W^T (+ bias), one GEMM into a reused buffer,
2. row math on Z (per row: log-sum-exp, entropy, target log-prob; for the loss also the closed-form
   coefficients a = -dL/dlp, b = -dL/dH of ``reference.coefficients``), then the gradient formed in place:
   dZ = [a (p - onehot(y)) + b p (z - lse + H)] / temperature,
3. dHidden rows = dZ @ W and dWeight += dZ^T @ h (fp32 accumulation), dBias += sum over rows of dZ.

The row math is pluggable (one driver, two implementations): ``TorchRowMath`` here (device-agnostic
torch, a few chunk-sized temporaries) and the C++/OpenMP kernels of ``csrc/`` (``calibrl_kernels.cpu``, one
pass per row, no temporaries). Both fill the same row table (``reference.coefficients.ROW_FIELDS``).

The loss computes its gradients during the forward (the coefficients are known there) and backward
only scales them by the incoming gradient (in fp32, before the one cast of 16-bit gradients).
``linear_token_logprobs`` cannot: its a, b are the incoming gradients of logp and entropy, known only in
backward, and dWeight needs them inside the V x D reduction, so backward recomputes each logits chunk (one
extra GEMM, 8 N D V flops in all instead of 6) rather than keeping (N, V) logits alive between forward and
backward.

Chunk shape: the GEMMs set the speed, so a chunk has at least ``GEMM_KNEE_ROWS`` (512) rows where the
input has them, i.e. ``N // 512`` chunks of 512 to 1023 rows, spread evenly (``rows_per_chunk``). Measured
on the 2-core development host (AMD EPYC, torch 2.13 MKL, 2 threads; square 2048^3 fp32 GEMM 150-190
GFLOP/s, noisy), D 896, V 151936, GFLOP/s of logits / dHidden / dWeight at n chunk rows:

    n    64: 99 / 111 / 200    n  256: 157 / 169 / 211    n 1024: 184 / 201 / 210
    n   128: 117 / 136 / 212   n  512: 179 / 198 / 211    n 2048: 185 / 201 / 202

so the logits and dHidden GEMMs reach their plateau at ~512 rows (69 rows, the old fixed 40 MiB budget at
this vocabulary, ran them at half speed: the whole step went from 1.55x to 1.20x the GEMM floor at N 1024).
Layouts were compared too (W^T copied contiguous for an NN logits GEMM, logits^T = W h^T, dWeight^T
accumulated): none was faster beyond the noise, so the GEMMs read the operands as they are.

Memory: the chunk holds ``rows * V`` logits of the compute dtype (plus, for the torch row math, up to three
temporaries of its size). A byte budget bounds it: ``chunk_bytes=`` (of the lm_head ops and
``LinearCalibRLLoss(chunk_bytes=...)``), else env ``CALIBRL_CHUNK_BYTES`` (a positive whole number of
bytes), else ``default_chunk_bytes()``: 1/16 of the machine's memory (the cgroup limit where one is set),
between 64 MiB and 1 GiB. Where 512 rows do not fit the budget, the rows are as many as it allows. So
with the C++ row math the extra memory of the step is ``rows * V * 4`` bytes (297 MiB at V 151936 and 512
rows; 62 MiB at V 32000) plus a (N, 16) row table, beyond the (N, D) and (V, D) fp32 gradient
accumulators, which are the gradients returned for fp32 inputs. This budget belongs to this chunked path
only, i.e. the cpp and torch backends (CPU tensors by default); the Triton GPU path sizes its own chunks
(``triton._launch.LINEAR_CHUNK_BYTES``) and ignores it. fp32 / fp64 inputs are used in place (the GEMMs read
them directly); bf16 / fp16 inputs are upcast per chunk (rows of hidden) and per vocabulary block (rows of
the weight; the budget is then split in halves between the logits chunk and the weight block), so
statistics and every GEMM accumulate in fp32; dHidden and dWeight are accumulated in fp32 (N, D) and
(V, D) buffers, scaled by the incoming gradient and cast to the inputs' dtypes once, in backward
(``_Gradients.finish``). Threads: the GEMMs (MKL) and the C++ row math (``at::parallel_for``) share
torch's one OpenMP pool, one after the other, so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch

from . import _checks
from .config import CalibRLConfig
from .reference import coefficients as coef
from .reference import compute_dtype, inverse_temperature

ROW = coef.ROW
ENV_CHUNK_BYTES = "CALIBRL_CHUNK_BYTES"
GEMM_KNEE_ROWS = 512  # rows at which the chunk GEMMs reach their plateau rate (module docstring)
_DEFAULT_BUDGET_FRACTION = 16  # the default budget is 1/16 of the machine's memory ...
_DEFAULT_BUDGET_BOUNDS = (64 * 2**20, 2**30)  # ... between 64 MiB and 1 GiB


# --------------------------------------------------------------------------------------------
# Chunk plan and its introspection hook
# --------------------------------------------------------------------------------------------
_scoped_chunk_bytes: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("calibrl_chunk_bytes", default=None)


def _parse_env_chunk_bytes(raw: str) -> int:
    """The value of CALIBRL_CHUNK_BYTES: a positive whole number of bytes ("40000000", "4e7", "4_000_000")."""
    problem = f"{ENV_CHUNK_BYTES}: expected a positive whole number of bytes (e.g. 40000000 or 4e7), got {raw!r}"
    text = raw.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(problem) from None
        if not math.isfinite(number) or not number.is_integer():
            raise ValueError(problem) from None
        value = int(number)
    if value <= 0:
        raise ValueError(problem)
    return value


def _memory_bytes() -> Optional[int]:
    """The memory this process may use: the cgroup v2 / v1 limit where one is set, else physical memory."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):  # not a POSIX system
        pass
    return min(limits) if limits else None


@functools.lru_cache(maxsize=1)
def default_chunk_bytes() -> int:
    """The default budget: 1/16 of the machine's memory, between 64 MiB and 1 GiB (1 GiB on a 24 GiB host).

    Taken once per process from the memory limit (not from the memory free at the call), so the chunk
    plan, hence the order of the dWeight accumulation, does not change from call to call.
    """
    low, high = _DEFAULT_BUDGET_BOUNDS
    memory = _memory_bytes()
    return high if memory is None else int(min(high, max(low, memory // _DEFAULT_BUDGET_FRACTION)))


def chunk_budget(chunk_bytes: Optional[int] = None) -> int:
    """The chunk byte budget of this path: the argument, else the innermost ``chunk_bytes_scope``, else
    env CALIBRL_CHUNK_BYTES, else ``default_chunk_bytes()``. (The Triton GPU path does not read it.)"""
    if chunk_bytes is None:
        chunk_bytes = _scoped_chunk_bytes.get()
    if chunk_bytes is not None:
        return _checks.chunk_bytes_argument(chunk_bytes)
    raw = os.environ.get(ENV_CHUNK_BYTES, "")
    return _parse_env_chunk_bytes(raw) if raw.strip() else default_chunk_bytes()


@contextlib.contextmanager
def chunk_bytes_scope(chunk_bytes: Optional[int]) -> Iterator[None]:
    """Use ``chunk_bytes`` as the budget of the chunked calls made inside the block (None: no change).

    For callers that go through the public ops, which have no chunk_bytes argument (e.g.
    ``LinearCalibRLLoss(chunk_bytes=...)``). A context variable: per thread / asyncio task.
    """
    if chunk_bytes is None:
        yield
        return
    token = _scoped_chunk_bytes.set(_checks.chunk_bytes_argument(chunk_bytes))
    try:
        yield
    finally:
        _scoped_chunk_bytes.reset(token)


def rows_per_chunk(
    num_rows: int, vocab: int, element_bytes: int, buffers: int, budget: int, knee: int = GEMM_KNEE_ROWS
) -> int:
    """Rows of a logits chunk: at least ``knee`` where there are that many rows and the budget allows,
    with ``buffers`` chunk-sized tensors within ``budget`` bytes.

    ``num_rows // knee`` chunks of ``knee`` to ``2 knee - 1`` rows when the budget holds them (fewer,
    larger chunks would not run the GEMMs faster, only take more memory); else the fewest chunks the
    budget allows. Either way the rows are spread evenly over the chunks (no small last chunk), rounded
    up to a multiple of 16 (whole GEMM register tiles) where that stays within the budget. At least one
    row: a single row over the budget still runs.
    """
    most = max(1, budget // max(1, vocab * element_bytes * buffers))
    if num_rows <= min(most, 2 * knee - 1):
        return max(1, num_rows)
    chunks = max(-(-num_rows // most), num_rows // knee)
    rows = -(-num_rows // chunks)
    tiled = -(-rows // 16) * 16
    return int(tiled if tiled <= most else rows)


class ChunkRecord(NamedTuple):
    """One logits chunk buffer the driver allocated (for tests and benchmarks)."""

    rows: int  # rows of the buffer (tokens per chunk)
    vocab: int  # its columns (V)
    bytes: int  # its size
    weight_block_rows: int  # vocabulary rows per upcast weight block (V when the weight is used as is)


_chunk_logs: List[List[ChunkRecord]] = []


@contextlib.contextmanager
def record_chunks() -> Iterator[List[ChunkRecord]]:
    """Collect a ChunkRecord for every chunk buffer allocated inside the block."""
    log: List[ChunkRecord] = []
    _chunk_logs.append(log)
    try:
        yield log
    finally:
        _chunk_logs.remove(log)


def _note_chunk(record: ChunkRecord) -> None:
    for log in _chunk_logs:
        log.append(record)


# --------------------------------------------------------------------------------------------
# Row math (torch implementation; csrc/ provides the same interface in C++)
# --------------------------------------------------------------------------------------------
def _valid_and_safe_targets(targets: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    valid = targets != ignore_index  # (n,)
    return valid, torch.where(valid, targets, torch.zeros_like(targets)).long()


class TorchRowMath:
    """Row statistics, coefficients and gradient of a logits chunk with torch ops (any device).

    Every method gets a chunk ``logits`` (n, V), contiguous, compute dtype, holding raw logits (before
    the temperature). The chunk is scratch: methods may overwrite it, and after ``loss(...,
    form_gradient=True)`` or ``gradient`` it holds dL/dlogits. ``rows`` is the chunk's (n, len(ROW_FIELDS))
    slice of the row table.
    """

    name = "torch"
    buffers_per_chunk = 4  # the chunk plus up to three chunk-sized temporaries

    def _log_probs_(self, logits, inv_temperature, rows):
        """logits -> log p in place; returns p (a temporary); fills rows' lse."""
        if inv_temperature != 1.0:
            logits.mul_(inv_temperature)
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        rows[:, ROW["lse"]] = lse
        log_p = logits.sub_(lse[:, None])
        return log_p, torch.exp(log_p)

    def stats(self, logits, targets, inv_temperature, ignore_index, rows):
        """Fill rows' logp, entropy, lse; return (log p, p) of the chunk (log p is the chunk itself)."""
        valid, safe = _valid_and_safe_targets(targets, ignore_index)
        log_p, p = self._log_probs_(logits, inv_temperature, rows)
        p_log_p = p * log_p
        p_log_p.masked_fill_(p == 0, 0.0)  # 0 * log 0 = 0 (a -inf logit has no entropy share)
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        rows[:, ROW["entropy"]] = torch.where(valid, -p_log_p.sum(-1), zero)
        del p_log_p
        rows[:, ROW["logp"]] = torch.where(valid, log_p.gather(1, safe[:, None]).squeeze(1), zero)
        return log_p, p

    def loss(self, logits, targets, table, rows, config: CalibRLConfig, inv_temperature, ignore_index, form_gradient):
        """stats, then the closed-form coefficients and loss terms, then (optionally) the gradient in place."""
        log_p, p = self.stats(logits, targets, inv_temperature, ignore_index, rows)
        coef.fill_row_terms(rows, table, config)
        if form_gradient:
            self._gradient_from_log_probs_(log_p, p, targets, rows, inv_temperature, ignore_index)

    def gradient(self, logits, targets, rows, inv_temperature, ignore_index):
        """dL/dlogits in place from rows' lse, entropy, coef_a, coef_b."""
        if inv_temperature != 1.0:
            logits.mul_(inv_temperature)
        log_p = logits.sub_(rows[:, ROW["lse"], None])
        self._gradient_from_log_probs_(log_p, torch.exp(log_p), targets, rows, inv_temperature, ignore_index)

    @staticmethod
    def _gradient_from_log_probs_(log_p, p, targets, rows, inv_temperature, ignore_index):
        """log_p (the chunk) := [p (a + b (log p + H)) - a onehot(y)] / T.

        Exactly zero on rows of ignored targets and of tokens with a = b = 0 (masked, or no incoming
        gradient), whatever their logits: a row of all -inf logits (padding) has NaN log p.
        """
        valid, safe = _valid_and_safe_targets(targets, ignore_index)
        zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
        a = torch.where(valid, rows[:, ROW["coef_a"]], zero) * inv_temperature  # (n,)
        b = torch.where(valid, rows[:, ROW["coef_b"]], zero) * inv_temperature  # (n,)
        active = (a != 0) | (b != 0)  # (n,) rows with a gradient
        if bool((b != 0).any()):
            # z - lse + H = log p + H; where p == 0 the product is 0 (guards -inf * 0).
            grad = log_p.add_(rows[:, ROW["entropy"], None]).mul_(b[:, None]).add_(a[:, None]).mul_(p)
            grad.masked_fill_(p == 0, 0.0)
        else:
            grad = log_p.copy_(p).mul_(a[:, None])
        grad.scatter_add_(1, safe[:, None], -a[:, None])
        grad.masked_fill_(~active[:, None], 0.0)


TORCH_ROW_MATH = TorchRowMath()


# --------------------------------------------------------------------------------------------
# The driver: GEMMs around the row math, shared by every row-math implementation
# --------------------------------------------------------------------------------------------
class _Operands:
    """hidden rows (N, D), weight (V, D), bias (V,) and how the GEMMs read them in the compute dtype."""

    def __init__(self, hidden2d, weight, bias, budget: int):
        self.hidden, self.weight, self.bias = hidden2d, weight, bias
        self.dtype = compute_dtype(hidden2d)
        self.num_rows, self.dim = hidden2d.shape
        self.vocab = weight.shape[0]
        element = torch.finfo(self.dtype).bits // 8
        # A 16-bit weight is upcast one vocabulary block at a time: half the budget for the block, half
        # for the logits chunk.
        if weight.dtype == self.dtype:
            self.block_rows = self.vocab
            self.chunk_budget = budget
        else:
            self.block_rows = max(1, min(self.vocab, budget // 2 // max(1, self.dim * element)))
            self.chunk_budget = max(1, budget // 2)
        self.bias_c = None if bias is None else bias.to(self.dtype)

    def hidden_rows(self, start: int, end: int) -> torch.Tensor:
        return self.hidden[start:end].to(self.dtype)

    def weight_blocks(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(v0, v1, weight[v0:v1] in the compute dtype) covering the vocabulary."""
        for v0 in range(0, self.vocab, self.block_rows):
            v1 = min(self.vocab, v0 + self.block_rows)
            yield v0, v1, self.weight[v0:v1].to(self.dtype)

    def logits_into(self, out: torch.Tensor, h: torch.Tensor) -> None:
        """out (n, V) = h (n, D) @ W^T (+ bias), block by block into column slices of out."""
        for v0, v1, w in self.weight_blocks():
            if self.bias_c is None:
                torch.mm(h, w.t(), out=out[:, v0:v1])
            else:
                torch.addmm(self.bias_c[v0:v1], h, w.t(), out=out[:, v0:v1])


class _Gradients:
    """Gradient accumulators of hidden (N, D), weight (V, D) and bias (V,), in the compute dtype.

    All three stay in fp32 (fp64 for fp64 inputs) until ``finish``, which applies the upstream
    gradient's scale and then casts to the inputs' dtypes: a 16-bit gradient is rounded once. (The
    fused loss finishes in its backward: for a 16-bit weight the fp32 (V, D) accumulator, which the
    forward needs anyway, lives until then instead of a 16-bit copy; the peak, accumulator plus cast,
    is the same as casting in the forward.) fp32 / fp64 accumulators are handed over as they are.
    """

    def __init__(self, ops: _Operands, need_hidden: bool, need_weight: bool, need_bias: bool):
        acc = ops.dtype  # fp32 (fp64 for fp64 inputs)
        self.ops = ops
        self.dtypes = (ops.hidden.dtype, ops.weight.dtype, None if ops.bias is None else ops.bias.dtype)
        self.hidden = torch.empty(ops.num_rows, ops.dim, dtype=acc, device=ops.hidden.device) if need_hidden else None
        self.weight = torch.zeros(ops.vocab, ops.dim, dtype=acc, device=ops.weight.device) if need_weight else None
        self.bias = torch.zeros(ops.vocab, dtype=acc, device=ops.weight.device) if need_bias else None
        # Several weight blocks: accumulate a chunk's dHidden in a temporary, then copy it once.
        self._direct_hidden = ops.block_rows == ops.vocab

    def add_chunk(self, grad_logits: torch.Tensor, h: torch.Tensor, start: int, end: int) -> None:
        """dHidden[start:end] = dZ @ W; dWeight += dZ^T @ h; dBias += sum_rows dZ."""
        ops = self.ops
        if self.hidden is not None or self.weight is not None:
            if self.hidden is not None:
                target = self.hidden[start:end] if self._direct_hidden else h.new_empty(end - start, ops.dim)
            for v0, v1, w in ops.weight_blocks():
                block = grad_logits[:, v0:v1]
                if self.hidden is not None:
                    if v0 == 0:
                        torch.mm(block, w, out=target)
                    else:
                        target.addmm_(block, w)
                if self.weight is not None:
                    self.weight[v0:v1].addmm_(block.t(), h)
            if self.hidden is not None and not self._direct_hidden:
                self.hidden[start:end].copy_(target)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0))

    def finish(self, scale: Optional[torch.Tensor] = None):
        """(dHidden (N, D), dWeight, dBias) times ``scale`` (a 0-d upstream gradient), in the dtypes of
        their inputs (None where not needed); the accumulators are consumed (scaled in place)."""
        results = []
        rescale = scale is not None and bool(scale != 1)
        for accumulator, dtype in zip((self.hidden, self.weight, self.bias), self.dtypes):
            if accumulator is None:
                results.append(None)
                continue
            if rescale:
                accumulator.mul_(scale.to(accumulator.dtype))
            results.append(accumulator.to(dtype))  # no copy when the dtypes agree
        self.ops = self.hidden = self.weight = self.bias = None
        return tuple(results)


def _stream(ops: _Operands, row_math, grads: Optional[_Gradients], process) -> None:
    """Run ``process(chunk_logits, start, end)`` on every row chunk, then backpropagate it into grads."""
    element = torch.finfo(ops.dtype).bits // 8
    n_rows = rows_per_chunk(ops.num_rows, ops.vocab, element, row_math.buffers_per_chunk, ops.chunk_budget)
    buffer = torch.empty(n_rows, ops.vocab, dtype=ops.dtype, device=ops.hidden.device)
    _note_chunk(ChunkRecord(n_rows, ops.vocab, buffer.numel() * element, ops.block_rows))
    for start in range(0, ops.num_rows, n_rows):
        end = min(ops.num_rows, start + n_rows)
        chunk = buffer[: end - start]
        h = ops.hidden_rows(start, end)
        ops.logits_into(chunk, h)
        process(chunk, start, end)
        if grads is not None:
            grads.add_chunk(chunk, h, start, end)


def _flatten(hidden: torch.Tensor, targets: torch.Tensor):
    """(B, T, D) / (N, D) -> (N, D) with unit last stride; targets -> (N,)."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if hidden2d.stride(-1) != 1:
        hidden2d = hidden2d.contiguous()
    return hidden2d, targets.reshape(-1)


# --------------------------------------------------------------------------------------------
# Kernels of the calibrl:: lm_head operators (calibrl_kernels.library), on a row math
# --------------------------------------------------------------------------------------------
# Row-table columns of the forward that a gradient pass reads (TorchRowMath: lse, entropy; C++: the others).
_GRADIENT_STATISTICS = ("lse", "row_max", "log_sum", "entropy")


def _row_table(ops: _Operands) -> torch.Tensor:
    return torch.zeros(ops.num_rows, len(coef.ROW_FIELDS), dtype=ops.dtype, device=ops.hidden.device)


def fused_linear_loss_kernel(
    hidden, weight, bias, targets, table, config: CalibRLConfig, ignore_index, needs, chunk_bytes, *, row_math
):
    """(row table (N, ROW_FIELDS), dHidden (N, D), dWeight (V, D), dBias (V,)) in the compute dtype: the loss
    with its gradients formed on the way (None where ``needs`` says no); backward only scales them."""
    hidden2d, flat_targets = _flatten(hidden, targets)
    ops = _Operands(hidden2d, weight, bias, chunk_budget(chunk_bytes))
    grads = _Gradients(ops, *needs) if any(needs) else None
    rows = _row_table(ops)
    inv_temperature = inverse_temperature(config.temperature, ops.dtype)

    def process(chunk, start, end):
        row_math.loss(
            chunk,
            flat_targets[start:end],
            table[start:end],
            rows[start:end],
            config,
            inv_temperature,
            ignore_index,
            grads is not None,
        )

    _stream(ops, row_math, grads, process)
    if grads is None:
        return rows, None, None, None
    return rows, grads.hidden, grads.weight, grads.bias


def linear_logprobs_kernel(hidden, weight, bias, targets, temperature, ignore_index, chunk_bytes, *, row_math):
    """The (N, ROW_FIELDS) row table (logp, entropy and the statistics the gradient pass reads)."""
    hidden2d, flat_targets = _flatten(hidden, targets)
    ops = _Operands(hidden2d, weight, bias, chunk_budget(chunk_bytes))
    rows = _row_table(ops)
    inv_temperature = inverse_temperature(temperature, ops.dtype)

    def process(chunk, start, end):
        row_math.stats(chunk, flat_targets[start:end], inv_temperature, ignore_index, rows[start:end])

    _stream(ops, row_math, None, process)
    return rows


def linear_logprobs_backward_kernel(
    hidden,
    weight,
    bias,
    targets,
    rows,
    grad_logp,
    grad_entropy,
    temperature,
    ignore_index,
    needs,
    chunk_bytes,
    *,
    row_math,
):
    """(dHidden (N, D), dWeight, dBias) in the inputs' dtypes (None where not needed): each logits chunk is
    recomputed (see the module docstring) and its gradient formed with a = -dL/dlogp, b = -dL/dH."""
    hidden2d, flat_targets = _flatten(hidden, targets)
    ops = _Operands(hidden2d, weight, bias, chunk_budget(chunk_bytes))
    table = _row_table(ops)
    columns = [ROW[name] for name in _GRADIENT_STATISTICS]
    table[:, columns] = rows[:, columns].to(ops.dtype)
    table[:, ROW["coef_a"]] = -grad_logp.reshape(-1).to(ops.dtype)
    table[:, ROW["coef_b"]] = -grad_entropy.reshape(-1).to(ops.dtype)
    grads = _Gradients(ops, *needs)
    inv_temperature = inverse_temperature(temperature, ops.dtype)

    def process(chunk, start, end):
        row_math.gradient(chunk, flat_targets[start:end], table[start:end], inv_temperature, ignore_index)

    _stream(ops, row_math, grads, process)
    return grads.finish()


def kernels(get_row_math) -> dict:
    """The lm_head kernels of the calibrl:: operators on the row math ``get_row_math()`` returns (called
    per use, so that a backend is built only when its kernels run)."""

    def bind(kernel):
        return lambda *args: kernel(*args, row_math=get_row_math())

    return {
        "linear_token_logprobs": bind(linear_logprobs_kernel),
        "linear_token_logprobs_backward": bind(linear_logprobs_backward_kernel),
        "fused_linear_calibrl_loss": bind(fused_linear_loss_kernel),
    }


KERNELS = kernels(lambda: TORCH_ROW_MATH)  # the torch backend's (library.KERNEL_MODULES)
