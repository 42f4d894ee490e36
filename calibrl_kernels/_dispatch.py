"""Choose the implementation of an op per call: every backend choice and every fallback happens here.

Backends: ``triton`` (CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1``), ``cpp`` (the C++/OpenMP
CPU kernels of ``cpu/csrc/``) and ``torch`` (the reference, plus the chunked lm_head path; always available).
Default: triton for CUDA tensors, cpp for CPU tensors, torch where neither applies or a backend does not
implement the op. ``CALIBRL_IMPL=triton|cpp|torch`` forces a backend for the ops it implements; forcing one
that cannot run on the tensors' device raises ``RuntimeError`` saying why.

Fallbacks, all decided here:
- float64 inputs run the torch backend (the Triton kernels compute in fp32, which float64 callers such as
  gradcheck would not expect); the C++ kernels compute in the input's precision and keep float64.
- A C++ build that failed makes ``cpp`` unavailable (``calibrl_kernels.cpu.availability``): torch runs
  instead after one warning, or, with ``CALIBRL_IMPL=cpp``, every call raises naming the build error.
- Triton on CPU tensors needs the interpreter (``calibrl_kernels.triton.availability``).
- Inside a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``, ...) every op runs the reference
  (plain torch ops, which functorch handles): the fused kernels read raw memory and compute closed-form
  gradients that functorch cannot trace or batch; a backend forced with ``CALIBRL_IMPL`` is refused there.

Backend contract (tensors and scalars only, so each entry maps onto a ``torch.library`` schema):
``token_logprobs(logits, targets, temperature, ignore_index, return_entropy)``,
``linear_token_logprobs(hidden, weight, targets, bias, temperature, ignore_index, return_entropy, chunk_bytes)``,
``group_advantages(scores, group_ids, is_expert, norm_by_std, eps, pass_threshold, num_groups)``,
``fused_calibrl_loss(logits, targets, inputs: LossInputs, config, inplace_backward)``,
``fused_linear_calibrl_loss(hidden, weight, targets, inputs: LossInputs, config, bias, chunk_bytes)``.
A backend module exposes ``OPS`` (op name -> function), ``KERNELS`` (what its ``calibrl::`` operators call,
see ``calibrl_kernels.library``) and ``availability(device) -> (bool, reason)``; the triton and cpp modules
are imported on first use only. Under ``torch.compile`` the choice is made once per traced call site,
outside the graph (``_choose_while_compiling``).
"""

from __future__ import annotations

import importlib
import os
import types
from typing import Callable, Dict, Optional, Tuple

import torch

from . import library, reference
from .config import DEFAULT_CONFIG, CalibRLConfig, LossInputs, LossOutput

IMPLS = ("triton", "cpp", "torch")
# Ops whose Triton kernels compute in fp32: float64 inputs run the torch backend instead.
_FP32_KERNEL_OPS = ("token_logprobs", "linear_token_logprobs", "fused_calibrl_loss", "fused_linear_calibrl_loss")


def _reference_fused_calibrl_loss(
    logits, targets, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG, inplace_backward: bool = False
) -> LossOutput:
    """The reference under the backend contract (it never writes over the logits: inplace is a no-op)."""
    return reference.fused_calibrl_loss(
        logits, targets, inputs.old_logp, inputs.advantages, inputs.mask, config=config, **inputs.fields()
    )


def _reference_fused_linear_calibrl_loss(
    hidden, weight, targets, inputs: LossInputs, config: CalibRLConfig = DEFAULT_CONFIG, bias=None, chunk_bytes=None
) -> LossOutput:
    """The reference of the lm_head loss under the backend contract (materialises the logits; no chunks)."""
    return _reference_fused_calibrl_loss(reference.linear_logits(hidden, weight, bias), targets, inputs, config)


# Under torch.func: the reference of every op (plain torch ops, autograd gradients).
_REFERENCE_OPS = {
    "token_logprobs": reference.token_logprobs,
    "linear_token_logprobs": lambda *args, chunk_bytes=None: reference.linear_token_logprobs(*args),
    "group_advantages": reference.group_advantages,
    "fused_calibrl_loss": _reference_fused_calibrl_loss,
    "fused_linear_calibrl_loss": _reference_fused_linear_calibrl_loss,
}
# The torch backend: the reference (plain torch ops, which torch.compile traces itself), except for the lm_head
# ops, which run the chunked path (torch row math, any device) through their calibrl:: operators and never
# materialise the (N, V) logits: built like the other backends' OPS (library.KERNEL_MODULES["torch"]).
_TORCH = types.SimpleNamespace(
    OPS={
        "token_logprobs": reference.token_logprobs,
        "group_advantages": reference.group_advantages,
        "fused_calibrl_loss": _reference_fused_calibrl_loss,
        **library.backend_ops("torch", ("linear_token_logprobs", "fused_linear_calibrl_loss")),
    },
    availability=lambda device: (True, ""),
)
# Backend name -> module path; a backend whose module cannot be imported is unavailable.
_BACKEND_MODULES: Dict[str, str] = {"triton": "calibrl_kernels.triton", "cpp": "calibrl_kernels.cpu"}
_loaded: Dict[str, object] = {"torch": _TORCH}


