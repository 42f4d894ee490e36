"""Launch heuristics of every Triton kernel (block sizes, warps, stages), in one place.

Three regimes:
- interpreting (``TRITON_INTERPRET=1``, CPU tests): one fixed, small configuration; the interpreter runs
  programs one after the other with numpy, so block size only trades loop trips against numpy overhead,
  and it must be small enough that test shapes still take several vocabulary blocks.
- GPU, default: a fixed configuration reasoned from the kernels' byte/FLOP budgets (comments below).
- GPU with ``CALIBRL_AUTOTUNE=1``: ``triton.autotune`` over a small grid around the default, keyed on
  the problem sizes. Launches that write into one of their own inputs (the in-place logits gradient)
  are never autotuned, since the tuner would run them several times over their own output.

Also the one answer to "were this process's kernels built for the interpreter" (``BUILT_FOR_INTERPRETER``)
and ``launch``, which every launcher calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import List, Optional

import torch
import triton

from .._checks import env_flag
from . import _interpreter_compat


@triton.jit
def _probe():
    """An empty kernel whose type tells how triton built this module's kernels."""
    pass


# Whether the kernels of this process were built for the interpreter. Triton decides when a function is
# decorated (at import of the kernel modules), from TRITON_INTERPRET at that moment: ask triton what it
# built rather than reading the variable again, which may have changed since. Every other module (the
# launch heuristics included: ``interpreting`` below) uses this value.
BUILT_FOR_INTERPRETER = not isinstance(_probe, triton.runtime.JITFunction)
# Triton 3.6's interpreter cannot take a scalar loop bound under NumPy >= 2.4; fixed here when (and only
# when) the running triton has that defect (``_interpreter_compat``).
INTERPRETER_INDEX_FIXED = BUILT_FOR_INTERPRETER and _interpreter_compat.install()


def interpreting() -> bool:
    """Whether this process's Triton kernels run under the interpreter.

    The one source of truth is ``BUILT_FOR_INTERPRETER``: triton reads TRITON_INTERPRET when
    a kernel is defined (at import of the kernel modules), so the variable's current value may no longer
    describe the kernels that will run. Only launchers call this, i.e. after the kernels were imported.
    """
    return BUILT_FOR_INTERPRETER


def autotune_enabled() -> bool:
    """CALIBRL_AUTOTUNE=1 (or true/yes/on) turns on triton.autotune for the kernels that allow it (never
    when interpreting); an unknown word raises ValueError."""
    return env_flag("CALIBRL_AUTOTUNE", False) and not interpreting()


