"""Launch heuristics of every Triton kernel (block sizes, warps, stages), in one place.

Three regimes:
- interpreting (``TRITON_INTERPRET=1``, CPU tests): one fixed, small configuration; the interpreter runs
  programs one after the other with numpy, so block size only trades loop trips against numpy overhead,
  and it must be small enough that test shapes still take several vocabulary blocks.
- GPU, default: a fixed configuration reasoned from the kernels' byte/FLOP budgets (comments below).
- GPU with ``CALIBRL_AUTOTUNE=1``: ``triton.autotune`` over a small grid around the default, keyed on
  the problem sizes. Launches that write into one of their own inputs (the in-place logits gradient)
  are never autotuned, since the tuner would run them several times over their own output.

This module imports no triton at module level, so ``import calibrl_kernels`` never does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List

import torch


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (must be decided before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """CALIBRL_AUTOTUNE=1 turns on triton.autotune for the kernels that allow it (never when interpreting)."""
    return os.environ.get("CALIBRL_AUTOTUNE", "0") == "1" and not interpreting()


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
    """The grid CALIBRL_AUTOTUNE=1 searches for the row kernels (keyed on V): block x warps x stages."""
    return [
        dict(BLOCK_V=block, num_warps=warps, num_stages=stages)
        for block in (1024, 2048, 4096, 8192, 16384)
        for warps in (4, 8, 16)
        for stages in (1, 2, 3)
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
# Fused lm_head kernels (linear_triton.py): tiles of rows x vocabulary x hidden
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinearLaunch:
    block_n: int  # rows (tokens) per program
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden features per tl.dot step
    num_warps: int
    num_stages: int


def linear_launch(n_rows: int, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> LinearLaunch:
    """Tiles of the fused lm_head kernels (forward statistics and both gradient passes).

    GPU (H100, bf16): 128 x 128 output tiles with 64-deep K steps are the standard tensor-core GEMM
    tile (128*64*2 B * 2 operands = 32 KiB of shared memory per stage, 3 stages = 96 KiB, leaving room
    for the fp32 accumulators of one 128 x 128 tile in registers at 8 warps). fp32 inputs halve the
    K step to keep the same shared-memory footprint.
    """
    if interpreting():
        return LinearLaunch(
            block_n=16, block_v=32 if vocab_size > 16 else 16, block_d=16 if hidden_size > 8 else 16,
            num_warps=1, num_stages=1,
        )
    block_d = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    return LinearLaunch(block_n=128, block_v=128, block_d=block_d, num_warps=8, num_stages=3)


def linear_autotune_configs(dtype: torch.dtype) -> List[dict]:
    """The grid CALIBRL_AUTOTUNE=1 searches for the fused lm_head kernels."""
    wide = dtype in (torch.bfloat16, torch.float16)
    configs = []
    for block_n, block_v in ((128, 128), (64, 128), (128, 64), (64, 64), (128, 256)):
        for block_d in ((64, 128) if wide else (32, 64)):
            for warps, stages in ((4, 3), (8, 3), (8, 4)):
                configs.append(dict(block_n=block_n, block_v=block_v, block_d=block_d, num_warps=warps, num_stages=stages))
    return configs
