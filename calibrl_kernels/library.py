"""The fused ops as PyTorch custom operators (``torch.ops.calibrl.*``), so that they compose with torch.compile.

Every kernel of the fused ops (the C++ kernels, the Triton kernels, the chunked lm_head path on the C++ or
the torch row math) is called through an operator registered here with ``torch.library.custom_op``: a
schema of tensors and scalars, a fake implementation (output shapes and dtypes, used while tracing) and
autograd registered with ``register_autograd``. ``torch.compile(fullgraph=True)`` then traces the public ops
end to end and sees each kernel as one opaque node; the backend is chosen outside the graph (``_dispatch``)
and travels as the ``impl`` string; a ``CalibRLConfig`` travels as its ``key`` string.

Operators (impl: ``"cpp"`` or ``"triton"``; the lm_head ops also ``"torch"``, the chunked path on torch
row math). Every forward returns the (N, len(ROW_FIELDS)) row table of ``reference.coefficients`` that its
backward reads, in the compute dtype (fp32; fp64 for fp64 inputs), N = the number of token rows:

- ``token_logprobs(logits, targets, temperature, ignore_index, impl) -> (logp, entropy, rows)`` and
  ``token_logprobs_backward(logits, targets, rows, grad_logp, grad_entropy, ...) -> grad_logits``;
- ``fused_calibrl_loss(logits, targets, table, config, ignore_index, inplace_backward, impl) -> (loss,
  metrics (6,), rows)``, ``fused_calibrl_loss_backward(...) -> grad_logits`` and its in-place twin
  ``fused_calibrl_loss_backward_`` (writes the gradient over the logits; eager mode only);
- ``linear_token_logprobs(hidden, weight, bias, targets, ..., needs, chunk_bytes, impl) -> (logp, entropy,
  rows)`` and ``linear_token_logprobs_backward(...) -> (grad_hidden, grad_weight, grad_bias)``;
- ``fused_linear_calibrl_loss(hidden, weight, bias, targets, table, ...) -> (loss, metrics, rows,
  grad_hidden, grad_weight, grad_bias)``: the chunked path forms the gradients in the forward (the
  backward scales and casts them, in torch); Triton returns empty ones and computes them in
  ``fused_linear_calibrl_loss_backward``;
- ``group_advantages(scores, group_ids, is_expert, ..., num_groups, impl)``: the Triton kernel (the torch
  path is plain torch ops, which torch.compile traces itself).

Gradients that are not needed (``needs``, decided where ``requires_grad`` is known) come back as empty
tensors. The backward functions are first-order only (``_autograd.first_order_only``).
"""

import importlib
from typing import List, Optional, Tuple

import torch

from ._autograd import can_overwrite, first_order_only
from .config import DEFAULT_CONFIG, CalibRLConfig, GroupStats, LossInputs, LossOutput
from .reference import coefficients as coef
from .reference import compute_dtype
from .reference.coefficients import ROW

NAMESPACE = "calibrl"
ROW_COUNT = len(coef.ROW_FIELDS)
METRIC_COUNT = len(LossOutput._fields) - 1  # every LossOutput field but the loss
Tensors3 = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# Where each backend's kernels live (imported by name when an operator first runs on that backend, as
# _dispatch imports its backends): the module's ``KERNELS`` table, kernel name -> function.
KERNEL_MODULES = {"torch": "calibrl_kernels.chunked", "cpp": "calibrl_kernels.cpu", "triton": "calibrl_kernels.triton"}


def kernels(impl: str) -> dict:
    """The kernel functions of backend ``impl`` (kernel name -> function)."""
    if impl not in KERNEL_MODULES:
        raise ValueError(f"impl: expected one of {tuple(KERNEL_MODULES)}, got {impl!r}")
    return importlib.import_module(KERNEL_MODULES[impl]).KERNELS


def _kernel(impl: str, name: str):
    table = kernels(impl)
    if name not in table:
        raise RuntimeError(f"calibrl_kernels: backend {impl!r} has no kernel {name!r}")
    return table[name]


def _empty(like: torch.Tensor) -> torch.Tensor:
    """The placeholder of a gradient that was not needed."""
    return like.new_empty(0)


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return _empty(like) if t is None else t


