"""Triton token_logprobs (log-prob + entropy, forward and backward) against the torch reference.

Runs on CPU under TRITON_INTERPRET=1 (conftest) or natively on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _triton_helpers import assert_close_rel, assert_no_worse_than_reference

import calibrl_kernels as ck
from calibrl_kernels import _dispatch, reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),  # numpy, interpreter only
    pytest.mark.usefixtures("force_triton"),
]

pytest.importorskip("triton")
from calibrl_kernels import triton as backend  # noqa: E402  (after the triton check)


def _case(n, v, dtype, device, seed=0, ignore_every=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore_every:
        targets[::ignore_every] = -100
    # upstream gradients of logp and entropy
    w_lp = torch.randn(n, generator=g).to(device)
    w_h = torch.randn(n, generator=g).to(device)
    return logits, targets, w_lp, w_h


def _run(fn_logits, targets, w_lp, w_h, temperature, **kw):
    x = fn_logits.detach().clone().requires_grad_(True)
    lp, h = kw.pop("fn")(x, targets, temperature=temperature, return_entropy=True, **kw)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()
    return lp.detach(), h.detach(), x.grad


def _reference(logits, targets, w_lp, w_h, temperature, dtype=None):
    x = logits.detach().clone()
    if dtype is not None:
        x = x.to(dtype)
    return _run(
        x,
        targets,
        w_lp.to(x.dtype if x.dtype == torch.float64 else torch.float32),
        w_h.to(x.dtype if x.dtype == torch.float64 else torch.float32),
        temperature,
        fn=lambda *a, **k: reference.token_logprobs(a[0], a[1], k["temperature"], -100, True),
    )


SHAPES = [(n, v) for v in (1, 7, 1000) for n in (1, 5, 64)] + [(1, 32003), (5, 32003)]


@pytest.mark.parametrize("n, v", SHAPES)
def test_fp32_values_and_grads_match_fp64_reference(n, v, triton_device):
    logits, targets, w_lp, w_h = _case(
        n, v, torch.float32, triton_device, seed=n * 7 + v, ignore_every=3 if n > 1 else 0
    )
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32 and grad.dtype == torch.float32
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, 1.0, dtype=torch.float64)
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(h, h64, 1e-5, "entropy")
    assert_close_rel(grad, grad64, 1e-5, "dlogits")
    # ignored targets: logp = entropy = 0 and no gradient
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0) and torch.all(h[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("n, v", [(5, 1000), (1, 7)])
def test_temperature(n, v, temperature, triton_device):
    logits, targets, w_lp, w_h = _case(n, v, torch.float32, triton_device, seed=11)
    lp, h, grad = _run(logits, targets, w_lp, w_h, temperature, fn=ck.token_logprobs)
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, temperature, dtype=torch.float64)
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(h, h64, 1e-5, "entropy")
    assert_close_rel(grad, grad64, 1e-5, "dlogits")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("n, v", [(64, 1000), (5, 32003), (1, 7)])
def test_bf16_error_no_worse_than_twice_the_reference(n, v, temperature, triton_device):
    logits, targets, w_lp, w_h = _case(n, v, torch.bfloat16, triton_device, seed=5, ignore_every=4)
    lp, h, grad = _run(logits, targets, w_lp, w_h, temperature, fn=ck.token_logprobs)
    assert grad.dtype == torch.bfloat16
    lp_ref, h_ref, grad_ref = _reference(logits, targets, w_lp, w_h, temperature)  # bf16 in, like ours
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, temperature, dtype=torch.float64)
    assert_no_worse_than_reference(lp, lp_ref, lp64, name="logp")
    assert_no_worse_than_reference(h, h_ref, h64, name="entropy")
    assert_no_worse_than_reference(grad, grad_ref, grad64, slack=1e-3, name="dlogits")


def test_fp16_logits(triton_device):
    logits, targets, w_lp, w_h = _case(5, 1000, torch.float16, triton_device, seed=9)
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    lp_ref, h_ref, grad_ref = _reference(logits, targets, w_lp, w_h, 1.0)
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, 1.0, dtype=torch.float64)
    assert grad.dtype == torch.float16
    assert_no_worse_than_reference(lp, lp_ref, lp64, name="logp")
    assert_no_worse_than_reference(grad, grad_ref, grad64, slack=1e-3, name="dlogits")


def test_all_targets_ignored(triton_device):
    logits, targets, w_lp, w_h = _case(5, 7, torch.float32, triton_device)
    targets[:] = -100
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    assert torch.all(lp == 0) and torch.all(h == 0) and torch.all(grad == 0)


def test_custom_ignore_index(triton_device):
    logits, targets, w_lp, w_h = _case(6, 7, torch.float32, triton_device)
    targets[1] = 3
    x = logits.clone().requires_grad_(True)
    lp = ck.token_logprobs(x, targets, ignore_index=3)
    lp_ref = reference.token_logprobs(logits.double(), targets, 1.0, 3)
    assert torch.all(lp[targets == 3] == 0)
    assert_close_rel(lp, lp_ref, 1e-5, "logp")


def test_negative_infinite_logits_like_reference(triton_device):
    """A masked vocabulary (-inf entries), including a -inf target and a whole tile of -inf."""
    logits, targets, w_lp, w_h = _case(4, 1000, torch.float32, triton_device, seed=3)
    logits[:, :300] = float("-inf")  # the first tiles of every row are entirely -inf
    logits[1, 500:] = float("-inf")
    targets[0] = 10  # target logit is -inf: logp = -inf, gradients stay finite
    targets[1] = 400
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, 1.0, dtype=torch.float64)
    assert lp[0] == float("-inf")
    assert torch.isfinite(grad).all() and torch.isfinite(h).all()
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(h, h64, 1e-5, "entropy")
    assert_close_rel(grad, grad64, 1e-5, "dlogits")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("v", [7, 700])
def test_nan_and_inf_logits_propagate_like_reference(v, bad, triton_device):
    """A NaN or +inf logit makes its row's logp, entropy and gradient NaN, as torch's do (it must not pass
    for an empty row); the other rows are unaffected. Row 0: in a non-target entry, row 1: the target."""
    logits, targets, w_lp, w_h = _case(5, v, torch.float32, triton_device, seed=13)
    logits[0, (targets[0] + 1) % v] = bad
    logits[1, targets[1]] = bad
    logits[4, 0] = bad
    targets[4] = -100  # an ignored row is never read: logp = entropy = 0 and no gradient, whatever it holds
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, 1.0, dtype=torch.float64)
    assert torch.isnan(lp64[:2]).all() and torch.isnan(h64[:2]).all() and torch.isnan(grad64[:2]).all()
    assert torch.isnan(lp[:2]).all() and torch.isnan(h[:2]).all() and torch.isnan(grad[:2]).all()
    assert_close_rel(lp[2:], lp64[2:], 1e-5, "logp")
    assert_close_rel(h[2:], h64[2:], 1e-5, "entropy")
    assert_close_rel(grad[2:4], grad64[2:4], 1e-5, "dlogits")
    # (torch's log_softmax backward gives NaN on the ignored row too: 0 * NaN; the kernels never read it)
    assert lp[4] == 0 and h[4] == 0 and torch.all(grad[4] == 0)


def test_double_backward_raises(triton_device):
    """The backward is not differentiable: a gradient penalty through it raises instead of silently
    dropping the second-order term."""
    logits, targets, _, _ = _case(4, 9, torch.float32, triton_device, seed=17)
    x = logits.clone().requires_grad_(True)
    lp, h = ck.token_logprobs(x, targets, return_entropy=True)
    (grad,) = torch.autograd.grad(lp.sum() + h.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="supports first-order gradients only"):
        (lp.sum() + (grad**2).sum()).backward()


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_through_one_output(which, triton_device):
    logits, targets, _, _ = _case(5, 100, torch.float32, triton_device, seed=2)
    grads = []
    for fn in (ck.token_logprobs, lambda x, y, **k: reference.token_logprobs(x, y, 1.0, -100, True)):
        x = (
            logits.double().clone().requires_grad_(True)
            if fn is not ck.token_logprobs
            else logits.clone().requires_grad_(True)
        )
        lp, h = fn(x, targets, return_entropy=True)
        (lp if which == "logp" else h).sum().backward()
        grads.append(x.grad)
    assert_close_rel(grads[0], grads[1], 1e-5, "dlogits")


def test_logp_only_output(triton_device):
    logits, targets, _, _ = _case(5, 100, torch.float32, triton_device)
    lp = ck.token_logprobs(logits, targets)
    assert isinstance(lp, torch.Tensor) and lp.shape == (5,)
    assert_close_rel(lp, reference.token_logprobs(logits.double(), targets), 1e-5, "logp")


@pytest.mark.parametrize("layout", ["row-padded", "time-major", "last-dim-strided"])
def test_strided_3d_logits(layout, triton_device):
    """(B, T, V) views with arbitrary batch/time strides are read in place; a strided last dim is copied."""
    B, T, V = 3, 4, 50
    g = torch.Generator().manual_seed(4)
    if layout == "row-padded":  # each token row sits in a longer buffer row
        base = torch.randn(B, T, V + 13, generator=g).to(triton_device)
        logits = base[:, :, 5 : 5 + V]
    elif layout == "time-major":
        logits = torch.randn(T, B, V, generator=g).to(triton_device).transpose(0, 1)
    else:
        logits = torch.randn(B, T, V, 2, generator=g).to(triton_device)[..., 0]
    targets = torch.randint(0, V, (B, T), generator=g).to(triton_device)
    targets[0, 1] = -100
    w_lp = torch.randn(B, T, generator=g).to(triton_device)
    w_h = torch.randn(B, T, generator=g).to(triton_device)
    x = logits.detach().requires_grad_(True)
    lp, h = ck.token_logprobs(x, targets, return_entropy=True, temperature=1.3)
    ((lp * w_lp).sum() + (h * w_h).sum()).backward()
    x64 = logits.detach().double().requires_grad_(True)
    lp64, h64 = reference.token_logprobs(x64, targets, 1.3, -100, True)
    ((lp64 * w_lp.double()).sum() + (h64 * w_h.double()).sum()).backward()
    assert lp.shape == (B, T)
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(h, h64, 1e-5, "entropy")
    assert_close_rel(x.grad, x64.grad, 1e-5, "dlogits")


def test_float64_logits_use_the_reference(triton_device):
    logits, targets, _, _ = _case(3, 7, torch.float64, triton_device)
    lp = ck.token_logprobs(logits, targets)
    assert lp.dtype == torch.float64
    assert torch.equal(lp, reference.token_logprobs(logits, targets))


def test_dispatch_selects_triton_when_forced(triton_device):
    assert _dispatch.selected_impl("token_logprobs", triton_device) == "triton"
    assert _dispatch.selected_impl("fused_calibrl_loss", triton_device) == "triton"
    assert _dispatch.selected_impl("group_advantages", triton_device) == "triton"


def test_forcing_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(backend, "BUILT_FOR_INTERPRETER", False)
    ok, reason = backend.availability(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET=1" in reason
    logits = torch.randn(2, 5)
    targets = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="backend 'triton' was requested but cannot run on cpu.*TRITON_INTERPRET"):
        ck.token_logprobs(logits, targets)


def test_interpreter_mode_is_the_one_the_kernels_were_built_for(monkeypatch):
    """The launch heuristics follow how the kernels were built (at import), not TRITON_INTERPRET now."""
    from calibrl_kernels.triton import _launch

    built = _launch.BUILT_FOR_INTERPRETER
    assert built == (os.environ.get("TRITON_INTERPRET") == "1")  # conftest set it before the import
    monkeypatch.setenv("TRITON_INTERPRET", "0" if built else "1")  # changed after the kernels were built
    monkeypatch.setenv("CALIBRL_AUTOTUNE", "1")
    assert _launch.interpreting() == built
    assert (_launch.row_launch(1000).block_n == _launch.INTERPRETER_BLOCK_N) == built
    assert _launch.autotune_enabled() == (not built)


def test_autotune_wiring(monkeypatch, triton_device):
    """CALIBRL_AUTOTUNE=1 wraps kernels in triton.autotune keyed on V (faked here: the interpreter cannot
    time configs), never for in-place launches; results stay those of the fixed configuration."""
    from calibrl_kernels.triton import _launch

    wrapped = []

    class FakeAutotuner:
        def __init__(self, kernel, configs, key):
            self.kernel, self.configs, self.key = kernel, configs, key

        def __getitem__(self, grid):
            def run(**kwargs):
                config = self.configs[0]
                assert not set(config.kwargs) & set(kwargs), "tuned meta-parameters passed twice"
                self.kernel[grid](**kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

            return run

    def fake_autotune(configs, key):
        assert configs and all(isinstance(c, _launch.triton.Config) for c in configs)

        def wrap(kernel):
            wrapped.append((kernel.__name__, tuple(key)))
            return FakeAutotuner(kernel, configs, key)

        return wrap

    monkeypatch.setattr(_launch, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_launch.triton, "autotune", fake_autotune)
    monkeypatch.setattr(_launch, "_AUTOTUNED", {})
    logits, targets, w_lp, w_h = _case(5, 300, torch.float32, triton_device, seed=1)
    lp, h, grad = _run(logits, targets, w_lp, w_h, 1.0, fn=ck.token_logprobs)
    assert ("_token_logprobs_fwd_kernel", ("V",)) in wrapped and ("_logits_grad_kernel", ("V",)) in wrapped
    lp64, h64, grad64 = _reference(logits, targets, w_lp, w_h, 1.0, dtype=torch.float64)
    assert_close_rel(lp, lp64, 1e-5, "logp")
    assert_close_rel(grad, grad64, 1e-5, "dlogits")
    # the in-place gradient of the fused loss must not be autotuned (the tuner reruns launches)
    wrapped.clear()
    monkeypatch.setattr(_launch, "_AUTOTUNED", {})
    x = logits.clone().reshape(1, 5, 300).requires_grad_(True)
    out = ck.fused_calibrl_loss(
        x,
        targets.reshape(1, 5).clamp_min(0),
        torch.zeros(1, 5, device=triton_device),
        torch.ones(1, device=triton_device),
        torch.ones(1, 5, device=triton_device),
        config=ck.CalibRLConfig.for_algo("grpo"),
        inplace_backward=True,
    )
    out.loss.backward()
    assert [name for name, _ in wrapped] == ["_calibrl_loss_fwd_kernel"]


def test_backend_modules_do_not_shadow_public_names():
    """Importing a submodule sets it as a package attribute: none may be named like a public op."""
    for name in ck.__all__:
        assert not isinstance(getattr(ck, name), type(os)), f"calibrl_kernels.{name} is a module"


def test_importing_the_package_does_not_import_triton():
    code = "import sys, calibrl_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# A row stride just above 2^30 elements: row 2 starts past 2^31, so any int32 product of row index and
# stride would wrap (the interpreter computes int32 in numpy, wrapping, and would read the wrong row or
# crash; a compiled kernel would read or write out of bounds). On a CPU the storage is a virtual
# allocation of ~4.3 GB (bf16) whose untouched pages are never committed: only the three rows are
# written; on a GPU it is a real 4.3 GB allocation. The script runs where the session's Triton kernels
# run (``triton_device``: compiled on CUDA, the interpreter on CPU) in a subprocess, so that a wrong
# address cannot take the test session down with it, and reports its errors as JSON for the asserts here.
_OFFSET_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    device = sys.argv[1]
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # the compiled kernels
    os.environ["CALIBRL_IMPL"] = "triton"  # the fused loss too (CPU tensors would go to the C++ backend)
    import torch
    import calibrl_kernels as ck
    from calibrl_kernels import reference
    from calibrl_kernels.triton import token_logprobs
    V, rows = 40, 3
    stride = 2 ** 30 + 64  # fits int32; rows * stride does not
    storage = torch.empty(stride * (rows - 1) + V, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((rows, V), (stride, 1))
    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(rows, V, generator=g) * 2).to(torch.bfloat16)
    logits.copy_(dense.to(device))
    targets = torch.tensor([3, 17, 39], device=device)
    x = logits.detach().requires_grad_(True)
    lp, h = token_logprobs(x, targets, 1.0, -100, True)
    (lp.sum() + h.sum()).backward()
    d = dense.double().requires_grad_(True)
    lp64, h64 = reference.token_logprobs(d, targets.cpu(), 1.0, -100, True)
    (lp64.sum() + h64.sum()).backward()
    # the fused loss over the same rows as (B, T, V) = (1, 3, V), gradient written in place
    mask = torch.ones(1, rows, device=device)
    old = lp.detach().reshape(1, rows) + 0.1
    args = (targets.reshape(1, rows), old, torch.tensor([0.5], device=device), mask)
    kw = dict(expert_logp=torch.full((1, rows), -2.0, device=device), passed=torch.tensor([True], device=device),
              config=ck.CalibRLConfig(entropy_coef=0.1))
    dense_out = ck.fused_calibrl_loss(dense.to(device).reshape(1, rows, V).requires_grad_(True), *args, **kw)
    y = logits.unsqueeze(0).detach().requires_grad_(True)  # (1, 3, V), time stride 2^30 + 64
    out = ck.fused_calibrl_loss(y, *args, **kw, inplace_backward=True)
    x_dense = dense.to(device).reshape(1, rows, V).requires_grad_(True)
    ck.fused_calibrl_loss(x_dense, *args, **kw).loss.backward()
    out.loss.backward()
    row2 = storage[2 * stride:2 * stride + V]  # the in-place gradient of row 2, past 2^31 elements
    rss_mb = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20 if sys.platform.startswith("linux") else 0
    print(json.dumps(dict(
        device=str(lp.device), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
        logp_error=(lp.cpu() - lp64).abs().max().item(), entropy_error=(h.cpu() - h64).abs().max().item(),
        grad_error=(x.grad.float().cpu() - d.grad).abs().max().item(),
        loss=out.loss.item(), dense_loss=dense_out.loss.item(),
        inplace_grad_error=(row2.float() - x_dense.grad[0, 2].float()).abs().max().item(),
        inplace_grad_scale=x_dense.grad[0, 2].float().abs().max().item(), rss_mb=rss_mb,
    )))
    """
)


def test_int64_offsets_past_2_pow_31_elements(triton_device):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _OFFSET_SCRIPT, triton_device.type], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"].startswith(triton_device.type), result
    assert result["interpreted"] == (triton_device.type == "cpu"), result
    assert result["logp_error"] < 1e-4 and result["entropy_error"] < 1e-4, result
    assert result["grad_error"] < 2e-2, result  # bf16 gradient: a few ulp of entries up to ~1
    assert result["loss"] == result["dense_loss"], result  # rows past 2^31 read the same values as dense rows
    assert result["inplace_grad_scale"] > 0 and result["inplace_grad_error"] == 0, result
    assert result["rss_mb"] < 3000, result  # the 4.3 GB CPU storage stays virtual
