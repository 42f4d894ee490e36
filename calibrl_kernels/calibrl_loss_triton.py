"""The CalibRL loss (and GRPO / DAPO / Dr.GRPO / LUFFY / RL-PLUS) fused over logits (B, T, V) (Triton).

(Named ``calibrl_loss_triton`` rather than ``calibrl_loss``: a submodule ``calibrl_kernels.calibrl_loss``
would replace the public function ``calibrl_kernels.calibrl_loss`` as a package attribute once imported.)

Forward, one kernel, BLOCK_N tokens per program (1 on a GPU for real vocabularies): stream each
token's V logits once (online max / sum-exp /
shifted sum(z e), fp32) -> lp, H; then, in closed form (``_triton_common.calibrl_token_terms``), the
token's weighted policy and guide terms, the metric flags, and the two gradient coefficients
a = -dL/dlp and b = -dL/dH. The aggregation weights c (B, T) of every term depend on the mask only
(``reference.aggregation_weights``), so they are known before launch and the kernel knows each
token's share of the loss; the scalar loss and metrics are column sums of a small (12, N) table.
Tokens that carry no weight (padding, ignore_index, expert rows of on-policy-only modes) are not read.

Backward: dL/dlogits = g * (a (p - onehot) + b p (z - lse + H)) / temperature, g the incoming
gradient, produced tile by tile by ``logprob_entropy._logits_grad_kernel`` (no (N, V) fp32
temporary; the result is written in the logits dtype, optionally over the logits themselves).

Why the gradient is recomputed in backward rather than written during the forward: memory traffic.
With logits of N x V elements of s bytes, the forward reads N V s once. Writing the gradient in the
forward as well (and scaling it by g in backward) costs a write of N V s in forward plus a read and
a write of N V s in backward when g != 1 (or a (N, V) buffer kept alive between the two), i.e. 2-4 N V s
after the forward's read; recomputing costs one read and one write, 2 N V s, which is the floor of any
gradient that depends on the logits. It also needs no state between the passes beyond 4 floats per token.
At N = 16384, V = 151936, bf16 (4.98 GB of logits) that is 3 x 4.98 GB = 14.9 GB of traffic per step.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._triton_common import (
    activation_code,
    IN_ADVANTAGE,
    IN_BASELINE,
    IN_IS_EXPERT,
    IN_OLD_LOGP,
    IN_SIGN,
    IN_W_ENTROPY_METRIC,
    IN_W_GUIDE,
    IN_W_LOSS,
    IN_W_METRIC,
    OUT_CLIPFRAC,
    OUT_CLIPFRAC_LOWER,
    OUT_COEF_ENT,
    OUT_COEF_LP,
    OUT_ENTROPY,
    OUT_ENTROPY_LOSS,
    OUT_ENTROPY_METRIC,
    OUT_GUIDE,
    OUT_KL,
    OUT_LSE,
    OUT_PG,
    SUMMED_OUTPUTS,
    TOKEN_INPUTS,
    TOKEN_OUTPUTS,
    launch,
    logits_row_statistics,
    loss_epilogue,
    policy_code,
    token_is_counted,
    token_row_pointers,
)
from .config import CalibRLConfig, LossOutput
from .logprob_entropy import as_token_rows, logits_backward, row_kernel_launch

_DEFAULT_CONFIG = CalibRLConfig()


@triton.jit
def _calibrl_loss_fwd_kernel(
    logits_ptr,  # (B, T, V) logits (fp32 / bf16 / fp16), last dim contiguous
    stride_b,  # element stride between batch entries of logits
    stride_t,  # element stride between time steps of logits
    rows_per_batch,  # T: flat token row r sits at (r // T, r % T)
    targets_ptr,  # (N,) int64 sampled token ids, N = B * T
    table_ptr,  # (TOKEN_INPUTS, N) fp32 per-token inputs of the loss (see _triton_common IN_*)
    out_ptr,  # (TOKEN_OUTPUTS, N) fp32 out: weighted terms, lse, H, a, b, lp (see OUT_*)
    n_tokens,  # N
    V,  # vocabulary size
    inv_temperature,  # fp32 runtime scalar 1 / temperature: logits are scaled by it (a multiply, not a divide, per element)
    ignore_index,  # target value of tokens left out of the loss
    clip_low,  # PPO: rho is clipped to [1 - clip_low, 1 + clip_high]
    clip_high,
    dual_clip_c,  # PPO dual clip c for negative advantages
    guide_coef,  # beta, weight of the guide term
    negative_slope,  # alpha of leaky_relu
    huber_delta,  # transition of the huber activation
    entropy_coef,  # loss -= entropy_coef * agg(H)
    POLICY: tl.constexpr,  # policy-term kind (PPO / LUFFY / RLPLUS on expert tokens)
    USES_GUIDE: tl.constexpr,  # whether the guide term exists (mode calibrl, activation != none)
    WEIGHT_BY_ADVANTAGE: tl.constexpr,  # guide weight |A| (else 1)
    ACTIVATION: tl.constexpr,  # guide activation code
    BLOCK_N: tl.constexpr,  # token rows per program
    BLOCK_V: tl.constexpr,  # vocabulary tile
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [R] int64 token indices
    in_range = rows < n_tokens
    row_ptrs = token_row_pointers(logits_ptr, rows, rows_per_batch, stride_b, stride_t)
    targets = tl.load(targets_ptr + rows, mask=in_range, other=ignore_index)
    # Tokens without any weight (padding, ignored targets, dropped expert rows) are not read at all.
    counted = token_is_counted(table_ptr, n_tokens, rows, in_range) & (targets != ignore_index)
    lse, entropy = logits_row_statistics(row_ptrs, V, inv_temperature, counted, BLOCK_V)
    target_logit = tl.load(row_ptrs + tl.where(counted, targets, 0), mask=counted, other=0.0).to(tl.float32)
    lp = target_logit * inv_temperature - lse
    loss_epilogue(
        table_ptr, out_ptr, n_tokens, rows, in_range, counted, lp, entropy, lse,
        clip_low, clip_high, dual_clip_c, guide_coef, negative_slope, huber_delta, entropy_coef,
        POLICY, USES_GUIDE, WEIGHT_BY_ADVANTAGE, ACTIVATION,
    )


# ----------------------------------------------------------------------------------------------
# Host side: the per-token table before launch, the scalars after
# ----------------------------------------------------------------------------------------------
def prepare_token_table(
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    expert_logp: Optional[torch.Tensor],
    passed: Optional[torch.Tensor],
    is_expert: Optional[torch.Tensor],
    expert_mask: Optional[torch.Tensor],
    ignore_index: int,
    config: CalibRLConfig,
) -> torch.Tensor:
    """(TOKEN_INPUTS, N) fp32 table of every per-token input of the loss kernels, N = B * T.

    Masks and aggregation weights follow ``reference.calibrl_loss`` exactly: tokens with target ==
    ignore_index are masked; expert rows are dropped from the loss unless the mode keeps them.
    """
    B, T = targets.shape
    f32 = torch.float32
    device = targets.device
    m = mask.to(f32) * (targets != ignore_index).to(f32)  # (B, T) token mask
    expert_rows = torch.zeros(B, dtype=torch.bool, device=device) if is_expert is None else is_expert  # (B,)
    on_policy_m = m * (~expert_rows)[:, None].to(f32)  # (B, T)
    loss_m = m if config.keeps_expert_rows else on_policy_m  # (B, T)
    table = torch.zeros(TOKEN_INPUTS, B, T, dtype=f32, device=device)
    table[IN_OLD_LOGP] = old_logp.detach().to(f32)
    adv = advantages.detach().to(f32)
    table[IN_ADVANTAGE] = adv[:, None] if adv.dim() == 1 else adv
    table[IN_IS_EXPERT] = expert_rows.to(f32)[:, None]
    table[IN_SIGN] = 1.0
    table[IN_W_LOSS] = reference.aggregation_weights(loss_m, config.loss_agg_mode, config.loss_scale_factor)
    table[IN_W_METRIC] = reference.aggregation_weights(m, "token-mean")
    table[IN_W_ENTROPY_METRIC] = reference.aggregation_weights(on_policy_m, "token-mean")
    if config.uses_guide:
        baseline = expert_logp.detach().to(f32)
        table[IN_BASELINE] = baseline[:, None] if baseline.dim() == 1 else baseline
        table[IN_SIGN] = torch.where(passed, 1.0, -1.0).to(f32)[:, None]
        guide_m = on_policy_m * (expert_mask != 0).to(f32) if config.mask_beyond_expert else on_policy_m
        table[IN_W_GUIDE] = reference.aggregation_weights(guide_m, config.loss_agg_mode, config.loss_scale_factor)
    return table.reshape(TOKEN_INPUTS, B * T)


def check_table_size(n_tokens: int) -> None:
    """Per-token table offsets are int32 (field * N + token); the logits offsets are int64."""
    if n_tokens * max(TOKEN_INPUTS, TOKEN_OUTPUTS) >= 2 ** 31:
        raise ValueError(
            f"targets: expected fewer than {2 ** 31 // max(TOKEN_INPUTS, TOKEN_OUTPUTS)} tokens per call, got {n_tokens}"
        )


def kernel_loss_arguments(config: CalibRLConfig) -> dict:
    """The runtime scalars and constexprs of config that every loss kernel takes."""
    return dict(
        clip_low=float(config.clip_low), clip_high=float(config.clip_high), dual_clip_c=float(config.dual_clip_c),
        guide_coef=float(config.guide_coef), negative_slope=float(config.negative_slope),
        huber_delta=float(config.huber_delta), entropy_coef=float(config.entropy_coef),
        POLICY=policy_code(config.mode), USES_GUIDE=config.uses_guide,
        WEIGHT_BY_ADVANTAGE=config.weight_by_advantage,
        ACTIVATION=activation_code(config),
    )


def combine_token_outputs(token_out: torch.Tensor, config: CalibRLConfig):
    """(loss, metrics (6,)) from the (TOKEN_OUTPUTS, N) table, exactly as reference.calibrl_loss combines
    its aggregates; all on the device. metrics = pg_loss, guide_loss, entropy, clipfrac, clipfrac_lower, ppo_kl.
    """
    sums = token_out[:SUMMED_OUTPUTS].sum(dim=1)  # (7,)
    pg_loss = sums[OUT_PG]
    loss = pg_loss
    if config.uses_guide:
        guide_loss = sums[OUT_GUIDE]
        loss = loss + config.guide_coef * guide_loss
    else:
        guide_loss = torch.zeros((), dtype=sums.dtype, device=sums.device)
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * sums[OUT_ENTROPY_LOSS]
    metrics = torch.stack(
        [pg_loss, guide_loss, sums[OUT_ENTROPY_METRIC], sums[OUT_CLIPFRAC], sums[OUT_CLIPFRAC_LOWER], sums[OUT_KL]]
    )
    return loss, metrics


def loss_output(loss: torch.Tensor, metrics: torch.Tensor) -> LossOutput:
    pg_loss, guide_loss, entropy, clipfrac, clipfrac_lower, ppo_kl = metrics.detach().unbind(0)
    return LossOutput(loss, pg_loss, guide_loss, entropy, clipfrac, clipfrac_lower, ppo_kl)


def calibrl_loss_forward(
    rows: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, config: CalibRLConfig, ignore_index: int
) -> torch.Tensor:
    """rows (B, T, V) logits view, targets (N,) int64, table (TOKEN_INPUTS, N) -> (TOKEN_OUTPUTS, N) fp32."""
    B, T, V = rows.shape
    n = B * T
    check_table_size(n)
    token_out = torch.zeros(TOKEN_OUTPUTS, n, dtype=torch.float32, device=rows.device)
    if n == 0:
        return token_out
    grid, block_n, fixed, tune = row_kernel_launch(V, n)
    launch(
        _calibrl_loss_fwd_kernel, grid,
        dict(
            logits_ptr=rows, stride_b=rows.stride(0), stride_t=rows.stride(1), rows_per_batch=T,
            targets_ptr=targets, table_ptr=table, out_ptr=token_out, n_tokens=n, V=V,
            inv_temperature=1.0 / float(config.temperature), ignore_index=int(ignore_index), BLOCK_N=block_n,
            **kernel_loss_arguments(config),
        ),
        fixed, tune, ["V"],
    )
    return token_out


class _FusedCalibRLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, table, config, ignore_index, inplace_backward):
        rows = as_token_rows(logits.detach())
        flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
        token_out = calibrl_loss_forward(rows, flat_targets, table, config, ignore_index)
        loss, metrics = combine_token_outputs(token_out, config)
        ctx.save_for_backward(rows, flat_targets, token_out)
        ctx.mark_non_differentiable(metrics)
        ctx.logits_shape = logits.shape
        ctx.temperature = config.temperature
        ctx.ignore_index = ignore_index
        ctx.inplace = inplace_backward
        ctx.backward_done = False
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(
                "fused_calibrl_loss(inplace_backward=True): the logits buffer already holds the gradient of a "
                "first backward pass; a second backward (retain_graph=True) cannot recompute it"
            )
        rows, flat_targets, token_out = ctx.saved_tensors
        grad = logits_backward(
            rows, flat_targets, token_out[OUT_LSE], token_out[OUT_ENTROPY], token_out[OUT_COEF_LP],
            token_out[OUT_COEF_ENT], ctx.temperature, ctx.ignore_index, scale=grad_loss, inplace=ctx.inplace,
        )
        if ctx.inplace:
            ctx.backward_done = True
            # Autograd cannot see a kernel's writes: bump the version counter so that any other node
            # that saved these logits fails loudly instead of reading gradients as logits.
            torch.autograd.graph.increment_version(rows)
        return grad.view(ctx.logits_shape), None, None, None, None, None


def fused_calibrl_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    expert_logp: Optional[torch.Tensor] = None,
    passed: Optional[torch.Tensor] = None,
    is_expert: Optional[torch.Tensor] = None,
    expert_mask: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    config: CalibRLConfig = _DEFAULT_CONFIG,
    inplace_backward: bool = False,
) -> LossOutput:
    """The Triton twin of ``reference.fused_calibrl_loss`` (same signature and results).

    inplace_backward=True writes dL/dlogits over the logits buffer during backward (no gradient
    buffer: peak memory is the logits alone); afterwards the logits tensor holds its own gradient
    (``logits.grad`` aliases it when logits is a leaf) and must not be used as logits again.
    float64 logits run the reference (the kernels compute in fp32).
    """
    if logits.dtype == torch.float64:
        return reference.fused_calibrl_loss(
            logits, targets, old_logp, advantages, mask, expert_logp=expert_logp, passed=passed,
            is_expert=is_expert, expert_mask=expert_mask, ignore_index=ignore_index, config=config,
        )
    table = prepare_token_table(
        targets, old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, ignore_index, config
    )
    loss, metrics = _FusedCalibRLLoss.apply(logits, targets, table, config, int(ignore_index), bool(inplace_backward))
    return loss_output(loss, metrics)