def _or_none(t: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 else t


def _row_table_like(like: torch.Tensor, num_rows: int) -> torch.Tensor:
    return like.new_empty(num_rows, ROW_COUNT, dtype=compute_dtype(like))


def _loss_and_metrics(rows: torch.Tensor, config: CalibRLConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss (), metrics (METRIC_COUNT,)) from a filled row table, as every backend combines them."""
    out = coef.loss_output(rows[:, ROW["pg"] :].sum(0), config)
    return out.loss.clone(), torch.stack(tuple(out[1:]))


def _traced(t: torch.Tensor) -> bool:
    """Whether t is a tracing stand-in (torch.compile / opcheck) rather than real data."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor  # here: importing them at start-up imports triton
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


def _zeros_if_none(grad: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """An incoming per-token gradient, zeros (fp32, shaped like targets) for an output that received none."""
    return torch.zeros(targets.shape, dtype=torch.float32, device=targets.device) if grad is None else grad


def _logprob_outputs(rows: torch.Tensor, targets: torch.Tensor) -> Tensors3:
    """(logp, entropy) shaped like targets, copied out of the row table, and the row table itself."""
    shape = targets.shape
    return rows[:, ROW["logp"]].reshape(shape).clone(), rows[:, ROW["entropy"]].reshape(shape).clone(), rows


def _fake_logprob_outputs(like: torch.Tensor, targets: torch.Tensor) -> Tensors3:
    dtype = compute_dtype(like)
    per_token = tuple(targets.new_empty(targets.shape, dtype=dtype) for _ in range(2))
    return per_token + (_row_table_like(like, targets.numel()),)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, impl: str
) -> Tensors3:
    return _logprob_outputs(_kernel(impl, "token_logprobs")(logits, targets, temperature, ignore_index), targets)


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, ignore_index, impl):
    return _fake_logprob_outputs(logits, targets)


@torch.library.custom_op(f"{NAMESPACE}::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> torch.Tensor:
    kernel = _kernel(impl, "token_logprobs_backward")
    return kernel(logits, targets, rows, grad_logp, grad_entropy, temperature, ignore_index)


@_token_logprobs_backward_op.register_fake
def _(logits, targets, rows, grad_logp, grad_entropy, temperature, ignore_index, impl):
    return torch.empty_like(logits)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, impl = inputs
    ctx.save_for_backward(logits, targets, output[2])
    ctx.settings = (temperature, ignore_index, impl)
    ctx.mark_non_differentiable(output[2])


@first_order_only
def _token_logprobs_backward(ctx, grad_logp, grad_entropy, _grad_rows):
    logits, targets, rows = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 5
    grad_logp, grad_entropy = _zeros_if_none(grad_logp, targets), _zeros_if_none(grad_entropy, targets)
    grad = _token_logprobs_backward_op(logits, targets, rows, grad_logp, grad_entropy, *ctx.settings)
    return grad, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def token_logprobs(impl: str):
    """The backend-contract function of ``token_logprobs`` on backend ``impl`` (see ``_dispatch``)."""

    def run(logits, targets, temperature=1.0, ignore_index=-100, return_entropy=False):
        logp, entropy, _ = _token_logprobs_op(logits, targets, float(temperature), int(ignore_index), impl)
        return (logp, entropy) if return_entropy else logp

    return run


# --------------------------------------------------------------------------------------------
# fused_calibrl_loss
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::fused_calibrl_loss", mutates_args=())
def _fused_calibrl_loss_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    table: torch.Tensor,
    config: str,
    ignore_index: int,
    inplace_backward: bool,
    impl: str,
) -> Tensors3:
    settings = CalibRLConfig.from_key(config)
    rows = _kernel(impl, "fused_calibrl_loss")(logits, targets, table, settings, ignore_index)
    return (*_loss_and_metrics(rows, settings), rows)


@_fused_calibrl_loss_op.register_fake
def _(logits, targets, table, config, ignore_index, inplace_backward, impl):
    dtype = compute_dtype(logits)
    return (
        logits.new_empty((), dtype=dtype),
        logits.new_empty(METRIC_COUNT, dtype=dtype),
        (_row_table_like(logits, targets.numel())),
    )


