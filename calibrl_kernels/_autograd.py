"""Autograd helpers shared by the custom ``torch.autograd.Function`` s of the fused ops.

The fused ops compute their gradients in closed form (kernels or torch ops under no_grad): those
gradients are correct to first order only. Differentiating them again (``create_graph=True``, e.g. a
gradient penalty) must fail loudly instead of silently dropping the second-order terms.

``torch.autograd.function.once_differentiable`` alone does not ensure that: it marks the gradients
only when an incoming gradient requires grad, but ``torch.autograd.grad(out.sum(), x,
create_graph=True)`` passes a constant incoming gradient, and the closed-form gradient still depends
on the saved inputs (x). ``first_order_only`` marks the gradients whenever the graph of the backward
is recorded. The marking node is attached to the op's inputs when the Function saved them (not
detached) with ``ctx.save_for_backward``: then differentiating the gradients towards those inputs
(``torch.autograd.grad(penalty, x)``, x any tensor upstream of the op) reaches it and raises; without
saved inputs the node hangs off detached aliases, and such a call fails with torch's "not used in the
graph" error instead (or returns None under allow_unused=True).
"""

from __future__ import annotations

import functools

import torch

SECOND_ORDER_MESSAGE = (
    "calibrl_kernels: {name} computes its gradient in closed form and supports first-order gradients only; "
    "it cannot be differentiated twice (create_graph=True through it). Use the reference ops "
    "(calibrl_kernels.reference) for higher-order gradients."
)


class _SecondOrderError(torch.autograd.Function):
    """Identity on the first ``count`` tensors (first-order gradients) whose own backward raises (they
    carry no second-order graph). Further tensors (the op's inputs) only anchor the node in their graph."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(ctx.message)


def first_order_only(backward):
    """Decorate the ``backward`` staticmethod of a custom Function: the backward runs without recording
    a graph (as under once_differentiable), and under create_graph=True every returned gradient raises
    when it is differentiated again (see the module docstring for the saved inputs that anchor it)."""
    name = backward.__qualname__.rsplit(".", 1)[0].lstrip("_")

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return backward(ctx, *grad_outputs)
        # Taken before the backward runs: an in-place backward bumps its inputs' version counter.
        anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        single = not isinstance(grads, tuple)
        grads = (grads,) if single else tuple(grads)
        positions = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
        if not positions:
            return grads[0] if single else grads
        if anchors:
            tensors = [grads[i] for i in positions] + anchors
        else:  # detached aliases that require grad, so that the marking node is recorded at all
            tensors = [grads[i].detach().requires_grad_(True) for i in positions]
        marked = _SecondOrderError.apply(SECOND_ORDER_MESSAGE.format(name=name), len(positions), *tensors)
        result = list(grads)
        for i, g in zip(positions, marked):
            result[i] = g
        return result[0] if single else tuple(result)

    return wrapper


def can_overwrite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` has a memory location of its own, so that a kernel may write each
    element's gradient over it (``inplace_backward=True``).

    False for views whose elements share memory: expanded (stride 0) tensors, ``as_strided`` windows that
    overlap. Writing gradients over those would sum several elements' gradients into one location (and
    overwrite the tensor they were expanded from); the fused ops then use a fresh gradient buffer instead.
    Non-contiguous views without overlap (slices, transposes) are fine: the kernels follow their strides.
    The test is exact for the usual layouts and conservative otherwise: sorted by stride, each dimension
    must step past everything the smaller dimensions span.
    """
    span = 0  # largest offset reachable with the dimensions seen so far
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return False
        span += stride * (size - 1)
    return True
