"""The chunked lm_head path (calibrl_kernels.chunked) with both row maths, against the reference.

The reference goes through explicit (N, V) logits; the chunked path must match it on values and on
the gradients of hidden, weight and bias, for every mode / activation / aggregation / baseline, and
must never allocate an (N, V) tensor.
"""

import functools

import pytest
import torch
from _cpu_helpers import (
    CONFIGS,
    assert_loss_outputs_close,
    chunked_linear_loss,
    cpp_module_or_skip,
    loss_and_grads,
    make_linear_case,
    max_rel_error,
    upcast_leaves,
)

from calibrl_kernels import _dispatch, chunked, library, ops, reference
from calibrl_kernels.config import CalibRLConfig, LossInputs


@pytest.fixture(scope="module", params=["torch", "cpp"])
def row_math(request):
    if request.param == "torch":
        return chunked.TORCH_ROW_MATH
    from calibrl_kernels.cpu._rows import CppRowMath

    return CppRowMath(cpp_module_or_skip())


def _chunked(row_math, rows=7):
    """The chunked op with a budget of about `rows` chunk rows at V = 67 in fp64 (several chunks)."""
    budget = rows * 67 * 8 * row_math.buffers_per_chunk

    def fn(*args, **kwargs):
        return chunked_linear_loss(*args, row_math=row_math, chunk_bytes=budget, **kwargs)

    return fn


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_matches_reference_fp64_every_config(row_math, name):
    config = CONFIGS[name].replace(temperature=0.7 if "options" in name else 1.0)
    case = make_linear_case(config, seed=len(name))
    ref, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, case, config)
    with chunked.record_chunks() as chunks:
        out, grads = loss_and_grads(_chunked(row_math), case, config)
    assert len(chunks) == 1 and chunks[0].rows < case.targets.numel(), "the case should run in several chunks"
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12, what=name)
    for got, want, what in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert max_rel_error(got, want) < 1e-10, what


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_fp32_against_fp64_reference(row_math, temperature, bias):
    """Awkward V (not a multiple of any block, several C++ stat blocks), D, and a scaled backward."""
    config = CalibRLConfig(temperature=temperature, entropy_coef=0.01)
    case = make_linear_case(config, V=1037, D=13, dtype=torch.float32, bias=bias, seed=3)
    exact = upcast_leaves(case)
    ref, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, exact, config, scale=2.5)
    out, grads = loss_and_grads(_chunked(row_math), case, config, scale=2.5)
    assert out.loss.dtype == torch.float32
    assert_loss_outputs_close(out, ref, rtol=2e-5, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        assert max_rel_error(got, want) < 2e-5


@pytest.mark.parametrize("mode", ["calibrl", "luffy"])
def test_loss_bf16_no_worse_than_reference_in_bf16(row_math, mode):
    """bf16 inputs: error against the exact (fp64) result at most twice that of the reference run in bf16."""
    config = CalibRLConfig(mode=mode, entropy_coef=0.02)
    case = make_linear_case(config, V=600, D=24, dtype=torch.bfloat16, seed=5)
    exact, exact_grads = loss_and_grads(reference.fused_linear_calibrl_loss, upcast_leaves(case), config)
    ref, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, case, config)
    # A small budget: several row chunks and several upcast blocks of the bf16 weight.
    with chunked.record_chunks() as chunks:
        out, grads = loss_and_grads(chunked_linear_loss, case, config, row_math=row_math, chunk_bytes=64 * 1024)
    assert chunks[0].weight_block_rows < 600
    for name in ("loss", "pg_loss", "guide_loss", "entropy"):
        value = lambda result: float(getattr(result, name).detach())  # noqa: E731
        ours, theirs = abs(value(out) - value(exact)), abs(value(ref) - value(exact))
        assert ours <= 2 * theirs + 1e-6 * max(1.0, abs(value(exact))), name
    for got, want, base in zip(grads, exact_grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert max_rel_error(got, want) <= 2 * max_rel_error(base, want) + 1e-6


@pytest.mark.parametrize(
    "config", [CalibRLConfig(entropy_coef=0.1), CalibRLConfig(mode="grpo")], ids=["calibrl", "grpo"]
)
def test_single_token(row_math, config):
    """N = 1: one row of one token (the expert baseline given directly, no expert row in the batch)."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 1, 9, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(67, 9, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(67, generator=g, dtype=torch.float64, requires_grad=True)
    args = (
        hidden,
        weight,
        torch.tensor([[5]]),
        torch.tensor([[-3.0]], dtype=torch.float64),
        torch.tensor([0.7], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
    )
    kw = dict(
        bias=bias, expert_logp=torch.tensor([[-2.0]], dtype=torch.float64), passed=torch.tensor([True]), config=config
    )
    ref = reference.fused_linear_calibrl_loss(*args, **kw)
    out = chunked_linear_loss(*args, row_math=row_math, **kw)
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(
        torch.autograd.grad(out.loss, (hidden, weight, bias)), torch.autograd.grad(ref.loss, (hidden, weight, bias))
    ):
        assert max_rel_error(got, want) < 1e-10


def test_all_masked(row_math):
    config = CalibRLConfig(entropy_coef=0.1)
    masked = make_linear_case(config, all_masked=True, seed=8)
    ref, _ = loss_and_grads(reference.fused_linear_calibrl_loss, masked, config)
    out, grads = loss_and_grads(_chunked(row_math), masked, config)
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    assert float(out.loss.detach()) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_ignore_index_other_than_default(row_math):
    config = CalibRLConfig()
    case = make_linear_case(config, ignore_index=7, seed=9)
    ref, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, case, config, ignore_index=7)
    out, grads = loss_and_grads(_chunked(row_math), case, config, ignore_index=7)
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert max_rel_error(got, want) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flat", [False, True])
def test_linear_token_logprobs_values_and_gradients(row_math, dtype, flat):
    """Gradients through both logp and entropy; the backward recomputes the chunks."""
    case = make_linear_case(CalibRLConfig(), V=531, D=11, dtype=dtype, seed=11)
    hidden, targets = case.hidden, case.targets
    if flat:
        hidden = case.hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
    exact = upcast_leaves(case)
    ex_hidden = exact.hidden.reshape(hidden.shape)

    def run(h, w, b, **kw):
        logp, ent = kw.pop("fn")(h, w, targets, b, 0.8, -100, True, **kw)
        g = torch.Generator().manual_seed(1)
        w_lp = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
        w_h = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.dtype)
        return logp, ent, torch.autograd.grad((logp * w_lp).sum() + (ent * w_h).sum(), tuple(t for t in (h, w, b)))

    ex_lp, ex_ent, ex_grads = run(ex_hidden, exact.weight, exact.bias, fn=reference.linear_token_logprobs)
    ref_lp, ref_ent, ref_grads = run(hidden, case.weight, case.bias, fn=reference.linear_token_logprobs)
    with chunked.record_chunks() as chunks:
        lp, ent, grads = run(
            hidden,
            case.weight,
            case.bias,
            fn=library.linear_token_logprobs(row_math.name),
            chunk_bytes=5 * 531 * 4 * row_math.buffers_per_chunk,
        )
    assert len(chunks) == 2 and chunks[0].rows < targets.numel()  # forward + recomputing backward
    assert lp.shape == targets.shape and lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert float(lp.detach().reshape(-1)[0]) == 0.0 and float(ent.detach().reshape(-1)[0]) == 0.0  # ignored
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want, base in ((lp, ex_lp, ref_lp), (ent, ex_ent, ref_ent)) + tuple(zip(grads, ex_grads, ref_grads)):
        assert got.shape == base.shape and got.dtype == base.dtype
        assert max_rel_error(got, want) <= 2 * max_rel_error(base, want) + tol


def test_linear_token_logprobs_logp_only_and_no_grad(row_math):
    case = make_linear_case(CalibRLConfig(), V=90, seed=12)
    logp = library.linear_token_logprobs(row_math.name)(case.hidden, case.weight, case.targets, case.bias)
    ref = reference.linear_token_logprobs(case.hidden, case.weight, case.targets, case.bias)
    got = torch.autograd.grad(logp.sum(), case.leaves())
    want = torch.autograd.grad(ref.sum(), case.leaves())
    for g, w in zip(got, want):
        assert max_rel_error(g, w) < 1e-10
    with torch.no_grad():
        logp2 = library.linear_token_logprobs(row_math.name)(case.hidden, case.weight, case.targets, case.bias)
    assert not logp2.requires_grad
    torch.testing.assert_close(logp2, logp.detach(), rtol=0, atol=0)


def test_gradients_skipped_when_nothing_requires_grad(row_math, monkeypatch):
    config = CalibRLConfig()
    case = make_linear_case(config, seed=13)
    built = []
    original = chunked._Gradients.__init__

    def spy(self, *args):
        built.append(args[1:])
        original(self, *args)

    monkeypatch.setattr(chunked._Gradients, "__init__", spy)
    b = case.batch
    with torch.no_grad():
        out = chunked_linear_loss(*case.loss_args(), bias=case.bias, row_math=row_math, **b.kwargs(config))
    assert built == [] and not out.loss.requires_grad
    # Only the weight requires grad: only its gradient buffer is built.
    hidden = case.hidden.detach()
    out = chunked_linear_loss(
        hidden, case.weight, case.targets, b.old_logp, b.advantages, b.mask, row_math=row_math, **b.kwargs(config)
    )
    assert built == [(False, True, False)]
    (grad_w,) = torch.autograd.grad(out.loss, (case.weight,))
    ref = reference.fused_linear_calibrl_loss(
        hidden, case.weight, case.targets, b.old_logp, b.advantages, b.mask, **b.kwargs(config)
    )
    assert max_rel_error(grad_w, torch.autograd.grad(ref.loss, (case.weight,))[0]) < 1e-10


def test_backward_accumulates_and_refuses_a_second_pass(row_math):
    config = CalibRLConfig()
    case = make_linear_case(config, seed=14)
    b = case.batch
    args = case.loss_args()
    for _ in range(2):
        chunked_linear_loss(*args, bias=case.bias, row_math=row_math, **b.kwargs(config)).loss.backward()
    _, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, case, config)
    for leaf, want in zip(case.leaves(), ref_grads):
        assert max_rel_error(leaf.grad, 2 * want) < 1e-10
    out = chunked_linear_loss(*args, bias=case.bias, row_math=row_math, **b.kwargs(config))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_never_allocates_n_by_v(row_math):
    """Full fp32 logits (64 x 4096 = 1 MiB) exceed the 128 KiB budget: the chunks obey it, and no op
    of the step (forward and backward) allocates a tensor the size of the logits."""
    config = CalibRLConfig()
    case = make_linear_case(config, groups=4, rows_per_group=3, T=4, D=16, V=4096, dtype=torch.float32, bias=False)
    n_rows = case.targets.numel()
    logits_bytes = n_rows * 4096 * 4
    budget = 128 * 1024
    assert logits_bytes > 4 * budget
    b = case.batch
    with (
        chunked.record_chunks() as chunks,
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        out = chunked_linear_loss(*case.loss_args(), row_math=row_math, chunk_bytes=budget, **b.kwargs(config))
        out.loss.backward()
        logp = library.linear_token_logprobs(row_math.name)(case.hidden, case.weight, case.targets, chunk_bytes=budget)
        logp.sum().backward()
    assert len(chunks) == 3
    for record in chunks:
        assert record.bytes * row_math.buffers_per_chunk <= budget and record.rows < n_rows
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    weight_bytes = 4096 * 16 * 4  # dWeight (V, D) is allowed; it is 4x smaller than the logits here
    assert largest <= max(budget, weight_bytes) < logits_bytes


def test_chunk_budget_sources_and_validation(monkeypatch):
    monkeypatch.delenv(chunked.ENV_CHUNK_BYTES, raising=False)
    assert chunked.chunk_budget() == chunked.default_chunk_bytes()
    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, "1e6")
    assert chunked.chunk_budget() == 1_000_000
    assert chunked.chunk_budget(4096) == 4096
    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, "lots")
    with pytest.raises(ValueError, match="CALIBRL_CHUNK_BYTES"):
        chunked.chunk_budget()
    with pytest.raises(ValueError, match="chunk_bytes"):
        chunked.chunk_budget(0)
    # Chunks stay under the budget, even, and on 16-row tiles where possible.
    assert chunked.rows_per_chunk(2048, 32000, 4, 1, 32 * 2**20) == 256
    assert chunked.rows_per_chunk(2048, 32000, 4, 1, 48 * 2**20) == 352  # 6 chunks, not 5 x 384 + 128
    assert chunked.rows_per_chunk(100, 10, 4, 1, 10 * 40) == 10
    assert chunked.rows_per_chunk(30, 67, 8, 4, 7 * 67 * 8 * 4) == 6  # 5 even chunks of 6 rows
    assert chunked.rows_per_chunk(3, 151936, 4, 1, 1) == 1
    assert chunked.rows_per_chunk(5, 10, 4, 1, 10**9) == 5
    # With room in the budget: N // 512 chunks of 512 to 1023 rows (the GEMMs' knee), never fewer rows.
    gib = 2**30
    assert chunked.rows_per_chunk(8192, 151936, 4, 1, gib) == 512  # 16 chunks, 297 MiB
    assert chunked.rows_per_chunk(2048, 32000, 4, 1, gib) == 512
    assert chunked.rows_per_chunk(1023, 151936, 4, 1, gib) == 1023  # one chunk, not 2 x 512
    assert chunked.rows_per_chunk(1100, 32000, 4, 1, gib) == 560  # 2 even chunks on 16-row tiles
    assert chunked.rows_per_chunk(8192, 151936, 4, 4, gib) == 432  # torch row math: the budget binds (441)
    assert chunked.rows_per_chunk(4096, 64, 8, 1, gib, knee=100) == 112  # 40 chunks of 103 -> 112
    for n in (1, 511, 512, 1024, 1500, 8192, 10**5):
        rows = chunked.rows_per_chunk(n, 151936, 4, 1, gib)
        assert rows * 151936 * 4 <= gib and (rows == n or 512 <= rows < 1024)


def test_default_chunk_budget_is_a_bounded_fraction_of_memory(monkeypatch):
    memory = chunked._memory_bytes()
    assert memory is not None and memory > 0  # Linux: a cgroup limit or the physical memory
    chunked.default_chunk_bytes.cache_clear()
    try:
        monkeypatch.setattr(chunked, "_memory_bytes", lambda: 24 * 2**30)
        assert chunked.default_chunk_bytes() == 2**30  # capped
        chunked.default_chunk_bytes.cache_clear()
        monkeypatch.setattr(chunked, "_memory_bytes", lambda: 4 * 2**30)
        assert chunked.default_chunk_bytes() == 256 * 2**20  # 1/16
        chunked.default_chunk_bytes.cache_clear()
        monkeypatch.setattr(chunked, "_memory_bytes", lambda: 2**29)
        assert chunked.default_chunk_bytes() == 64 * 2**20  # floor
        chunked.default_chunk_bytes.cache_clear()
        monkeypatch.setattr(chunked, "_memory_bytes", lambda: None)
        assert chunked.default_chunk_bytes() == 2**30
    finally:
        chunked.default_chunk_bytes.cache_clear()


def test_strided_hidden_and_int32_targets(row_math):
    """hidden as a slice of a longer sequence (rows not one block) and int32 targets."""
    config = CalibRLConfig()
    case = make_linear_case(config, seed=15)
    B, T, D = case.hidden.shape
    wide = torch.randn(B, T + 3, D, dtype=torch.float64, requires_grad=True)
    b = case.batch
    kw = dict(bias=case.bias, **b.kwargs(config))
    ref = reference.fused_linear_calibrl_loss(
        wide[:, 1:-2], case.weight, case.targets, b.old_logp, b.advantages, b.mask, **kw
    )
    out = chunked_linear_loss(
        wide[:, 1:-2], case.weight, case.targets.int(), b.old_logp, b.advantages, b.mask, row_math=row_math, **kw
    )
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)
    (want,) = torch.autograd.grad(ref.loss, (wide,))
    (got,) = torch.autograd.grad(out.loss, (wide,))
    assert max_rel_error(got, want) < 1e-10


def test_public_ops_dispatch_to_the_chunked_path(monkeypatch):
    config = CalibRLConfig()
    case = make_linear_case(config, seed=16)
    b = case.batch
    monkeypatch.setenv("CALIBRL_IMPL", "torch")
    assert _dispatch.selected_impl("fused_linear_calibrl_loss", torch.device("cpu")) == "torch"
    with chunked.record_chunks() as chunks:
        out = ops.fused_linear_calibrl_loss(*case.loss_args(), bias=case.bias, **b.kwargs(config))
        ops.linear_token_logprobs(case.hidden, case.weight, case.targets, bias=case.bias)
    assert len(chunks) == 2  # both ops ran the chunked path (torch row math)
    ref = reference.fused_linear_calibrl_loss(*case.loss_args(), bias=case.bias, **b.kwargs(config))
    assert_loss_outputs_close(out, ref, rtol=1e-10, atol=1e-12)


def test_gradients_are_handed_over_without_a_copy(row_math, monkeypatch):
    """The forward's gradient buffers become .grad as they are (no (V, D) copy in backward)."""
    config = CalibRLConfig(mode="grpo")
    case = make_linear_case(config, dtype=torch.float32, bias=False, seed=17)
    buffers = []
    original = chunked._Gradients.__init__

    def spy(self, *args):
        original(self, *args)
        buffers.append([t.data_ptr() for t in (self.hidden, self.weight, self.bias) if t is not None])

    monkeypatch.setattr(chunked._Gradients, "__init__", spy)
    out = chunked_linear_loss(*case.loss_args(), row_math=row_math, config=config)
    out.loss.backward()
    assert buffers == [[case.hidden.grad.data_ptr(), case.weight.grad.data_ptr()]]


@pytest.mark.parametrize("op", ["linear_token_logprobs", "fused_linear_calibrl_loss"])
def test_second_order_gradients_raise(row_math, op):
    """The closed-form backward is first order only: differentiating it again raises instead of
    silently dropping the second-order terms."""
    config = CalibRLConfig(entropy_coef=0.01)
    case = make_linear_case(config, seed=18)
    b = case.batch

    def run(fn):
        if op == "linear_token_logprobs":
            logp, ent = fn(case.hidden, case.weight, case.targets, case.bias, 1.0, -100, True)
            return logp.sum() + ent.sum()
        return fn(*case.loss_args(), bias=case.bias, **b.kwargs(config)).loss

    if op == "linear_token_logprobs":
        ours = library.linear_token_logprobs(row_math.name)
    else:
        ours = functools.partial(chunked_linear_loss, row_math=row_math)
    want = torch.autograd.grad(run(getattr(reference, op)), case.leaves())
    grads = torch.autograd.grad(run(ours), case.leaves(), create_graph=True)
    for got, expected in zip(grads, want):
        assert got.requires_grad and max_rel_error(got, expected) < 1e-10
    with pytest.raises(RuntimeError, match="differentiate"):
        sum((g**2).sum() for g in grads).backward()


def test_row_math_gives_zero_rows_where_a_and_b_are_zero(row_math):
    """A masked token (a = b = 0) gets an exactly zero gradient row, even when its logits are all -inf
    (which used to give NaN: 0 * NaN); an ignored target too. Other rows are untouched."""
    from calibrl_kernels.reference import coefficients

    config = CalibRLConfig(entropy_coef=0.1)
    g = torch.Generator().manual_seed(19)
    V = 29
    logits = torch.randn(4, V, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([3, 7, 11, -100])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64) * (targets != -100)
    inputs = LossInputs(
        old_logp=-torch.rand(1, 4, generator=g, dtype=torch.float64),
        advantages=torch.tensor([0.8], dtype=torch.float64),
        mask=mask,
        expert_logp=-torch.rand(1, 4, generator=g, dtype=torch.float64),
        passed=torch.tensor([True]),
    )
    table = coefficients.token_table(inputs, config, torch.float64)

    def gradient(chunk):
        chunk = chunk.clone()
        rows = torch.zeros(4, len(coefficients.ROW_FIELDS), dtype=torch.float64)
        row_math.loss(chunk, targets, table, rows, config, 1 / 0.9, -100, True)
        return chunk, rows

    finite, _ = gradient(logits)
    padded = logits.clone()
    padded[2] = float("-inf")
    grad, rows = gradient(padded)
    assert rows[2, coefficients.ROW["coef_a"]] == 0 and rows[2, coefficients.ROW["coef_b"]] == 0
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[2:], torch.zeros_like(grad[2:]))
    assert torch.equal(grad[:2], finite[:2]) and bool((grad[:2] != 0).any())
    # The backward-only entry (linear_token_logprobs) with zero incoming gradients on the padded row.
    rows[:, coefficients.ROW["coef_a"]] = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
    rows[:, coefficients.ROW["coef_b"]] = torch.tensor([0.0, 0.3, 0.0, 1.0], dtype=torch.float64)
    chunk = padded.clone()
    row_math.gradient(chunk, targets, rows, 1 / 0.9, -100)
    assert torch.isfinite(chunk).all() and torch.equal(chunk[2:], torch.zeros_like(chunk[2:]))


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (fp64; 8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


@pytest.mark.parametrize("scale", [1.0, 1 / 3, 1e-3])
def test_bf16_gradients_are_rounded_once_under_a_scaled_backward(row_math, scale):
    """bf16 hidden / weight / bias with an upstream gradient != 1: every gradient element is the exact
    value (fp64 reference on the same bf16 inputs) rounded once to bf16 (within half a bf16 spacing,
    plus the fp32 computation's error); it used to be rounded to bf16 in forward and scaled in bf16
    in backward (up to a whole spacing off). Its error is no larger than the reference's in bf16."""
    config = CalibRLConfig(entropy_coef=0.02)
    case = make_linear_case(config, V=600, D=24, dtype=torch.bfloat16, seed=5)
    exact, exact_grads = loss_and_grads(reference.fused_linear_calibrl_loss, upcast_leaves(case), config, scale=scale)
    ref, ref_grads = loss_and_grads(reference.fused_linear_calibrl_loss, case, config, scale=scale)
    out, grads = loss_and_grads(
        chunked_linear_loss, case, config, scale=scale, row_math=row_math, chunk_bytes=64 * 1024
    )
    for got, want, base, name in zip(grads, exact_grads, ref_grads, ("hidden", "weight", "bias")):
        assert got.dtype == torch.bfloat16, name
        error = (got.double() - want).abs()
        bound = 0.5 * _bf16_ulp(want) + 1e-5 * float(want.abs().max())
        assert bool((error <= bound).all()), f"{name}: {int((error > bound).sum())} elements rounded twice"
        assert max_rel_error(got, want) <= max_rel_error(base, want) + 1e-6, name


@pytest.mark.parametrize("raw, expected", [("4096", 4096), (" 1e6 ", 1_000_000), ("1_048_576", 2**20), ("2.0e3", 2000)])
def test_chunk_bytes_env_accepts_whole_numbers(monkeypatch, raw, expected):
    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, raw)
    assert chunked.chunk_budget() == expected


@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "1e400", "0.5", "1.9", "0", "-4096", "lots", "12 MB"])
def test_chunk_bytes_env_rejects_the_rest_quoting_it(monkeypatch, raw):
    """A clear ValueError naming the variable and quoting the raw string (inf used to raise an uncaught
    OverflowError, 0.5 to report 'got 0', 1.9 to run silently with 1 byte)."""
    import re

    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, raw)
    with pytest.raises(ValueError, match=f"CALIBRL_CHUNK_BYTES.*{re.escape(repr(raw))}"):
        chunked.chunk_budget()


def test_chunk_bytes_argument_validation(monkeypatch):
    monkeypatch.setenv(chunked.ENV_CHUNK_BYTES, "1.9")  # an explicit argument wins: the env is not read
    assert chunked.chunk_budget(4096) == 4096
    for bad in (1.9, 4096.0, "4096", True):
        with pytest.raises(TypeError, match="chunk_bytes"):
            chunked.chunk_budget(bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_bytes.*got " + str(bad)):
            chunked.chunk_budget(bad)
