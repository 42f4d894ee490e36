"""The triton-interpreter fix for NumPy >= 2.4 (``calibrl_kernels._interpreter_compat``).

The interpreter's per-launch patching is replaced here by stand-ins that behave like triton 3.6's
(``int(handle.data)``) and 3.9's (squeezes first); the real triton 3.6 + NumPy >= 2.4 combination runs
the whole Triton test suite in CI's own environment (``.ci/triton36_env.sh``).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

from calibrl_kernels.triton import _interpreter_compat  # noqa: E402

NUMPY_REFUSES_ONE_ELEMENT_ARRAYS = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)


def _like_triton_3_6(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _like_triton_3_9(tensor, scope):
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


def _scalar(value):
    """What the interpreter hands ``__index__``: a tensor whose data is a (1,)-shaped array."""
    return types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([value], dtype=np.int32)))


@pytest.mark.skipif(not NUMPY_REFUSES_ONE_ELEMENT_ARRAYS, reason="NumPy < 2.4 converts (1,) arrays itself")
def test_old_conversion_is_detected_and_fixed(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _like_triton_3_6)
    assert _interpreter_compat.needs_fix()
    assert _interpreter_compat.install()
    assert not _interpreter_compat.install(), "installing twice must not wrap twice"
    tensor_type = type("Tensor", (), {})
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(tensor_type, scope)
    assert list(range(0, tensor_type.__index__(_scalar(40)), 16)) == [0, 16, 32]
    scope.restore()
    assert not hasattr(tensor_type, "__index__"), "the launch's patches are undone after it"


def test_conversion_that_already_works_is_left_alone(monkeypatch):
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _like_triton_3_9)
    assert not _interpreter_compat.needs_fix()
    assert not _interpreter_compat.install()
    assert interpreter._patch_lang_tensor is _like_triton_3_9


def test_unknown_interpreter_layout_is_left_alone(monkeypatch):
    monkeypatch.delattr(interpreter, "_patch_lang_tensor")
    assert not _interpreter_compat.needs_fix() and not _interpreter_compat.install()


def test_fix_state_of_this_process_matches_the_running_triton():
    """Kernels built for the interpreter have the fix exactly when this triton needs it (triton 3.6 with
    NumPy >= 2.4 does, 3.9 does not); compiled kernels never touch the interpreter."""
    from calibrl_kernels.triton import _launch

    if not _launch.BUILT_FOR_INTERPRETER:
        assert not _launch.INTERPRETER_INDEX_FIXED
    else:
        assert not _interpreter_compat.needs_fix(), "after the kernels' import the interpreter converts scalars"
