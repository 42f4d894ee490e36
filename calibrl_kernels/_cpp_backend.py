"""The C++/OpenMP CPU backend: the row kernels of ``csrc/`` on logits, and on the chunks of the linear path.

Importing this module is cheap: the extension is built on the first call of one of its ops
(``build.extension()``). When the build fails:

- by default (cpp picked because the tensors are on the CPU) every op runs the torch backend's
  implementation instead, with the same options (chunk_bytes, inplace_backward), after one warning
  per process; ``availability`` says yes for CPU tensors until a build attempt has failed;
- when ``CALIBRL_IMPL=cpp`` forces this backend, ``availability`` builds at once, so that every call,
  the first included, raises the RuntimeError naming the build error (no silent torch run).

Ops (reference signatures):
- ``token_logprobs``: forward = one pass per row (row_stats); backward = one pass writing dlogits.
- ``fused_calibrl_loss``: forward = one pass per row with the closed-form coefficients (row_loss);
  backward = one pass writing dlogits with a, b scaled by the incoming gradient. So the logits are
  read twice and the gradient written once, with no (N, V) temporary.
- ``linear_token_logprobs`` / ``fused_linear_calibrl_loss``: the chunked driver of ``linear_cpu`` with
  ``CppRowMath`` (statistics, coefficients and in-place gradient formation in one pass per row).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _coefficients as coef
from . import _torch_backend, build, linear_cpu
from ._autograd import can_overwrite, first_order_only
from .config import (
    LOG_RATIO_CLAMP,
    LUFFY_SHAPING_GAMMA,
    RLPLUS_FOCAL_POWER,
    RLPLUS_MIX,
    RLPLUS_OLD_WEIGHT,
    CalibRLConfig,
    LossOutput,
)
from .reference import compute_dtype, inverse_temperature

ROW = coef.ROW
_DEFAULT_CONFIG = CalibRLConfig()


def loss_params(config: CalibRLConfig) -> dict:
    """The numeric loss parameters the C++ row_terms reads (by name)."""
    return dict(
        clip_low=config.clip_low, clip_high=config.clip_high, dual_clip_c=config.dual_clip_bound,
        guide_coef=config.guide_coef, negative_slope=config.negative_slope, huber_delta=config.huber_delta,
        entropy_coef=config.entropy_coef, log_ratio_clamp=LOG_RATIO_CLAMP, luffy_gamma=LUFFY_SHAPING_GAMMA,
        rlplus_old_weight=RLPLUS_OLD_WEIGHT, rlplus_mix=RLPLUS_MIX, rlplus_focal_power=RLPLUS_FOCAL_POWER,
    )


class CppRowMath:
    """linear_cpu's row-math interface on the C++ kernels (CPU tensors; chunk is scratch, see TorchRowMath)."""

    name = "cpp"
    buffers_per_chunk = 1  # one pass per row, in place: no chunk-sized temporaries

    def __init__(self, module):
        self.module = module

    def stats(self, logits, targets, inv_temperature, ignore_index, rows):
        self.module.row_stats(logits, targets.long().contiguous(), inv_temperature, ignore_index, rows)

    def loss(self, logits, targets, table, rows, config, inv_temperature, ignore_index, form_gradient):
        self.module.row_loss(
            logits, targets.long().contiguous(), table, rows, config.mode, config.activation, loss_params(config),
            inv_temperature, ignore_index, form_gradient,
        )

    def gradient(self, logits, targets, rows, inv_temperature, ignore_index):
        self.module.row_gradient(logits, targets.long().contiguous(), rows, inv_temperature, ignore_index, logits)


def _forced() -> bool:
    """Whether CALIBRL_IMPL=cpp forces this backend (then a failed build raises instead of falling back)."""
    from . import _dispatch

    return _dispatch.requested_impl() == "cpp"


def _build_failure() -> str:
    return f"the C++ kernels could not be built: {build.build_error()}"