@torch.library.custom_op(f"{NAMESPACE}::fused_calibrl_loss_backward", mutates_args=())
def _fused_calibrl_loss_backward_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_loss: torch.Tensor,
    config: str,
    ignore_index: int,
    impl: str,
) -> torch.Tensor:
    kernel = _kernel(impl, "fused_calibrl_loss_backward")
    return kernel(logits, targets, rows, grad_loss, CalibRLConfig.from_key(config), ignore_index, None)


@_fused_calibrl_loss_backward_op.register_fake
def _(logits, targets, rows, grad_loss, config, ignore_index, impl):
    return torch.empty_like(logits)


@torch.library.custom_op(f"{NAMESPACE}::fused_calibrl_loss_backward_", mutates_args=("logits",))
def _fused_calibrl_loss_backward_inplace_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_loss: torch.Tensor,
    config: str,
    ignore_index: int,
    impl: str,
) -> None:
    kernel = _kernel(impl, "fused_calibrl_loss_backward")
    kernel(logits, targets, rows, grad_loss, CalibRLConfig.from_key(config), ignore_index, logits)


@_fused_calibrl_loss_backward_inplace_op.register_fake
def _(logits, targets, rows, grad_loss, config, ignore_index, impl):
    return None


def _fused_calibrl_loss_setup(ctx, inputs, output):
    logits, targets, table, config, ignore_index, inplace_backward, impl = inputs
    ctx.save_for_backward(logits, targets, output[2])
    ctx.settings = (config, ignore_index, impl)
    # In place only on real, non-aliasing logits with unit stride along V (see can_overwrite), never while
    # tracing: a compiled step plans its own buffers.
    ctx.inplace = inplace_backward and not _traced(logits) and logits.stride(-1) == 1 and can_overwrite(logits.detach())
    ctx.backward_done = False
    ctx.mark_non_differentiable(output[1], output[2])


@first_order_only
def _fused_calibrl_loss_backward(ctx, grad_loss, _grad_metrics, _grad_rows):
    if ctx.inplace and ctx.backward_done:  # checked first: the saved logits now hold a gradient
        raise RuntimeError(
            "fused_calibrl_loss(inplace_backward=True): the logits buffer already holds the gradient of a "
            "first backward pass; a second backward (retain_graph=True) cannot recompute it"
        )
    logits, targets, rows = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    if not ctx.inplace:
        return (_fused_calibrl_loss_backward_op(logits, targets, rows, grad_loss, *ctx.settings),) + (None,) * 6
    ctx.backward_done = True
    buffer = logits.detach()  # shares the version counter: the op's write makes other users of it fail loudly
    _fused_calibrl_loss_backward_inplace_op(buffer, targets, rows, grad_loss, *ctx.settings)
    return (buffer,) + (None,) * 6


_fused_calibrl_loss_op.register_autograd(_fused_calibrl_loss_backward, setup_context=_fused_calibrl_loss_setup)


def _loss_output(loss: torch.Tensor, metrics: torch.Tensor) -> LossOutput:
    return LossOutput(loss, *metrics.unbind())


def fused_calibrl_loss(impl: str):
    """The backend-contract function of ``fused_calibrl_loss`` on backend ``impl``."""

    def run(logits, targets, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG, inplace_backward=False):
        table = coef.loss_token_table(targets, inputs, config, compute_dtype(logits))
        loss, metrics, _ = _fused_calibrl_loss_op(
            logits, targets, table, config.key, inputs.ignore_index, inplace_backward, impl
        )
        return _loss_output(loss, metrics)

    return run


# --------------------------------------------------------------------------------------------
# linear_token_logprobs
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_bytes: int,
    impl: str,
) -> Tensors3:
    kernel = _kernel(impl, "linear_token_logprobs")
    rows = kernel(hidden, weight, bias, targets, temperature, ignore_index, chunk_bytes or None)
    return _logprob_outputs(rows, targets)


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, chunk_bytes, impl):
    return _fake_logprob_outputs(hidden, targets)


