"""CalibRLLoss / LinearCalibRLLoss: the nn.Module wrappers equal the functional ops."""

import pytest
import torch
from _cpu_helpers import CONFIGS, assert_loss_outputs_close, make_linear_case, max_rel_error

import calibrl_kernels as ck
from calibrl_kernels import reference


@pytest.mark.parametrize("name", ["calibrl", "luffy", "calibrl-options"])
def test_linear_module_equals_functional(name):
    config = CONFIGS[name]
    case = make_linear_case(config, seed=21, ignore_index=-1)
    b = case.batch
    module = ck.LinearCalibRLLoss(config, ignore_index=-1)
    assert isinstance(module, torch.nn.Module) and list(module.parameters()) == []
    out = module(*case.loss_args(), bias=case.bias, **b.fields())
    ref = reference.fused_linear_calibrl_loss(*case.loss_args(), bias=case.bias, ignore_index=-1, **b.kwargs(config))
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.loss, case.leaves()), torch.autograd.grad(ref.loss, case.leaves())):
        assert max_rel_error(got, want) < 1e-10


def test_logits_module_with_scores_and_group_ids():
    """Advantages, pass flags and the expert baseline resolved from scores + group ids, as the op does."""
    config = ck.CalibRLConfig(entropy_coef=0.01)
    g = torch.Generator().manual_seed(3)
    B, T, V = 6, 4, 33
    group_ids = torch.tensor([7, 7, 7, 2, 2, 2])
    is_expert = torch.tensor([False, False, True, False, True, False])
    scores = torch.tensor([1.1, 0.0, 1.1, 0.1, 1.0, 1.1], dtype=torch.float64)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    old_logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    module = ck.CalibRLLoss(config)
    out = module(logits, targets, old_logp, None, mask, scores=scores, group_ids=group_ids, is_expert=is_expert)
    ref = ck.fused_calibrl_loss(
        logits, targets, old_logp, None, mask, scores=scores, group_ids=group_ids, is_expert=is_expert, config=config
    )
    assert_loss_outputs_close(out, ref, rtol=1e-12, atol=1e-14)
    stats = reference.group_advantages(scores, group_ids, is_expert=is_expert)
    baseline, expert_mask = reference.expert_baseline(old_logp, mask, group_ids, is_expert, return_mask=True)
    exact = reference.fused_calibrl_loss(
        logits,
        targets,
        old_logp,
        stats.advantages,
        mask,
        expert_logp=baseline,
        passed=stats.passed,
        is_expert=is_expert,
        expert_mask=expert_mask,
        config=config,
    )
    assert_loss_outputs_close(out, exact, rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(out.loss, (logits,))
    (want,) = torch.autograd.grad(exact.loss, (logits,))
    assert max_rel_error(got, want) < 1e-10


def test_module_validation_and_repr():
    with pytest.raises(TypeError, match="config"):
        ck.CalibRLLoss("calibrl")
    with pytest.raises(TypeError, match="ignore_index"):
        ck.LinearCalibRLLoss(ignore_index=1.5)
    module = ck.LinearCalibRLLoss()
    assert module.config == ck.CalibRLConfig() and "ignore_index=-100" in repr(module)
    with pytest.raises(ValueError, match="hidden"):
        module(
            torch.zeros(3, 4),
            torch.zeros(5, 4),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3),
            torch.zeros(3),
            torch.ones(3),
        )


def test_logits_module_inplace_backward(monkeypatch):
    """CalibRLLoss(inplace_backward=True) passes the option to the op (default CPU backend): the logits
    buffer holds its gradient afterwards; a per-call keyword overrides the module's setting."""
    monkeypatch.delenv("CALIBRL_IMPL", raising=False)
    config = ck.CalibRLConfig(entropy_coef=0.01)
    case = make_linear_case(config, seed=22)
    b = case.batch
    B, T = b.old_logp.shape
    logits = torch.randn(B, T, 41, generator=torch.Generator().manual_seed(2))
    targets = case.targets.remainder(41)
    fields = dict(expert_logp=b.expert_logp.float(), passed=b.passed, is_expert=b.is_expert, expert_mask=b.expert_mask)
    args = (targets, b.old_logp.float(), b.advantages.float(), b.mask.float())
    ref_x = logits.clone().requires_grad_(True)
    reference.fused_calibrl_loss(ref_x, *args, config=config, **fields).loss.backward()
    module = ck.CalibRLLoss(config, inplace_backward=True)
    assert "inplace_backward=True" in repr(module)
    x = logits.clone().requires_grad_(True)
    module(x, *args, **fields).loss.backward()
    assert max_rel_error(x.grad, ref_x.grad) < 1e-5
    assert torch.equal(x.detach(), x.grad)  # overwritten by its gradient
    y = logits.clone().requires_grad_(True)
    module(y, *args, inplace_backward=False, **fields).loss.backward()
    assert torch.equal(y.detach(), logits) and torch.equal(y.grad, x.grad)
    with pytest.raises(TypeError, match="inplace_backward"):
        ck.CalibRLLoss(inplace_backward=1)


def test_linear_module_chunk_bytes_option(monkeypatch):
    """LinearCalibRLLoss(chunk_bytes=...) sets the CPU chunked path's budget for its calls (over the
    environment variable), is validated at construction, and does not leak into other calls."""
    from calibrl_kernels import chunked

    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, str(10**9))
    config = ck.CalibRLConfig()
    case = make_linear_case(config, seed=23)
    b = case.batch
    V = case.weight.shape[0]
    args = case.loss_args()
    fields = dict(b.fields(), bias=case.bias)
    budget = 3 * V * 8 * 4  # a few fp64 rows per chunk (3 with the torch row math's 4 buffers, 12 with C++)
    module = ck.LinearCalibRLLoss(config, chunk_bytes=budget)
    assert f"chunk_bytes={budget}" in repr(module)
    with chunked.record_chunks() as chunks:
        out = module(*args, **fields)
        ck.fused_linear_calibrl_loss(*args, **fields, config=config)  # not the module: the env's budget
    n_rows = case.targets.numel()
    assert chunks[0].bytes <= budget and chunks[0].rows < n_rows and chunks[1].rows == n_rows
    ref = reference.fused_linear_calibrl_loss(*args, **fields, config=config)
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    assert chunked.chunk_budget() == 10**9
    with pytest.raises(ValueError, match="chunk_bytes"):
        ck.LinearCalibRLLoss(chunk_bytes=0)
    with pytest.raises(TypeError, match="chunk_bytes"):
        ck.LinearCalibRLLoss(chunk_bytes=1.5)