def tf32_matmuls_allowed() -> bool:
    """Whether torch lets fp32 matmuls on CUDA use TF32, read as torch itself decides it.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none": not set,
    inherited settings resolved by torch). Once anything sets it (transformers does), reading the legacy
    ``allow_tf32`` raises RuntimeError, so the new setting is read first and the legacy flag only where the
    new one says nothing (older torch, or "none"); a legacy read that torch refuses counts as no TF32.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9: only the legacy flag exists
        precision = "none"
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # legacy and new settings mixed: torch itself refuses the legacy answer
        return False


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# Row kernels over logits (token_logprobs forward/backward, the fused loss forward, the gradient)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowLaunch:
    block_n: int  # token rows per program
    block_v: int  # vocabulary entries per loop trip of each row
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """The launch keywords autotuning may replace (BLOCK_N is fixed: the grid depends on it)."""
        return dict(BLOCK_V=self.block_v, num_warps=self.num_warps, num_stages=self.num_stages)


# Interpreter: the block is a quarter of the (power-of-2 rounded) vocabulary, within [16, 4096], so
# that every test vocabulary above 64 takes at least four trips with a partial last one (V = 1000:
# 4 x 256; V = 32003: 8 x 4096); 16 rows per program amortise the interpreter's per-operation cost.
INTERPRETER_MAX_BLOCK_V = 4096
INTERPRETER_BLOCK_N = 16
# GPU default. One program per row for real vocabularies: it streams the row once per pass; with bf16
# logits a 4096-entry block is 8 KiB per trip, 16 elements (two 16-byte vector loads) per thread at
# 8 warps, which keeps enough bytes in flight per SM (several resident programs x 8 KiB) to saturate
# HBM, while the fp32 work per element (a subtract, one exp, a few FMAs) stays far below the SM's
# arithmetic (and MUFU exp) rate. Small vocabularies pack several rows into the same 4096-entry tile.
GPU_TILE = 4096
GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 2
# Smallest block: keeps every layout valid on the GPU; masked lanes cost nothing in memory traffic.
MIN_BLOCK_V = 16


def row_launch(vocab_size: int) -> RowLaunch:
    """Fixed launch configuration of the per-row logits kernels for a vocabulary of ``vocab_size``."""
    if interpreting():
        block_v = max(MIN_BLOCK_V, min(next_power_of_2(vocab_size) // 4, INTERPRETER_MAX_BLOCK_V))
        return RowLaunch(INTERPRETER_BLOCK_N, block_v, 1, 1)
    block_v = max(MIN_BLOCK_V, min(next_power_of_2(vocab_size), GPU_TILE))
    block_n = max(1, min(16, GPU_TILE // block_v))
    warps = max(1, min(GPU_NUM_WARPS, block_n * block_v // 256))  # >= 8 elements (16 B of bf16) per thread
    return RowLaunch(block_n, block_v, warps, GPU_NUM_STAGES)


def row_autotune_configs() -> List[dict]:
    """The grid CALIBRL_AUTOTUNE=1 searches for the row kernels (keyed on V): block x warps.

    num_stages is not searched: the row kernels have no tl.dot, so triton's software pipeliner leaves their
    loops alone and every stage count compiles to the same cubin (seen for sm_90 with triton 3.9, byte for
    byte); the grid would only time the same kernel three times.
    """
    return [
        dict(BLOCK_V=block, num_warps=warps, num_stages=GPU_NUM_STAGES)
        for block in (1024, 2048, 4096, 8192, 16384)
        for warps in (4, 8, 16)
        if block // (32 * warps) >= 4  # at least 4 elements per thread
    ]


# ----------------------------------------------------------------------------------------------
# Group statistics (one program per group slot, rows of a group streamed in blocks)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupLaunch:
    block_rows: int  # rows of one group read per loop trip
    num_warps: int


def group_launch() -> GroupLaunch:
    """Groups hold ~2-64 rows (n rollouts + 1 expert): a 64-row block covers a group in one trip."""
    if interpreting():
        return GroupLaunch(16, 1)  # small, so tests cover groups spanning several blocks
    return GroupLaunch(64, 2)


# ----------------------------------------------------------------------------------------------
# Fused lm_head kernels (triton/linear.py): tiles of rows x vocabulary x hidden, and plain GEMMs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileLaunch:
    block_m: int  # rows of the output tile (tokens, or vocabulary entries for dWeight)
    block_n: int  # columns of the output tile (vocabulary entries, or hidden features)
    block_k: int  # reduction step of one tl.dot
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(
            BLOCK_M=self.block_m,
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# Shared memory one block of an sm_90 GPU (H100, H200) may use: 227 KiB (228 KiB per SM, 1 KiB reserved
# per block). Triton checks a kernel's request against the device's limit only when it loads the kernel,
# i.e. at the first launch; tests/_triton_compile_check.py checks every variant against this constant.
SM90_SHARED_MEMORY_BYTES = 227 * 1024


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    properties = torch.cuda.get_device_properties(index)
    return int(getattr(properties, "shared_memory_per_block_optin", SM90_SHARED_MEMORY_BYTES))


def shared_memory_limit(device: Optional[torch.device] = None) -> int:
    """Bytes of shared memory one block may use on ``device`` (the opt-in limit); sm_90's off a GPU."""
    if device is None or device.type != "cuda" or interpreting():
        return SM90_SHARED_MEMORY_BYTES
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


def dot_shared_memory(block_m: int, block_n: int, block_k: int, num_stages: int, element_bytes: int) -> int:
    """Shared memory of the lm_head kernels' pipelined tl.dot loop: one [block_m, block_k] and one
    [block_k, block_n] operand tile per stage. It is what triton 3.6 and 3.9 ask for on sm_90 for these
    kernels (tests/_triton_compile_check.py compares it with every compiled variant's metadata.shared)."""
    return num_stages * (block_m + block_n) * block_k * element_bytes


def _fits(launch: "TileLaunch", element_bytes: int, limit: int) -> bool:
    return dot_shared_memory(launch.block_m, launch.block_n, launch.block_k, launch.num_stages, element_bytes) <= limit


def _fit_stages(launch: "TileLaunch", element_bytes: int, limit: int) -> "TileLaunch":
    """``launch`` with as many of its pipeline stages as fit ``limit`` (at least one): on a GPU with less
    shared memory than sm_90 the default tiles stay valid, one stage shallower, instead of failing to load."""
    while launch.num_stages > 1 and not _fits(launch, element_bytes, limit):
        launch = dataclasses.replace(launch, num_stages=launch.num_stages - 1)
    return launch