@torch.library.custom_op(f"{NAMESPACE}::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    needs: List[bool],
    chunk_bytes: int,
    impl: str,
) -> Tensors3:
    kernel = _kernel(impl, "linear_token_logprobs_backward")
    grads = kernel(
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
        chunk_bytes or None,
    )
    return _gradient_outputs(grads, hidden)


@_linear_token_logprobs_backward_op.register_fake
def _(
    hidden, weight, bias, targets, rows, grad_logp, grad_entropy, temperature, ignore_index, needs, chunk_bytes, impl
):
    return _fake_gradients(hidden, weight, bias, needs)


def _gradient_outputs(grads, hidden: torch.Tensor) -> Tensors3:
    """A kernel's (dHidden (N, D), dWeight, dBias) as operator outputs: dHidden shaped like hidden, empty
    tensors where not needed."""
    d_hidden, d_weight, d_bias = grads
    d_hidden = None if d_hidden is None else d_hidden.reshape(hidden.shape)
    return tuple(_or_empty(g, hidden) for g in (d_hidden, d_weight, d_bias))


def _fake_gradients(hidden, weight, bias, needs) -> Tensors3:
    """Gradients shaped and typed like their inputs (empty where not needed)."""
    like = (hidden, weight, bias)
    return tuple(torch.empty_like(t) if need and t is not None else _empty(hidden) for t, need in zip(like, needs))


def _needs(hidden, weight, bias) -> List[bool]:
    """Which of hidden, weight, bias need a gradient (decided where requires_grad is known)."""
    enabled = torch.is_grad_enabled()
    return [enabled and t is not None and t.requires_grad for t in (hidden, weight, bias)]


def _linear_token_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, chunk_bytes, impl = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[2])
    ctx.settings = (temperature, ignore_index, chunk_bytes, impl)
    ctx.mark_non_differentiable(output[2])


@first_order_only
def _linear_token_logprobs_backward(ctx, grad_logp, grad_entropy, _grad_rows):
    saved = ctx.saved_tensors  # hidden, weight, bias, targets, rows: the backward operator's first arguments
    targets = saved[3]
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 8
    temperature, ignore_index, chunk_bytes, impl = ctx.settings
    grad_logp, grad_entropy = _zeros_if_none(grad_logp, targets), _zeros_if_none(grad_entropy, targets)
    grads = _linear_token_logprobs_backward_op(
        *saved, grad_logp, grad_entropy, temperature, ignore_index, needs, chunk_bytes, impl
    )
    return (*(_or_none(g) if need else None for g, need in zip(grads, needs)),) + (None,) * 5


_linear_token_logprobs_op.register_autograd(_linear_token_logprobs_backward, setup_context=_linear_token_logprobs_setup)


def _chunk_bytes_argument(chunk_bytes: Optional[int]) -> int:
    """The chunk byte budget as an operator argument; 0 lets the chunked kernels resolve it when they run
    (``chunked.chunk_budget``: the innermost ``chunk_bytes_scope``, then the environment, then the default)."""
    return 0 if chunk_bytes is None else int(chunk_bytes)


def linear_token_logprobs(impl: str):
    """The backend-contract function of ``linear_token_logprobs`` on backend ``impl``."""

    def run(
        hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False, chunk_bytes=None
    ):
        logp, entropy, _ = _linear_token_logprobs_op(
            hidden,
            weight,
            bias,
            targets,
            float(temperature),
            int(ignore_index),
            _chunk_bytes_argument(chunk_bytes),
            impl,
        )
        return (logp, entropy) if return_entropy else logp

    return run


# --------------------------------------------------------------------------------------------
# fused_linear_calibrl_loss
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::fused_linear_calibrl_loss", mutates_args=())
def _fused_linear_calibrl_loss_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    table: torch.Tensor,
    config: str,
    ignore_index: int,
    needs: List[bool],
    chunk_bytes: int,
    impl: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    settings = CalibRLConfig.from_key(config)
    kernel = _kernel(impl, "fused_linear_calibrl_loss")
    rows, *grads = kernel(hidden, weight, bias, targets, table, settings, ignore_index, needs, chunk_bytes or None)
    return (*_loss_and_metrics(rows, settings), rows, *(_or_empty(g, hidden) for g in grads))