def requested_impl() -> Optional[str]:
    """The backend forced by CALIBRL_IMPL, or None."""
    value = os.environ.get("CALIBRL_IMPL", "").strip().lower()
    if not value:
        return None
    if value not in IMPLS:
        raise ValueError(f"CALIBRL_IMPL: expected one of {IMPLS}, got {value!r}")
    return value


def backend_module(name: str):
    """The module of backend ``name`` (imported on first use), or the ImportError that prevented it."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError as error:  # the backend's module or its dependency (e.g. triton) is missing
            _loaded[name] = error
    return _loaded[name]


def availability(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and if not, why."""
    module = backend_module(name)
    if isinstance(module, ImportError):
        return False, f"its module could not be imported ({module})"
    return module.availability(torch.device(device))


def functorch_transform_active() -> bool:
    """Whether the caller runs inside a torch.func transform (grad, vjp, jacrev, vmap, ...)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _choose(op: str, device: torch.device, forced: Optional[str], dtype: Optional[torch.dtype]) -> str:
    """The name of the backend that runs ``op`` (see the module docstring for the rules)."""
    if functorch_transform_active():
        if forced is not None and forced != "torch":
            raise RuntimeError(
                f"calibrl_kernels.{op}: backend {forced!r} was requested (CALIBRL_IMPL / impl) but cannot run inside a "
                "torch.func transform (grad, vjp, jacrev, vmap): its kernels compute closed-form gradients that "
                "functorch can neither trace nor batch. Unset CALIBRL_IMPL (the ops then run the reference under "
                f"torch.func), call calibrl_kernels.reference.{op}, or use torch.autograd.grad outside torch.func"
            )
        return "reference"
    if forced is not None:
        if forced not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {forced!r}")
        ok, reason = availability(forced, device)
        if not ok:
            raise RuntimeError(
                f"calibrl_kernels: backend {forced!r} was requested but cannot run on {device}: {reason}"
            )
        order = (forced, "torch")
    else:
        order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in order:
        module = backend_module(name)
        if isinstance(module, ImportError) or op not in module.OPS:  # checked first: no build for other ops
            continue
        if name == "triton" and dtype == torch.float64 and op in _FP32_KERNEL_OPS:
            continue
        if name == forced or availability(name, device)[0]:
            return name
    raise RuntimeError(f"calibrl_kernels: no backend implements {op!r} on {device}")


def _choose_while_compiling(op: str, device: torch.device, impl: Optional[str], dtype: Optional[torch.dtype]) -> str:
    """_choose, made while torch.compile traces: its result is a constant of the graph (the environment,
    the C++ build and the imports are looked at once, outside the graph). No torch.func transform runs
    inside a compiled region, so the reference rule does not apply here."""
    name = _choose(op, device, impl or requested_impl(), dtype)
    backend_module(name)  # imported now, so that the traced lookup below is a plain attribute access
    return name


# What ``torch.compiler.assume_constant_result`` does (it only sets this attribute; a test checks that it
# still does), without importing torch._dynamo, and with it triton, when calibrl_kernels is imported.
_choose_while_compiling._dynamo_marked_constant = True


def implementation(
    op: str, device: torch.device, impl: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` of ``dtype`` (the op's main input; None
    for no dtype rule); ``impl`` or CALIBRL_IMPL forces a backend."""
    if torch.compiler.is_compiling():
        name = _choose_while_compiling(op, torch.device(device), impl, dtype)
    else:
        name = _choose(op, torch.device(device), impl or requested_impl(), dtype)
    if name == "reference":
        return _REFERENCE_OPS[op]
    return _loaded[name].OPS[op]


def selected_impl(
    op: str, device: torch.device, impl: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> str:
    """The name of the backend ``implementation`` would pick (for logs and benchmarks)."""
    name = _choose(op, torch.device(device), impl or requested_impl(), dtype)
    return "torch" if name == "reference" else name