def _narrow(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def linear_tile_launch(dtype: torch.dtype, shared_limit: int = SM90_SHARED_MEMORY_BYTES) -> TileLaunch:
    """Tiles of the fused lm_head kernels (statistics and logits gradient): tokens x vocabulary, K = hidden.

    GPU (H100, bf16): 128 x 128 output tiles with 64-deep K steps, 16 warps, 3 stages. Each K step
    moves (128 + 128) x 64 x 2 B = 32 KiB for 2 x 128 x 128 x 64 FLOP: 64 FLOP/B (a 64 x 128 tile
    gives 43, which makes the L2 -> SM traffic, not wgmma, the limit). The online-softmax epilogue keeps
    a second tile-sized fp32 temporary alive: at 8 warps ptxas runs out of its 255 registers and spills
    (up to 96 B of stack, measured with tests/_triton_compile_check.py); 16 warps halve the per-thread
    share of the tile and compile without spills at 128 registers. 3 stages = 96 KiB of shared memory.
    fp32 operands (FMA path, exact) use 64 x 128 tiles with 32-deep steps at 8 warps. Stages are
    dropped where ``shared_limit`` (the device's) would not hold them (``_fit_stages``).
    """
    if interpreting():
        return TileLaunch(16, 32, 16, 1, 1)
    launch = TileLaunch(128, 128, 64, 16, 3) if _narrow(dtype) else TileLaunch(64, 128, 32, 8, 4)
    return _fit_stages(launch, dtype.itemsize, shared_limit)


def gemm_tile_launch(dtype: torch.dtype, accumulate: bool, shared_limit: int = SM90_SHARED_MEMORY_BYTES) -> TileLaunch:
    """Tiles of the plain GEMMs of the lm_head backward (dWeight written once, dHidden accumulated).

    GPU (H100, bf16): 128 x 256 outputs, 64-deep K steps, 16 warps, 3 stages: (128 + 256) x 64 x 2 B
    = 48 KiB per step for 4.2 MFLOP, 85 FLOP/B, the shape of Hopper's best Triton GEMMs; 144 KiB of
    shared memory, ~115 registers, no spills. Accumulating into an fp32 output adds the loaded output
    tile to the live registers, which at 128 x 256 (16 warps, 128 registers each) spills: 128 x 128 at
    8 warps there (64 FLOP/B, no spills). fp32 operands take the FMA path (exact fp32, no tensor cores),
    where a 128 x 128 accumulating tile spills: 64 x 128 with 32-deep steps. Stages are dropped where
    ``shared_limit`` would not hold them.
    """
    if interpreting():
        return TileLaunch(16, 32, 16, 1, 1)
    if not _narrow(dtype):
        launch = TileLaunch(64, 128, 32, 8, 3)
    elif accumulate:
        launch = TileLaunch(128, 128, 64, 8, 3)
    else:
        launch = TileLaunch(128, 256, 64, 16, 3)
    return _fit_stages(launch, dtype.itemsize, shared_limit)


def linear_autotune_configs(dtype: torch.dtype, shared_limit: int = SM90_SHARED_MEMORY_BYTES) -> List[dict]:
    """The grid CALIBRL_AUTOTUNE=1 searches for the lm_head kernels (keyed on the problem sizes), without
    the candidates whose operand buffers exceed ``shared_limit`` (they could not load; on sm_90 that
    drops 4 of the 24 bf16 / fp16 candidates: 128 x 128 x 128 at 4 stages and 128 x 256 x 128)."""
    steps = (64, 128) if _narrow(dtype) else (32,)
    candidates = [
        TileLaunch(bm, bn, bk, warps, stages)
        for bm, bn in ((128, 128), (64, 128), (128, 64), (128, 256))
        for bk in steps
        for warps, stages in ((8, 3), (8, 4), (16, 3))
    ]
    return [launch.meta() for launch in candidates if _fits(launch, dtype.itemsize, shared_limit)]


def finish_launch() -> dict:
    """The per-row finishing kernel of the lm_head path (merge of partial statistics + loss epilogue):
    O(N) elementwise work, 128 rows per program on a GPU, 16 under the interpreter."""
    if interpreting():
        return dict(BLOCK_M=16, num_warps=1, num_stages=1)
    return dict(BLOCK_M=128, num_warps=4, num_stages=1)


def linear_vocab_splits(row_blocks: int, vocab_tiles: int, device: torch.device) -> int:
    """How many programs share one block of rows in the statistics pass (split-V, merged afterwards).

    Without a split the grid has N / BLOCK_M programs: 128 at N = 16384, under one wave on 132 SMs,
    and far fewer for short batches. Splitting the vocabulary brings the grid to >= 2 waves; each split
    costs 4 floats per row of partial statistics and one merge.
    """
    if interpreting():
        return max(1, min(2, vocab_tiles))  # exercise the merge in tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(vocab_tiles, -(-2 * sms // max(row_blocks, 1))))


# Memory budget of the backward's logits-gradient chunk (rows x vocabulary columns, input dtype). The GPU
# path's own constant: CALIBRL_CHUNK_BYTES (chunked's budget) does not apply (triton/linear.py docstring).
# 128 MiB = N D 2 at N = 16384, D = 4096: the chunk costs what dHidden costs; a smaller one adds fp32
# dHidden accumulator traffic (N D 8 bytes per chunk) for little memory (the accumulator is N D 4 anyway).
LINEAR_CHUNK_BYTES = 128 * 2**20


def linear_chunk_columns(n_rows: int, vocab_size: int, element_bytes: int, block_v: int) -> int:
    """Vocabulary columns per backward chunk: the (N, columns) gradient chunk fits LINEAR_CHUNK_BYTES.

    N = 16384 rows of bf16 give 4096 columns (37 chunks for V = 151936). Under the interpreter two
    tiles per chunk, so that tests cover several chunks.
    """
    if interpreting():
        return 2 * block_v
    columns = LINEAR_CHUNK_BYTES // max(1, n_rows * element_bytes)
    columns = max(block_v, columns // block_v * block_v)
    return min(columns, -(-vocab_size // block_v) * block_v)


# ==============================================================================================
# Launching with a fixed configuration or, on request, with triton.autotune
# ==============================================================================================
_AUTOTUNED = {}


def launch_device(kernel, kwargs: dict):
    """The device of a launch: that of its tensor arguments, which must all be on one (None without any)."""
    tensors = {name: value for name, value in _flat_arguments(kwargs) if isinstance(value, torch.Tensor)}
    devices = {value.device for value in tensors.values()}
    if len(devices) > 1:
        where = {name: str(value.device) for name, value in tensors.items()}
        raise ValueError(f"{kernel.__name__}: expected every tensor argument on one device, got {where}")
    return next(iter(devices), None)


def _flat_arguments(kwargs: dict):
    """(name, value) of every launch argument, the elements of a tuple argument as ``name[i]``."""
    for name, value in kwargs.items():
        if isinstance(value, tuple):
            yield from _flat_arguments({f"{name}[{i}]": item for i, item in enumerate(value)})
        else:
            yield name, value


def device_guard(device):
    """Make ``device`` current for a launch on it: triton launches on the current CUDA device and its
    current stream, so tensors on cuda:1 while cuda:0 is current would be read at the wrong addresses."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, kwargs: dict, fixed: dict, tune_configs, tune_key, allow_autotune: bool = True) -> None:
    """Launch ``kernel`` on ``grid`` with ``kwargs`` plus either the ``fixed`` meta-parameters
    (dict with the kernel's block constexprs and num_warps / num_stages), or, when CALIBRL_AUTOTUNE=1
    and ``allow_autotune``, the best of ``tune_configs`` (same dicts) chosen by triton.autotune keyed
    on the argument names ``tune_key``. Runs on the device of the tensor arguments, made current for it.
    """
    with device_guard(launch_device(kernel, kwargs)):
        _launch_on_current_device(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune)


def _launch_on_current_device(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune) -> None:
    if allow_autotune and autotune_enabled():
        # One tuner per kernel and candidate list: the list depends on the dtype (and the device's shared
        # memory), so a tuner made for bf16 must not serve fp32 calls. (triton's own cache inside a tuner
        # also keys on the tensor arguments' dtypes besides ``tune_key``.)
        cache_key = (kernel, tuple(tune_key), tuple(tuple(sorted(config.items())) for config in tune_configs))
        if cache_key not in _AUTOTUNED:
            configs = []
            for config in tune_configs:
                meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
                configs.append(triton.Config(meta, num_warps=config["num_warps"], num_stages=config["num_stages"]))
            _AUTOTUNED[cache_key] = triton.autotune(configs=configs, key=list(tune_key))(kernel)
        _AUTOTUNED[cache_key][grid](**kwargs)
        return
    kernel[grid](**kwargs, **fixed)