def forms_gradients_in_forward(impl: str) -> bool:
    """Whether backend ``impl`` forms the lm_head loss's gradients in its forward (the chunked path)."""
    return impl in ("torch", "cpp")


@_fused_linear_calibrl_loss_op.register_fake
def _(hidden, weight, bias, targets, table, config, ignore_index, needs, chunk_bytes, impl):
    dtype = compute_dtype(hidden)
    outputs = (hidden.new_empty((), dtype=dtype), hidden.new_empty(METRIC_COUNT, dtype=dtype))
    outputs += (_row_table_like(hidden, targets.numel()),)
    if not forms_gradients_in_forward(impl):
        return outputs + tuple(_empty(hidden) for _ in range(3))  # three tensors: outputs never alias
    shapes = (hidden.shape[:-1].numel(), hidden.shape[-1]), tuple(weight.shape), (weight.shape[0],)
    return outputs + tuple(
        hidden.new_empty(s, dtype=dtype) if need else _empty(hidden) for s, need in zip(shapes, needs)
    )


@torch.library.custom_op(f"{NAMESPACE}::fused_linear_calibrl_loss_backward", mutates_args=())
def _fused_linear_calibrl_loss_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_loss: torch.Tensor,
    config: str,
    ignore_index: int,
    needs: List[bool],
    impl: str,
) -> Tensors3:
    kernel = _kernel(impl, "fused_linear_calibrl_loss_backward")
    grads = kernel(hidden, weight, bias, targets, rows, grad_loss, CalibRLConfig.from_key(config), ignore_index, needs)
    return _gradient_outputs(grads, hidden)


@_fused_linear_calibrl_loss_backward_op.register_fake
def _(hidden, weight, bias, targets, rows, grad_loss, config, ignore_index, needs, impl):
    return _fake_gradients(hidden, weight, bias, needs)


def _fused_linear_calibrl_loss_setup(ctx, inputs, output):
    hidden, weight, bias, targets, table, config, ignore_index, needs, chunk_bytes, impl = inputs
    formed = output[3:]
    ctx.save_for_backward(hidden, weight, bias, targets, output[2], *formed)
    ctx.settings = (config, ignore_index, list(needs), impl)
    ctx.handed_over = False
    ctx.mark_non_differentiable(*output[1:])


def _finish_gradient(accumulator: torch.Tensor, scale: torch.Tensor, like: torch.Tensor, in_place: bool):
    """A gradient formed in the forward times the incoming gradient, cast once to its input's dtype."""
    if in_place:  # eager: the accumulator is handed over (no copy of a (V, D) buffer)
        if bool(scale != 1):
            accumulator.mul_(scale.to(accumulator.dtype))
        return accumulator.to(like.dtype)
    return (accumulator * scale.to(accumulator.dtype)).to(like.dtype)


@first_order_only
def _fused_linear_calibrl_loss_backward(ctx, grad_loss, *_grad_others):
    if ctx.handed_over:  # checked first: the saved accumulators were consumed
        raise RuntimeError(
            "fused_linear_calibrl_loss: backward ran twice through the same forward; its gradients are "
            "formed in the forward and handed over (not copied) on the first backward, so run the "
            "forward again instead of retain_graph=True"
        )
    hidden, weight, bias, targets, rows, *formed = ctx.saved_tensors
    config, ignore_index, needs, impl = ctx.settings
    wanted = [bool(n) and need for n, need in zip(ctx.needs_input_grad[:3], needs)]
    if not any(wanted):
        return (None,) * 10
    if forms_gradients_in_forward(impl):
        in_place = not _traced(grad_loss)
        ctx.handed_over = in_place
        inputs = (hidden.reshape(-1, hidden.shape[-1]), weight, bias)
        grads = [
            _finish_gradient(acc, grad_loss, like, in_place) if want else None
            for acc, like, want in zip(formed, inputs, wanted)
        ]
    else:
        grads = _fused_linear_calibrl_loss_backward_op(
            hidden, weight, bias, targets, rows, grad_loss, config, ignore_index, wanted, impl
        )
        grads = [_or_none(g) if want else None for g, want in zip(grads, wanted)]
    if grads[0] is not None:
        grads[0] = grads[0].view(hidden.shape)
    return (*grads,) + (None,) * 7


