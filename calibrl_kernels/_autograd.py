"""Autograd helpers shared by the custom ``torch.autograd.Function`` s of the fused ops.

The fused ops compute their gradients in closed form (kernels or torch ops under no_grad): those
gradients are correct to first order only. Differentiating them again (``create_graph=True``, e.g. a
gradient penalty) must fail loudly instead of silently dropping the second-order terms.

``torch.autograd.function.once_differentiable`` alone does not ensure that: it marks the gradients
only when an incoming gradient requires grad, but ``torch.autograd.grad(out.sum(), x,
create_graph=True)`` passes a constant incoming gradient, and the closed-form gradient still depends
on the saved inputs (x). ``first_order_only`` adds that case.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

SECOND_ORDER_MESSAGE = (
    "calibrl_kernels: {name} computes its gradient in closed form and supports first-order gradients only; "
    "it cannot be differentiated twice (create_graph=True through it). Use the reference ops "
    "(calibrl_kernels.reference) for higher-order gradients."
)


class _SecondOrderError(torch.autograd.Function):
    """Identity on the first-order gradients whose own backward raises (they carry no second-order graph)."""

    @staticmethod
    def forward(ctx, message, *grads):
        ctx.message = message
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(ctx.message)


def first_order_only(backward):
    """Decorate the ``backward`` staticmethod of a custom Function: once_differentiable, and under
    create_graph=True every returned gradient raises when it is differentiated again."""
    backward_once = once_differentiable(backward)
    name = backward.__qualname__.rsplit(".", 1)[0].lstrip("_")

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        grads = backward_once(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return grads
        single = not isinstance(grads, tuple)
        grads = (grads,) if single else tuple(grads)
        positions = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
        if not positions or any(grads[i].requires_grad for i in positions):
            return grads[0] if single else grads  # none, or once_differentiable already marked them
        marked = _SecondOrderError.apply(
            SECOND_ORDER_MESSAGE.format(name=name), *(grads[i].detach().requires_grad_(True) for i in positions)
        )
        result = list(grads)
        for i, g in zip(positions, marked):
            result[i] = g
        return result[0] if single else tuple(result)

    return wrapper
