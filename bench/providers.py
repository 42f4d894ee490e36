"""Who competes in a benchmark: calibrl's backends (found through ``calibrl_kernels._dispatch``),
eager PyTorch, torch.compile of eager, Liger-Kernel, and the roofline.

calibrl providers are discovered, never listed by hand, so a backend that lands later is benchmarked
without a change here:
- ``calibrl``: what the public op runs by default on the device (``_dispatch``'s own choice);
- ``calibrl-<impl>``: every other backend whose ``_dispatch.availability(impl, device)`` is true and
  that implements the op, forced through ``CALIBRL_IMPL=<impl>`` for the duration of its measurement.
  Triton under its CPU interpreter is left out unless asked for (it measures the interpreter).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from calibrl_kernels import _dispatch

CALIBRL = "calibrl"
EAGER = "eager"
COMPILED = "compiled"
LIGER = "liger"
ROOFLINE = "roofline"
BASELINES = (EAGER, COMPILED, LIGER)


@dataclass(frozen=True)
class Provider:
    name: str  # the CSV's provider column
    impl: Optional[str] = None  # calibrl backend forced through CALIBRL_IMPL (None: dispatch default)
    resolved: Optional[str] = None  # calibrl backend that actually runs (for logs and the README table)

    @property
    def is_calibrl(self) -> bool:
        return self.name == CALIBRL or self.name.startswith(CALIBRL + "-")


@contextlib.contextmanager
def forced_impl(impl: Optional[str]) -> Iterator[None]:
    """Set CALIBRL_IMPL to ``impl`` (or unset it for the dispatch default) inside the block."""
    previous = os.environ.get("CALIBRL_IMPL")
    if impl is None:
        os.environ.pop("CALIBRL_IMPL", None)
    else:
        os.environ["CALIBRL_IMPL"] = impl
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("CALIBRL_IMPL", None)
        else:
            os.environ["CALIBRL_IMPL"] = previous


def interpreting(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def calibrl_providers(
    op: str, device: torch.device, *, all_impls: bool = False, allow_interpreter: bool = False,
    exclude: Tuple[str, ...] = (),
) -> Tuple[List[Provider], List[Tuple[str, str]]]:
    """calibrl providers for ``op`` on ``device`` and, for each backend left out, (name, reason).

    ``all_impls`` also adds ``calibrl-<impl>`` for the backend the default already runs and for the
    backends in ``exclude`` (which a suite leaves out to save time).
    """
    device = torch.device(device)
    skipped: List[Tuple[str, str]] = []
    with forced_impl(None):
        default = _dispatch.selected_impl(op, device)
    providers = [Provider(CALIBRL, None, default)]
    for impl in _dispatch.IMPLS:
        name = f"{CALIBRL}-{impl}"
        ok, reason = _dispatch.availability(impl, device)
        if not ok:
            skipped.append((name, f"backend unavailable on {device.type}: {reason}"))
            continue
        if impl == "triton" and device.type == "cpu" and not allow_interpreter:
            skipped.append((name, "Triton on CPU runs in its interpreter (a correctness tool, not a benchmark)"))
            continue
        if impl == default and not all_impls:
            continue  # the 'calibrl' provider measures it
        if impl in exclude and not all_impls:
            skipped.append((name, "left out by the suite (--all-impls adds it)"))
            continue
        with forced_impl(impl):
            resolved = _dispatch.selected_impl(op, device, impl)
        if resolved != impl:
            skipped.append((name, f"backend {impl!r} does not implement {op!r}"))
            continue
        providers.append(Provider(name, impl, impl))
    return providers, skipped


def provider_from_name(name: str, op: str, device: torch.device) -> Provider:
    """Rebuild a provider from its CSV name (used by isolated child processes)."""
    if name == CALIBRL:
        with forced_impl(None):
            return Provider(CALIBRL, None, _dispatch.selected_impl(op, device))
    if name.startswith(CALIBRL + "-"):
        impl = name[len(CALIBRL) + 1:]
        if impl not in _dispatch.IMPLS:
            raise ValueError(f"provider: expected calibrl-<impl> with impl in {_dispatch.IMPLS}, got {name!r}")
        return Provider(name, impl, impl)
    if name in BASELINES:
        return Provider(name)
    raise ValueError(f"provider: expected calibrl, calibrl-<impl>, {', '.join(BASELINES)}; got {name!r}")


def liger_available() -> Tuple[bool, str]:
    try:
        import liger_kernel  # noqa: F401
    except Exception as error:  # ImportError, or triton trouble inside it
        return False, f"liger-kernel is not importable ({type(error).__name__}: {error})"
    return True, ""