def _row_math() -> Optional[CppRowMath]:
    """The C++ row math; None when the build failed (the caller falls back to torch) unless forced."""
    forced = _forced()
    module = build.extension(fallback_warning=not forced)
    if module is not None:
        return CppRowMath(module)
    if forced:
        raise RuntimeError(f"calibrl_kernels: backend 'cpp' was requested (CALIBRL_IMPL=cpp) but {_build_failure()}")
    return None


def _row_view(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, V) / (B, T, V) as the kernels take them: any strides but a unit one along V (else a copy).

    So a slice such as logits[:, :-1] of a (B, L, V) tensor is read in place, never copied.
    """
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def _row_table(num_rows: int, logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(num_rows, len(coef.ROW_FIELDS), dtype=compute_dtype(logits), device=logits.device)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_temperature, ignore_index, math):
        logits_rows, flat_targets = _row_view(logits), targets.reshape(-1).long().contiguous()
        rows = _row_table(flat_targets.numel(), logits)
        math.module.row_stats(logits_rows, flat_targets, inv_temperature, ignore_index, rows)
        ctx.save_for_backward(logits, flat_targets, rows)
        ctx.settings = (inv_temperature, ignore_index, math)
        return rows[:, ROW["logp"]].clone().view(targets.shape), rows[:, ROW["entropy"]].clone().view(targets.shape)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logp, grad_entropy):
        logits, flat_targets, rows = ctx.saved_tensors
        inv_temperature, ignore_index, math = ctx.settings
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        rows = rows.clone()
        rows[:, ROW["coef_a"]] = 0.0 if grad_logp is None else -grad_logp.reshape(-1).to(rows.dtype)
        rows[:, ROW["coef_b"]] = 0.0 if grad_entropy is None else -grad_entropy.reshape(-1).to(rows.dtype)
        logits_rows = _row_view(logits)
        grad = torch.empty(logits.shape, dtype=logits.dtype)
        math.module.row_gradient(logits_rows, flat_targets, rows, inv_temperature, ignore_index, grad)
        return (grad.view(logits.shape),) + (None,) * 4


def token_logprobs(logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
    math = _row_math()
    if math is None:
        return _torch_backend.OPS["token_logprobs"](logits, targets, temperature, ignore_index, return_entropy)
    inv_temperature = inverse_temperature(temperature, compute_dtype(logits))
    logp, entropy = _TokenLogprobs.apply(logits, targets, inv_temperature, ignore_index, math)
    return (logp, entropy) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# fused_calibrl_loss
# --------------------------------------------------------------------------------------------
class _FusedLoss(torch.autograd.Function):
    """Loss and metrics in one pass per row; backward writes dL/dlogits (over the logits when inplace)."""

    @staticmethod
    def forward(ctx, logits, targets, table, config, ignore_index, math, inplace_backward):
        logits_rows, flat_targets = _row_view(logits), targets.reshape(-1).long().contiguous()
        rows = _row_table(flat_targets.numel(), logits)
        inv_temperature = inverse_temperature(config.temperature, compute_dtype(logits))
        math.module.row_loss(
            logits_rows, flat_targets, table, rows, config.mode, config.activation, loss_params(config),
            inv_temperature, ignore_index, False,
        )
        out = coef.loss_output(rows[:, ROW["pg"]:].sum(0), config)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, flat_targets, rows)
        ctx.settings = (inv_temperature, ignore_index, math)
        # Aliasing logits (expanded, overlapping views) get a fresh gradient buffer: see can_overwrite.
        ctx.inplace, ctx.backward_done = inplace_backward and can_overwrite(logits_rows), False
        metrics = tuple(out[1:])
        ctx.mark_non_differentiable(*metrics)
        return (out.loss.clone(),) + metrics

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, *unused_metric_grads):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if ctx.inplace and ctx.backward_done:
            raise RuntimeError(
                "fused_calibrl_loss(inplace_backward=True): the logits buffer already holds the gradient of a "
                "first backward pass; a second backward (retain_graph=True) cannot recompute it"
            )
        logits, flat_targets, rows = ctx.saved_tensors
        inv_temperature, ignore_index, math = ctx.settings
        rows = rows.clone()
        rows[:, ROW["coef_a"]] *= grad_loss.to(rows.dtype)
        rows[:, ROW["coef_b"]] *= grad_loss.to(rows.dtype)
        logits_rows = _row_view(logits.detach())
        # In place: row_gradient reads each row before overwriting it (a strided view is written as is;
        # logits without unit stride along V were copied by _row_view, and the copy is overwritten).
        grad = logits_rows if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype)
        math.module.row_gradient(logits_rows, flat_targets, rows, inv_temperature, ignore_index, grad)
        if ctx.inplace:
            ctx.backward_done = True
            # The kernel's writes are invisible to autograd: bump the version counter so that any other
            # node that saved these logits fails loudly instead of reading gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return (grad.view(logits.shape),) + (None,) * 6


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
    """The C++ twin of ``reference.fused_calibrl_loss``.

    inplace_backward=True writes dL/dlogits over the logits buffer during backward (no logits-sized
    gradient buffer): afterwards ``logits`` holds its own gradient (``logits.grad`` aliases it when
    logits is a leaf) and must not be used as logits again; a second backward raises.
    """
    math = _row_math()
    if math is None:
        return _torch_backend.OPS["fused_calibrl_loss"](
            logits, targets, old_logp, advantages, mask, expert_logp=expert_logp, passed=passed,
            is_expert=is_expert, expert_mask=expert_mask, ignore_index=ignore_index, config=config,
            inplace_backward=inplace_backward,
        )
    dtype = compute_dtype(logits)
    table = coef.loss_token_table(
        targets, old_logp, advantages, mask, expert_logp=expert_logp, passed=passed, is_expert=is_expert,
        expert_mask=expert_mask, ignore_index=ignore_index, config=config, dtype=dtype,
    )
    return LossOutput(*_FusedLoss.apply(logits, targets, table, config, ignore_index, math, bool(inplace_backward)))


# --------------------------------------------------------------------------------------------
# The linear (lm_head) ops: linear_cpu's driver with the C++ row math
# --------------------------------------------------------------------------------------------
def linear_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, *, chunk_bytes=None):
    math = _row_math()
    if math is None:
        return _torch_backend.OPS["linear_token_logprobs"](
            hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_bytes=chunk_bytes
        )
    return linear_cpu.linear_token_logprobs(
        hidden, weight, targets, bias, temperature, ignore_index, return_entropy, row_math=math, chunk_bytes=chunk_bytes
    )


def fused_linear_calibrl_loss(hidden, weight, targets, old_logp, advantages, mask, *, chunk_bytes=None, **kwargs) -> LossOutput:
    math = _row_math()
    if math is None:
        return _torch_backend.OPS["fused_linear_calibrl_loss"](
            hidden, weight, targets, old_logp, advantages, mask, chunk_bytes=chunk_bytes, **kwargs
        )
    return linear_cpu.fused_linear_calibrl_loss(
        hidden, weight, targets, old_logp, advantages, mask, row_math=math, chunk_bytes=chunk_bytes, **kwargs
    )


OPS = {
    "token_logprobs": token_logprobs,
    "fused_calibrl_loss": fused_calibrl_loss,
    "linear_token_logprobs": linear_token_logprobs,
    "fused_linear_calibrl_loss": fused_linear_calibrl_loss,
}


def availability(device: torch.device) -> Tuple[bool, str]:
    """CPU tensors only, and only while the extension has not failed to build.

    It builds on the first op call, or here already when CALIBRL_IMPL=cpp forces this backend, so that
    a forced backend that cannot build is refused from the first call on.
    """
    if torch.device(device).type != "cpu":
        return False, f"the C++ kernels run on CPU tensors only, not on {torch.device(device)}"
    forced = _forced()
    if not build.attempted() and forced:
        build.extension(fallback_warning=False)
    if build.attempted() and build.build_error() is not None:
        if not forced:
            build.extension()  # the dispatcher falls back to torch: the process's one warning, if not given yet
        return False, _build_failure()
    return True, ""
