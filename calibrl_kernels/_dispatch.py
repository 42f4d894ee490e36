"""Choose the implementation of an op per call.

Backends: ``triton`` (CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1``), ``cpp`` (the
C++/OpenMP CPU kernels of ``cpu/csrc/``) and ``torch`` (the reference, always available).
Default: triton for CUDA tensors, cpp for CPU tensors, torch where neither applies or a backend does
not implement the op. ``CALIBRL_IMPL=triton|cpp|torch`` forces a backend for the ops it implements;
forcing one that cannot run on the tensors' device raises ``RuntimeError`` saying why.

A backend is a module exposing ``OPS`` (op name -> function with the reference's positional
signature) and ``availability(device) -> (bool, reason)``. Modules are imported on first use only.

Inside a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``, ...) the fused kernels cannot run:
they read raw memory and compute closed-form gradients that functorch cannot trace or batch. There every
op runs the reference (``calibrl_kernels.reference``, plain torch ops, which functorch handles); a backend
forced with ``CALIBRL_IMPL`` is refused with a RuntimeError naming the op and that alternative.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch

IMPLS = ("triton", "cpp", "torch")

# Backend name -> module path; a backend whose module is absent is simply unavailable.
_BACKEND_MODULES: Dict[str, str] = {
    "triton": "calibrl_kernels.triton",
    "cpp": "calibrl_kernels.cpu",
    "torch": "calibrl_kernels._torch_backend",
}
_loaded: Dict[str, object] = {}


def requested_impl() -> Optional[str]:
    """The backend forced by CALIBRL_IMPL, or None."""
    value = os.environ.get("CALIBRL_IMPL", "").strip().lower()
    if not value:
        return None
    if value not in IMPLS:
        raise ValueError(f"CALIBRL_IMPL: expected one of {IMPLS}, got {value!r}")
    return value


def _backend(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError as error:  # the backend's module or its dependency (e.g. triton) is missing
            _loaded[name] = error
    return _loaded[name]


def availability(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and if not, why."""
    module = _backend(name)
    if isinstance(module, ImportError):
        return False, f"its module could not be imported ({module})"
    return module.availability(torch.device(device))


def functorch_transform_active() -> bool:
    """Whether the caller runs inside a torch.func transform (grad, vjp, jacrev, vmap, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _reference_op(op: str) -> Callable:
    from . import reference

    return getattr(reference, op)


def implementation(op: str, device: torch.device, impl: Optional[str] = None) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` (``impl`` or CALIBRL_IMPL forces one)."""
    device = torch.device(device)
    forced = impl or requested_impl()
    if functorch_transform_active():
        if forced is not None and forced != "torch":
            raise RuntimeError(
                f"calibrl_kernels.{op}: backend {forced!r} was requested (CALIBRL_IMPL / impl) but cannot run inside a "
                "torch.func transform (grad, vjp, jacrev, vmap): its kernels compute closed-form gradients that "
                "functorch can neither trace nor batch. Unset CALIBRL_IMPL (the ops then run the reference under "
                f"torch.func), call calibrl_kernels.reference.{op}, or use torch.autograd.grad outside torch.func"
            )
        return _reference_op(op)
    if forced is not None:
        if forced not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {forced!r}")
        ok, reason = availability(forced, device)
        if not ok:
            raise RuntimeError(f"calibrl_kernels: backend {forced!r} was requested but cannot run on {device}: {reason}")
        ops = _backend(forced).OPS
        if op in ops:
            return ops[op]
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in order:
        ok, _ = availability(name, device)
        if ok and op in _backend(name).OPS:
            return _backend(name).OPS[op]
    raise RuntimeError(f"calibrl_kernels: no backend implements {op!r} on {device}")


def selected_impl(op: str, device: torch.device, impl: Optional[str] = None) -> str:
    """The name of the backend ``implementation`` would pick (for logs and benchmarks)."""
    fn = implementation(op, device, impl)
    for name in IMPLS:
        module = _backend(name)
        if not isinstance(module, ImportError) and module.OPS.get(op) is fn:
            return name
    return "unknown"
