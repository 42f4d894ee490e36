"""How the Triton kernels are launched: the device guard, the autotune tuners and the shared-memory bounds
of the launch configurations (``_launch.launch``, ``triton._launch``). The kernels themselves are
stand-ins here, so these checks hold on any machine; tests/_triton_compile_check.py compiles the real
ones for sm_90 and measures their shared memory."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from calibrl_kernels.triton import _launch  # noqa: E402


class _Kernel:
    """A launchable stand-in: records the grid and keywords of each launch."""

    __name__ = "_stand_in_kernel"

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda **kwargs: self.launches.append((grid, kwargs))


def test_launch_runs_under_the_guard_of_its_tensors_device(monkeypatch):
    guarded = []

    def recording_guard(device):
        guarded.append(device)
        return _launch.contextlib.nullcontext()

    monkeypatch.setattr(_launch, "device_guard", recording_guard)
    kernel = _Kernel()
    x = torch.zeros(3)
    _launch.launch(kernel, (1,), dict(x_ptr=x, y_ptr=x, n=3), dict(BLOCK=4, num_warps=1, num_stages=1), (), ())
    assert guarded == [x.device] and kernel.launches[0][1]["BLOCK"] == 4


def test_device_guard_makes_the_tensors_cuda_device_current():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entered only at launch (needs the GPU)
    assert not isinstance(_launch.device_guard(torch.device("cpu")), torch.cuda.device)
    assert not isinstance(_launch.device_guard(None), torch.cuda.device)


def test_tensors_on_several_devices_are_refused_by_name():
    with pytest.raises(
        ValueError, match=r"_stand_in_kernel: expected every tensor argument on one device.*'y_ptr': 'meta'"
    ):
        _launch.launch(_Kernel(), (1,), dict(x_ptr=torch.zeros(2), y_ptr=torch.zeros(2, device="meta")), {}, (), ())


def test_one_tuner_per_candidate_list(monkeypatch):
    """The autotune candidates depend on the dtype: a tuner built for bf16 calls must not serve fp32."""
    built = []

    def fake_autotune(configs, key):
        def wrap(kernel):
            built.append([c.kwargs for c in configs])
            return kernel

        return wrap

    monkeypatch.setattr(_launch, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_launch.triton, "autotune", fake_autotune)
    monkeypatch.setattr(_launch, "_AUTOTUNED", {})
    kernel = _Kernel()
    narrow = _launch.linear_autotune_configs(torch.bfloat16)
    wide = _launch.linear_autotune_configs(torch.float32)
    x = torch.zeros(1)
    for candidates in (narrow, wide, narrow):
        _launch.launch(kernel, (1,), dict(x_ptr=x), {}, candidates, ["N"])
    strip = lambda configs: [{k: v for k, v in c.items() if k not in ("num_warps", "num_stages")} for c in configs]
    assert built == [strip(narrow), strip(wide)]  # the third launch reuses the first tuner
    assert len(kernel.launches) == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_autotune_candidates_fit_sm90_shared_memory(dtype):
    candidates = _launch.linear_autotune_configs(dtype)
    size = dtype.itemsize
    for c in candidates:
        need = _launch.dot_shared_memory(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_stages"], size)
        assert need <= _launch.SM90_SHARED_MEMORY_BYTES, c
    # the bf16 / fp16 grid loses exactly its 4 candidates over 227 KiB (128 x 128 x 128 at 4 stages: 256 KiB;
    # 128 x 256 x 128 at 3 stages: 288 KiB, twice, and at 4: 384 KiB); the fp32 grid (32-deep steps) fits whole
    assert len(candidates) == (20 if size == 2 else 12)


def test_default_tiles_drop_stages_where_a_device_has_less_shared_memory(monkeypatch):
    monkeypatch.setattr(_launch, "interpreting", lambda: False)  # the GPU configurations
    on_sm90 = _launch.gemm_tile_launch(torch.bfloat16, accumulate=False)
    assert on_sm90.num_stages == 3  # 3 x (128 + 256) x 64 x 2 B = 144 KiB
    small = _launch.gemm_tile_launch(torch.bfloat16, accumulate=False, shared_limit=99 * 1024)
    assert small.num_stages == 2 and (small.block_m, small.block_n, small.block_k) == (128, 256, 64)
    assert _launch.linear_tile_launch(torch.bfloat16, shared_limit=99 * 1024).num_stages == 3  # 96 KiB fits
    assert len(_launch.linear_autotune_configs(torch.bfloat16, shared_limit=99 * 1024)) < 20


def test_off_a_gpu_the_limit_is_sm90s():
    assert _launch.shared_memory_limit(torch.device("cpu")) == _launch.SM90_SHARED_MEMORY_BYTES
    assert _launch.shared_memory_limit(None) == _launch.SM90_SHARED_MEMORY_BYTES


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    import calibrl_kernels as ck
    from calibrl_kernels import reference

    torch.cuda.set_device(0)
    logits = torch.randn(5, 300, device="cuda:1", requires_grad=True)
    targets = torch.randint(0, 300, (5,), device="cuda:1")
    lp = ck.token_logprobs(logits, targets)
    lp.sum().backward()
    x = logits.detach().cpu().double().requires_grad_(True)
    ref = reference.token_logprobs(x, targets.cpu())
    ref.sum().backward()
    torch.testing.assert_close(lp.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.cpu().double(), x.grad, rtol=1e-5, atol=1e-5)
    hidden = torch.randn(6, 32, device="cuda:1", dtype=torch.bfloat16)
    weight = torch.randn(300, 32, device="cuda:1", dtype=torch.bfloat16)
    out = ck.linear_token_logprobs(hidden, weight, torch.randint(0, 300, (6,), device="cuda:1"))
    assert out.device == torch.device("cuda:1") and torch.isfinite(out).all()
