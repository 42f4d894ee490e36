"""Triton interpreter fix for NumPy >= 2.4 on older triton releases (3.6 among them).

Under ``TRITON_INTERPRET=1`` every scalar of a kernel (a runtime argument such as V, a ``tl.load`` of one
element, a reduction) is a NumPy array of shape (1,), and a scalar used as a loop bound
(``for start in range(0, V, BLOCK)``) is turned into a Python int through ``tensor.__index__``. Triton 3.6's
interpreter defines it as ``int(self.handle.data)``, which NumPy >= 2.4 refuses for arrays that are not
0-dimensional ("only 0-dimensional arrays can be converted to Python scalars"): there, no kernel with a
runtime loop bound runs at all. Later triton releases squeeze the array first (3.9 does).

``install()`` checks by behaviour whether the running triton has the old conversion (it never looks at
version numbers) and, only then, wraps the interpreter's per-launch patching so that ``__index__`` converts
the array's single element, as the later releases do. Nothing changes on a GPU (compiled kernels never
reach this code) or with a triton that already converts correctly.
"""

from __future__ import annotations

import types

import numpy as np

_MARK = "_calibrl_numpy_index_fix"


def _single_element_index(self) -> int:
    """tensor.__index__ for the interpreter: the one element of a scalar's (1,)-shaped array."""
    return int(self.handle.data.reshape(-1)[0]) if self.handle.data.size == 1 else int(self.handle.data)


def _converts_one_element_arrays(patch_lang_tensor, scope_type) -> bool:
    """Whether the interpreter's own ``__index__`` accepts a (1,)-shaped scalar (True: no fix needed)."""
    probe_type = type("Probe", (), {})
    scope = scope_type()
    patch_lang_tensor(probe_type, scope)
    try:
        scalar = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.zeros(1, dtype=np.int32)))
        return probe_type.__index__(scalar) == 0
    except TypeError:
        return False
    finally:
        scope.restore()


def needs_fix() -> bool:
    """Whether this process's triton interpreter fails on scalar loop bounds (False when it cannot tell)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope_type is None or getattr(patch, _MARK, False):
        return False
    try:
        return not _converts_one_element_arrays(patch, scope_type)
    except Exception:  # an interpreter layout this module does not know: leave it alone
        return False


def install() -> bool:
    """Apply the fix when the running triton needs it; returns whether it was applied (idempotent)."""
    if not needs_fix():
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _single_element_index)  # restored with the rest after the launch

    setattr(patch_lang_tensor, _MARK, True)
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
