"""Silent-wrong-result and crash classes of the ops, on every backend (torch, cpp, Triton under the interpreter).

* in-place backward over logits that alias (expanded, overlapping) or are strided views: the gradient
  equals the one of inplace_backward=False (aliasing logits get a fresh buffer);
* integer target dtypes: uint8 / int8 / int16 / int32 / int64 targets give the same results, the default
  ignore_index=-100 matches no uint8 target (nothing ignored, never a wrapped 156);
* temperature and magnitude ranges: finite where the fp64 reference is finite, entropy >= 0, within the
  fp32 conditioning of the fp64 reference;
* NaN in positions a loss does not use never reaches its values or gradients;
* torch.func.grad / vmap: the ops run the reference inside a transform; a forced kernel backend is refused;
* the C++ backend never aborts the process (risky calls run in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import calibrl_kernels as ck
from calibrl_kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
B, T, V, D = 3, 4, 11, 5


def _batch(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return dict(
        old_logp=-torch.rand(b, T, generator=g) * 3,
        advantages=torch.randn(b, generator=g),
        mask=(torch.rand(b, T, generator=g) > 0.2).float(),
        expert_logp=-torch.rand(b, T, generator=g) * 3,
        passed=torch.arange(b) % 2 == 0,
        is_expert=torch.arange(b) == b - 1,
    )


# ------------------------------------------------------------------ in-place backward over aliasing layouts
def _layouts():
    """name -> (make(base) -> logits view of shape (B, T, V), base shape)."""
    return {
        "expand over B": (lambda base: base.expand(B, T, V), (1, T, V)),
        "expand over T": (lambda base: base.expand(B, T, V), (B, 1, V)),
        "as_strided overlap": (lambda base: base.as_strided((B, T, V), (T * 3, 3, 1)), (B * T * 3 + V,)),
        "transposed B, T": (lambda base: base.transpose(0, 1), (T, B, V)),
        "slice of a longer sequence": (lambda base: base[:, 1:], (B, T + 1, V)),
        "every other row": (lambda base: base[::2], (2 * B, T, V)),
        "V not contiguous": (lambda base: base.transpose(1, 2), (B, V, T)),
        "contiguous": (lambda base: base, (B, T, V)),
    }


@pytest.mark.parametrize("layout", sorted(_layouts()))
def test_inplace_backward_over_any_layout_matches_the_fresh_buffer(backend, layout):
    make, base_shape = _layouts()[layout]
    g = torch.Generator().manual_seed(1)
    base_values = torch.randn(base_shape, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    batch = _batch(2)
    grads, losses = [], []
    for inplace in (False, True):
        base = base_values.clone().requires_grad_(True)
        logits = make(base * 1.0)  # a non-leaf view: the in-place write lands in the product's buffer
        out = ck.fused_calibrl_loss(logits, targets, inplace_backward=inplace, **batch)
        out.loss.backward()
        grads.append(base.grad)
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    assert grads[0].abs().max() > 0


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_inplace_backward_still_writes_over_non_aliasing_views(monkeypatch, impl):
    """The fallback is for aliasing only: a slice (the usual logits[:, :-1]) still receives its gradient in place."""
    monkeypatch.setenv("CALIBRL_IMPL", impl)
    leaf = torch.randn(B, T + 1, V, generator=torch.Generator().manual_seed(3), requires_grad=True)
    full = leaf * 1.0
    before = full.detach().clone()
    out = ck.fused_calibrl_loss(full[:, :-1], torch.randint(0, V, (B, T)), inplace_backward=True, **_batch(3))
    out.loss.backward()
    assert torch.equal(full.detach()[:, -1], before[:, -1])  # the column outside the slice is untouched
    torch.testing.assert_close(full.detach()[:, :-1], leaf.grad[:, :-1])  # the slice now holds its gradient


# ------------------------------------------------------------------ integer target dtypes
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_integer_target_dtype_gives_the_int64_result(backend, dtype):
    g = torch.Generator().manual_seed(4)
    vocab = 127  # every id fits int8; 100 is a real token id here
    logits = torch.randn(B, T, vocab, generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, 0] = 100
    signed = dtype != torch.uint8
    if signed:
        targets[1, 1] = -100  # the default ignore_index
    want_logp = ck.token_logprobs(logits, targets)
    got_logp = ck.token_logprobs(logits, targets.to(dtype))
    torch.testing.assert_close(got_logp, want_logp, rtol=0, atol=0)
    assert (got_logp[0, 0] != 0) and (got_logp[1, 1] == 0) == signed
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(vocab, D, generator=g)
    torch.testing.assert_close(
        ck.linear_token_logprobs(hidden, weight, targets.to(dtype)),
        ck.linear_token_logprobs(hidden, weight, targets),
        rtol=0,
        atol=0,
    )
    batch = _batch(5)
    want = ck.fused_calibrl_loss(logits, targets, **batch)
    got = ck.fused_calibrl_loss(logits, targets.to(dtype), **batch)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    got = ck.fused_linear_calibrl_loss(hidden, weight, targets.to(dtype), **batch)
    torch.testing.assert_close(
        got.loss, ck.fused_linear_calibrl_loss(hidden, weight, targets, **batch).loss, rtol=0, atol=0
    )


def test_uint8_target_156_is_a_token_not_the_wrapped_ignore_index(backend):
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 200, generator=g)
    targets = torch.tensor([156, 3, 7, 156], dtype=torch.uint8)
    want = reference.token_logprobs(logits.double(), targets.long())
    torch.testing.assert_close(ck.token_logprobs(logits, targets).double(), want, rtol=1e-5, atol=1e-6)
    # an ignore_index outside the dtype's range matches nothing; inside it, it works as usual
    outside = ck.token_logprobs(logits, targets, ignore_index=300)
    torch.testing.assert_close(outside.double(), want, rtol=1e-5, atol=1e-6)
    assert ck.token_logprobs(logits, targets, ignore_index=156)[0] == 0
    # uint8 targets >= 128 of a vocabulary above 255 are not refused by a wrapped comparison
    assert torch.isfinite(ck.token_logprobs(torch.randn(2, 300), torch.tensor([50, 250], dtype=torch.uint8))).all()


# ------------------------------------------------------------------ temperature and magnitude ranges
# (magnitude of the logits, temperature): |logits / T| from 1e-30 to 1e30, and T up to 1e300 (uniform).
RANGES = [
    (1e-30, 1.0),
    (1.0, 1e-3),
    (1.0, 1e-9),
    (1e9, 1.0),
    (1e4, 1e-4),
    (1e18, 1.0),
    (1.0, 1e-30),
    (1e30, 1.0),
    (1.0, 1e300),
    (1e30, 1e300),
    (1.0, 1e30),
]


@pytest.mark.parametrize("scale, temperature", RANGES, ids=[f"x{s:g}-T{t:g}" for s, t in RANGES])
def test_extreme_temperature_and_magnitude_match_the_fp64_reference(backend, scale, temperature):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, T, V, generator=g) * scale
    logits[0, 0, 3] = float("-inf")  # a masked vocabulary entry stays masked at any temperature
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, 0] = 4
    x = logits.clone().requires_grad_(True)
    logp, entropy = ck.token_logprobs(x, targets, temperature=temperature, return_entropy=True)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    xr = logits.double().requires_grad_(True)
    ref_logp, ref_entropy = reference.token_logprobs(xr, targets, temperature=temperature, return_entropy=True)
    (ref_logp.sum() + 0.5 * ref_entropy.sum()).backward()
    assert torch.isfinite(ref_logp).all() and torch.isfinite(xr.grad).all()
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(x.grad).all()
    assert (entropy >= 0).all() and (logp <= 0).all()
    z = float((logits[torch.isfinite(logits)].abs().max()) / temperature)  # fp32 spacing of z bounds what is exact
    atol = max(1e-5, 4 * z * 2.0**-24)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), rtol=1e-4, atol=max(1e-5, atol / 1e3))
    grad_scale = max(1.0, float(xr.grad.abs().max()))
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=3e-3 * grad_scale)
    assert x.grad[0, 0, 3] == 0
    if scale / temperature <= 1e-29:  # the uniform limit over the V - 1 unmasked entries of row (0, 0)
        torch.testing.assert_close(logp[0, 0].double(), -torch.log(torch.tensor(V - 1.0, dtype=torch.float64)))


def test_torch_entropy_is_not_negative_at_sharp_temperatures():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(64, 50, generator=g) * 3
    for temperature in (1e-2, 1e-3, 1e-4, 1e-6):
        _, entropy = reference.token_logprobs(
            logits, torch.zeros(64, dtype=torch.long), temperature=temperature, return_entropy=True
        )
        assert (entropy >= 0).all(), (temperature, float(entropy.min()))


# ------------------------------------------------------------------ NaN in unused positions
NAN_PLACES = (
    "advantage at mask 0",
    "old_logp at mask 0",
    "expert_logp at mask 0",
    "expert row advantage",
    "expert row expert_logp",
    "logits at mask 0",
)


def _place_nan(place, logits, batch):
    """Put NaN where the loss (calibrl mode, (B, T) advantages) does not use it; returns the changed inputs."""
    batch = {k: v.clone() for k, v in batch.items()}
    logits = logits.clone()
    batch["advantages"] = batch["advantages"][:, None].expand(B, T).contiguous()
    batch["mask"][0, 1] = 0
    expert = B - 1
    if place == "advantage at mask 0":
        batch["advantages"][0, 1] = float("nan")
    elif place == "old_logp at mask 0":
        batch["old_logp"][0, 1] = float("nan")
    elif place == "expert_logp at mask 0":
        batch["expert_logp"][0, 1] = float("nan")
    elif place == "expert row advantage":
        batch["advantages"][expert] = float("nan")
    elif place == "expert row expert_logp":
        batch["expert_logp"][expert] = float("nan")
    else:
        logits[0, 1] = float("nan")
    return logits, batch


def _clean(logits, batch):
    """The same inputs with every NaN replaced by an arbitrary finite value."""
    return torch.nan_to_num(logits, nan=0.25), {
        k: (torch.nan_to_num(v, nan=-0.75) if v.is_floating_point() else v) for k, v in batch.items()
    }


@pytest.mark.parametrize("place", NAN_PLACES)
def test_nan_in_unused_positions_never_reaches_values_or_gradients(backend, place):
    g = torch.Generator().manual_seed(9)
    logits0, targets = torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    hidden0, weight0 = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    dirty = _place_nan(place, logits0, _batch(10))
    results = []
    for logits, batch in (dirty, _clean(*dirty)):
        x = logits.clone().requires_grad_(True)
        h, w = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
        fused = ck.fused_calibrl_loss(x, targets, **batch)
        linear = ck.fused_linear_calibrl_loss(h, w, targets, **batch) if place != "logits at mask 0" else None
        # calibrl_loss from per-token log-probs (with NaN log-probs at the masked token too)
        lp = torch.randn(B, T, generator=torch.Generator().manual_seed(11))
        lp[0, 1] = float("nan") if logits is dirty[0] else 0.5
        lp = lp.requires_grad_(True)
        plain = ck.calibrl_loss(lp, **{k: v for k, v in batch.items()})
        total = fused.loss + plain.loss + (linear.loss if linear is not None else 0)
        total.backward()
        outs = [fused.loss, fused.pg_loss, fused.guide_loss, plain.loss, plain.pg_loss, plain.guide_loss]
        grads = [x.grad, lp.grad]
        if linear is not None:
            outs += [linear.loss, linear.pg_loss, linear.guide_loss]
            grads += [h.grad, w.grad]
        results.append((outs, grads))
    (dirty_outs, dirty_grads), (clean_outs, clean_grads) = results
    for got, want in zip(dirty_outs + dirty_grads, clean_outs + clean_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_nan_score_of_an_expert_row_does_not_poison_its_group(backend):
    scores = torch.tensor([1.0, 0.0, float("nan"), 0.5, 0.2, 0.9])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    is_expert = torch.tensor([False, False, True, False, False, True])
    for norm_by_std in (False, True):
        stats = ck.group_advantages(scores, groups, is_expert=is_expert, norm_by_std=norm_by_std)
        clean = ck.group_advantages(torch.nan_to_num(scores), groups, is_expert=is_expert, norm_by_std=norm_by_std)
        on = ~is_expert
        assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.std).all()
        torch.testing.assert_close(stats.advantages[on], clean.advantages[on])
        torch.testing.assert_close(stats.pass_rate, clean.pass_rate)
        assert torch.isnan(stats.advantages[2])  # the expert's own advantage shows its NaN score


# ------------------------------------------------------------------ torch.func transforms
def test_torch_func_grad_and_vmap_run_the_reference():
    g = torch.Generator().manual_seed(12)
    logits, targets = torch.randn(B, T, V, generator=g), torch.randint(0, V, (B, T), generator=g)
    batch = _batch(13)

    def loss_of(x):
        return ck.fused_calibrl_loss(x, targets, **batch).loss

    x = logits.clone().requires_grad_(True)
    loss_of(x).backward()  # the default backend (cpp) through autograd
    torch.testing.assert_close(torch.func.grad(loss_of)(logits), x.grad, rtol=1e-5, atol=1e-7)
    # vmap over a batch of logits tensors: each entry equals the single call
    stacked = torch.stack([logits, 2 * logits])
    batched = torch.func.vmap(lambda row: ck.token_logprobs(row, targets))(stacked)
    torch.testing.assert_close(batched[1], ck.token_logprobs(2 * logits, targets))
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    grad_w = torch.func.grad(lambda w: ck.fused_linear_calibrl_loss(hidden, w, targets, **batch).loss)(weight)
    w = weight.clone().requires_grad_(True)
    ck.fused_linear_calibrl_loss(hidden, w, targets, **batch).loss.backward()
    torch.testing.assert_close(grad_w, w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("forced", ["cpp", "triton"])
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_with_a_forced_kernel_backend_is_refused_clearly(monkeypatch, forced, transform):
    monkeypatch.setenv("CALIBRL_IMPL", forced)
    logits, targets = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    if transform == "grad":
        call = lambda: torch.func.grad(lambda x: ck.token_logprobs(x, targets).sum())(logits)  # noqa: E731
    else:
        call = lambda: torch.func.vmap(lambda x: ck.token_logprobs(x, targets))(logits[None])  # noqa: E731
    message = rf"token_logprobs: backend '{forced}'.*torch.func.*calibrl_kernels.reference"
    with pytest.raises(RuntimeError, match=message):
        call()


# ------------------------------------------------------------------ the C++ backend never aborts the process
RISKY_CPP_CALLS = {
    "target out of range, value checks off": (
        "CALIBRL_VALUE_CHECKS=0",
        "ck.token_logprobs(torch.randn(3, 5), torch.tensor([0, 7, 1]))",
        "ValueError",
    ),
    "negative target, value checks off, fused": (
        "CALIBRL_VALUE_CHECKS=0",
        "ck.fused_calibrl_loss(torch.randn(1, 3, 5, requires_grad=True), torch.tensor([[0, -3, 1]]), "
        "torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3), config=ck.CalibRLConfig(mode='grpo'))",
        "ValueError",
    ),
    "target out of range, value checks off, lm_head": (
        "CALIBRL_VALUE_CHECKS=0",
        "ck.linear_token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 9, 1]))",
        "ValueError",
    ),
    "ignore_index outside int8, checks on": (
        "",
        "ck.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 4], dtype=torch.int8), ignore_index=200)",
        None,
    ),
    "ignore_index outside uint8 with an out-of-range target": (
        "",
        "ck.token_logprobs(torch.randn(3, 5), torch.tensor([0, 200, 4], dtype=torch.uint8), ignore_index=-56)",
        "ValueError",
    ),
    "ignore_index 2**70": (
        "",
        "ck.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 4]), ignore_index=2**70)",
        "ValueError",
    ),
}


@pytest.mark.parametrize("case", sorted(RISKY_CPP_CALLS))
def test_cpp_backend_raises_instead_of_aborting(case, tmp_path):
    env_setting, call, error = RISKY_CPP_CALLS[case]
    script = textwrap.dedent(f"""
        import torch, calibrl_kernels as ck
        try:
            {call}
        except Exception as e:
            print("RAISED", type(e).__name__, str(e).splitlines()[0])
        else:
            print("RETURNED")
    """)
    env = dict(os.environ, CALIBRL_IMPL="cpp")
    if env_setting:
        name, value = env_setting.split("=")
        env[name] = value
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the process died (rc {done.returncode}): {done.stderr[-2000:]}"
    if error is None:
        assert "RETURNED" in done.stdout, done.stdout
    else:
        assert f"RAISED {error}" in done.stdout, done.stdout