_fused_linear_calibrl_loss_op.register_autograd(
    _fused_linear_calibrl_loss_backward, setup_context=_fused_linear_calibrl_loss_setup
)


def fused_linear_calibrl_loss(impl: str):
    """The backend-contract function of ``fused_linear_calibrl_loss`` on backend ``impl``."""

    def run(
        hidden, weight, targets, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG, bias=None, chunk_bytes=None
    ):
        table = coef.loss_token_table(targets, inputs, config, compute_dtype(hidden))
        outputs = _fused_linear_calibrl_loss_op(
            hidden,
            weight,
            bias,
            targets,
            table,
            config.key,
            inputs.ignore_index,
            _needs(hidden, weight, bias),
            _chunk_bytes_argument(chunk_bytes),
            impl,
        )
        return _loss_output(outputs[0], outputs[1])

    return run


# --------------------------------------------------------------------------------------------
# group_advantages (the Triton kernel)
# --------------------------------------------------------------------------------------------
GroupTensors = Tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]


@torch.library.custom_op(f"{NAMESPACE}::group_advantages", mutates_args=())
def _group_advantages_op(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: Optional[torch.Tensor],
    norm_by_std: bool,
    eps: float,
    pass_threshold: float,
    num_groups: int,
    impl: str,
) -> GroupTensors:
    kernel = _kernel(impl, "group_advantages")
    stats = kernel(
        scores, group_ids, is_expert, norm_by_std, eps, pass_threshold, None if num_groups < 0 else num_groups
    )
    return tuple(t.clone() for t in stats)  # (G,) outputs are slices of (B,) buffers: owned copies


@_group_advantages_op.register_fake
def _(scores, group_ids, is_expert, norm_by_std, eps, pass_threshold, num_groups, impl):
    G = torch.library.get_ctx().new_dynamic_size() if num_groups < 0 else num_groups
    B, dt = scores.shape[0], compute_dtype(scores)
    per_row = (scores.new_empty(B, dtype=dt), scores.new_empty(B, dtype=dt), scores.new_empty(B, dtype=torch.bool))
    per_group = tuple(scores.new_empty(G, dtype=dt) for _ in range(3)) + (scores.new_empty(G, dtype=torch.int64),)
    return per_row + per_group + (scores.new_empty(B, dtype=torch.int64), group_ids.new_empty(G))


def group_advantages(impl: str):
    """The backend-contract function of ``group_advantages`` on backend ``impl``."""

    def run(scores, group_ids, is_expert=None, norm_by_std=False, eps=1e-6, pass_threshold=0.1, num_groups=None):
        count = -1 if num_groups is None else int(num_groups)
        return GroupStats(
            *_group_advantages_op(
                scores.detach(),  # group statistics carry no gradient (advantages are constants of the loss)
                group_ids,
                is_expert,
                bool(norm_by_std),
                float(eps),
                float(pass_threshold),
                count,
                impl,
            )
        )

    return run


def backend_ops(impl: str, names) -> dict:
    """The ``OPS`` table of backend ``impl`` for the op ``names`` it implements (the ``_dispatch`` contract)."""
    makers = (token_logprobs, fused_calibrl_loss, linear_token_logprobs, fused_linear_calibrl_loss, group_advantages)
    by_name = {maker.__name__: maker for maker in makers}  # each maker is named after its op
    return {name: by_name[name](impl) for name in names}


def registered_ops() -> List[str]:
    """Every ``calibrl::`` operator this module registers (qualified names)."""
    return [
        f"{NAMESPACE}::{name}"
        for name in (
            "token_logprobs",
            "token_logprobs_backward",
            "fused_calibrl_loss",
            "fused_calibrl_loss_backward",
            "fused_calibrl_loss_backward_",
            "linear_token_logprobs",
            "linear_token_logprobs_backward",
            "fused_linear_calibrl_loss",
            "fused_linear_calibrl_loss_backward",
            "group_advantages",
        )
    ]
