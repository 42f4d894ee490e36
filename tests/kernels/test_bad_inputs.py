"""Bad and degenerate inputs on every backend.

* Zero-width sizes: N, B or T = 0 is defined (empty log-probs, loss 0, empty gradients, as the
  reference gives); V = 0 and D = 0 are refused with a ValueError naming the argument.
* Numeric arguments (temperature, eps, pass_threshold, ignore_index, num_groups, CalibRLConfig fields)
  accept Python ints and NumPy scalars; bools, strings, NaN / inf (where invalid) are refused.
* Shape errors of the fused ops name the input at fault, the expected and the actual shape.

Every case runs once per backend (CALIBRL_IMPL = torch, cpp, triton; Triton under the interpreter).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig

B, T, V, D = 2, 5, 7, 4
GRPO = CalibRLConfig(mode="grpo")


def fused_args(b=B, t=T, v=V, **changes):
    g = torch.Generator().manual_seed(0)
    args = dict(
        logits=torch.randn(b, t, v, generator=g),
        targets=torch.randint(0, v, (b, t), generator=g) if v else torch.zeros(b, t, dtype=torch.long),
        old_logp=-torch.rand(b, t, generator=g),
        advantages=torch.randn(b, generator=g),
        mask=torch.ones(b, t),
        expert_logp=-torch.rand(b, t, generator=g),
        passed=torch.arange(b) % 2 == 0,
        is_expert=torch.arange(b) == b - 1,
    )
    args.update(changes)
    return args


def call_fused(**changes):
    args = fused_args(**changes)
    positional = [args.pop(k) for k in ("logits", "targets", "old_logp", "advantages", "mask")]
    return ck.fused_calibrl_loss(*positional, **args)


def call_linear(b=B, t=T, v=V, d=D, **changes):
    g = torch.Generator().manual_seed(1)
    args = fused_args(b, t, v)
    del args["logits"]
    args.update(hidden=torch.randn(b, t, d, generator=g), weight=torch.randn(v, d, generator=g))
    args.update(changes)
    positional = [args.pop(k) for k in ("hidden", "weight", "targets", "old_logp", "advantages", "mask")]
    return ck.fused_linear_calibrl_loss(*positional, **args)


# ------------------------------------------------------------------ refused inputs: (call, error, message parts)
BAD = {
    # zero-width sizes that have no meaning
    "fused V=0": (lambda: call_fused(v=0), ValueError, ("logits", "V = 0")),
    "linear V=0": (lambda: call_linear(v=0), ValueError, ("weight", "V = 0")),
    "linear D=0": (lambda: call_linear(d=0), ValueError, ("hidden", "D >= 1", "D = 0", "(2, 5, 0)")),
    "linear flat D=0": (
        lambda: ck.linear_token_logprobs(torch.zeros(3, 0), torch.zeros(V, 0), torch.zeros(3, dtype=torch.long)),
        ValueError,
        ("hidden", "D = 0", "(3, 0)"),
    ),
    "linear N=0, D=0": (
        lambda: ck.linear_token_logprobs(torch.zeros(0, 0), torch.zeros(V, 0), torch.zeros(0, dtype=torch.long)),
        ValueError,
        ("hidden", "D = 0"),
    ),
    "token_logprobs V=0": (
        lambda: ck.token_logprobs(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)),
        ValueError,
        ("logits", "V = 0"),
    ),
    "group_advantages B=0": (
        lambda: ck.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)),
        ValueError,
        ("scores", "B = 0"),
    ),
    "fused scores path B=0": (
        lambda: call_fused(
            b=0, advantages=None, scores=torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long), config=GRPO
        ),
        ValueError,
        ("scores", "B = 0"),
    ),
    # shape errors name the input at fault
    "mask (2, 4)": (
        lambda: call_fused(mask=torch.ones(B, 4)),
        ValueError,
        ("mask:", "(2, 5)", "like old_logp", "(2, 4)"),
    ),
    "mask (3, 5)": (lambda: call_fused(mask=torch.ones(3, T)), ValueError, ("mask:", "(2, 5)", "(3, 5)")),
    "old_logp": (lambda: call_fused(old_logp=torch.zeros(B, 4)), ValueError, ("old_logp:", "like targets", "(2, 4)")),
    "targets": (
        lambda: call_fused(targets=torch.zeros(B, 4, dtype=torch.long)),
        ValueError,
        ("targets:", "(2, 5)", "(2, 4)"),
    ),
    "advantages": (lambda: call_fused(advantages=torch.zeros(3)), ValueError, ("advantages:", "(2,)", "(3,)")),
    "expert_logp": (
        lambda: call_fused(expert_logp=torch.zeros(B, 4)),
        ValueError,
        ("expert_logp:", "(2, 5)", "(2, 4)"),
    ),
    "passed": (lambda: call_fused(passed=torch.tensor([True])), ValueError, ("passed:", "(2,)", "(1,)")),
    "is_expert": (lambda: call_fused(is_expert=torch.tensor([True])), ValueError, ("is_expert:", "(2,)", "(1,)")),
    "expert_mask": (
        lambda: call_fused(expert_mask=torch.ones(B, 4, dtype=torch.bool)),
        ValueError,
        ("expert_mask:", "(2, 5)", "(2, 4)"),
    ),
    "scores": (
        lambda: call_fused(advantages=None, scores=torch.zeros(3), group_ids=torch.tensor([0, 0])),
        ValueError,
        ("scores:", "(2,)", "(3,)"),
    ),
    "group_ids": (
        lambda: call_fused(advantages=None, scores=torch.zeros(2), group_ids=torch.tensor([0])),
        ValueError,
        ("group_ids:", "(2,)", "(1,)"),
    ),
    "linear weight D": (
        lambda: call_linear(weight=torch.zeros(V, 3)),
        ValueError,
        ("weight:", "D = hidden.shape[-1] = 4", "(7, 3)"),
    ),
    "linear bias": (lambda: call_linear(bias=torch.zeros(V + 1)), ValueError, ("bias:", "(7,)", "(8,)")),
    "linear mask": (lambda: call_linear(mask=torch.ones(B, 4)), ValueError, ("mask:", "(2, 5)", "(2, 4)")),
    # numeric arguments: bools, strings, NaN / inf refused
    "temperature bool": (
        lambda: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=True),
        ValueError,
        ("temperature", "> 0", "True"),
    ),
    "temperature str": (
        lambda: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature="1"),
        ValueError,
        ("temperature", "'1'"),
    ),
    "temperature np.nan": (
        lambda: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=np.float32("nan")),
        ValueError,
        ("temperature", "> 0"),
    ),
    "temperature np.bool_": (
        lambda: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=np.bool_(True)),
        ValueError,
        ("temperature",),
    ),
    "temperature np 0": (
        lambda: ck.linear_token_logprobs(
            torch.zeros(2, D), torch.zeros(V, D), torch.zeros(2, dtype=torch.long), temperature=np.float64(0.0)
        ),
        ValueError,
        ("temperature", "> 0"),
    ),
    "ignore_index float": (
        lambda: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), ignore_index=np.float32(1)),
        TypeError,
        ("ignore_index", "int"),
    ),
    "eps np.inf": (
        lambda: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), eps=np.float64("inf")),
        ValueError,
        ("eps",),
    ),
    "pass_threshold nan": (
        lambda: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), pass_threshold=np.float32("nan")),
        ValueError,
        ("pass_threshold", "finite"),
    ),
    "pass_threshold str": (
        lambda: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), pass_threshold="0.1"),
        ValueError,
        ("pass_threshold", "'0.1'"),
    ),
    "num_groups np.float": (
        lambda: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), num_groups=np.float32(1)),
        TypeError,
        ("num_groups",),
    ),
}


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_the_argument(case, backend):
    call, error, parts = BAD[case]
    with pytest.raises(error) as excinfo:
        call()
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ------------------------------------------------------------------ defined zero-size cases
@pytest.mark.parametrize("b, t", [(0, T), (B, 0), (0, 0)])
@pytest.mark.parametrize("op", ["fused", "linear"])
def test_empty_batch_gives_zero_loss_and_empty_gradients(op, b, t, backend):
    g = torch.Generator().manual_seed(2)
    if op == "fused":
        leaf = torch.randn(b, t, V, generator=g, requires_grad=True)
        out = call_fused(b=b, t=t, logits=leaf)
        leaves = [leaf]
    else:
        hidden = torch.randn(b, t, D, generator=g, requires_grad=True)
        weight = torch.randn(V, D, generator=g, requires_grad=True)
        out = call_linear(b=b, t=t, hidden=hidden, weight=weight)
        leaves = [hidden, weight]
    truth = ck.calibrl_loss(
        torch.zeros(b, t),
        torch.zeros(b, t),
        torch.zeros(b),
        torch.ones(b, t),
        expert_logp=torch.zeros(b, t),
        passed=torch.zeros(b, dtype=torch.bool),
    )
    assert float(out.loss.detach()) == float(truth.loss) == 0.0
    assert float(out.pg_loss) == 0.0 and float(out.guide_loss) == 0.0
    out.loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape
        assert torch.all(leaf.grad == 0)


@pytest.mark.parametrize("op", ["token_logprobs", "linear_token_logprobs"])
def test_zero_rows_give_empty_logprobs(op, backend):
    targets = torch.zeros(0, dtype=torch.long)
    if op == "token_logprobs":
        logp, entropy = ck.token_logprobs(torch.zeros(0, V), targets, return_entropy=True)
    else:
        logp, entropy = ck.linear_token_logprobs(torch.zeros(0, D), torch.zeros(V, D), targets, return_entropy=True)
    assert logp.shape == entropy.shape == (0,)
    assert logp.dtype == entropy.dtype == torch.float32


# ------------------------------------------------------------------ NumPy scalars and ints accepted
NUMBERS = {"np.float32": np.float32, "np.float64": np.float64, "int": int, "np.int64": np.int64}


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("kind", sorted(NUMBERS))
def test_numpy_scalars_and_ints_are_accepted(kind, backend):
    make = NUMBERS[kind]
    integral = kind in ("int", "np.int64")
    temperature = make(2) if integral else make(0.7)
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(3, V, generator=g), torch.randint(0, V, (3,), generator=g)
    got = ck.token_logprobs(logits, targets, temperature=temperature, ignore_index=np.int64(-100))
    want = ck.token_logprobs(logits, targets, temperature=float(temperature))
    torch.testing.assert_close(got, want)
    hidden, weight = torch.randn(3, D, generator=g), torch.randn(V, D, generator=g)
    got = ck.linear_token_logprobs(hidden, weight, targets, temperature=temperature)
    torch.testing.assert_close(got, ck.linear_token_logprobs(hidden, weight, targets, temperature=float(temperature)))
    stats = ck.group_advantages(
        torch.tensor([0.0, 1.0, 0.5]),
        torch.tensor([0, 0, 1]),
        eps=make(1) if integral else make(1e-6),
        pass_threshold=make(0) if integral else make(0.2),
        num_groups=np.int64(2),
    )
    assert stats.passed.tolist() == [False, True, True]  # 1.0 and 0.5 > threshold (0 or 0.2)
    config = CalibRLConfig(
        mode="grpo",
        clip_low=make(0) if integral else make(0.2),
        temperature=temperature,
        dual_clip_c=make(3),
        entropy_coef=make(0),
        loss_scale_factor=make(4),
    )
    assert all(
        type(getattr(config, f)) is float for f in ("clip_low", "temperature", "dual_clip_c", "loss_scale_factor")
    )
    out = call_fused(config=config)
    want = call_fused(
        config=CalibRLConfig(
            mode="grpo", clip_low=float(config.clip_low), temperature=float(temperature), loss_scale_factor=4.0
        )
    )
    torch.testing.assert_close(out.loss, want.loss)


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_low", True),
        ("guide_coef", "0.1"),
        ("temperature", np.float32("nan")),
        ("temperature", np.float64("inf")),
        ("clip_high", np.bool_(False)),
        ("loss_scale_factor", np.float32("inf")),
        ("loss_scale_factor", True),
    ],
)
def test_config_still_refuses_bools_strings_and_non_finite(field, value):
    with pytest.raises(ValueError, match=f"CalibRLConfig.{field}"):
        CalibRLConfig(**{field: value})


# ------------------------------------------------------------------ argument x numeric type
KINDS = {
    "python int": 2,
    "numpy int": np.int32(2),
    "numpy float": np.float64(0.5),
    "bool": True,
    "huge int": 2**70,
    "huger int": 2**1100,
    "nan": float("nan"),
    "inf": float("inf"),
}
# {kind: expected exception type or None (accepted)} of an integer argument and of a real-number argument
INTEGER_ARGUMENT = {
    "python int": None,
    "numpy int": None,
    "numpy float": TypeError,
    "bool": TypeError,
    "huge int": ValueError,
    "huger int": ValueError,
    "nan": TypeError,
    "inf": TypeError,
}
REAL_ARGUMENT = {
    "python int": None,
    "numpy int": None,
    "numpy float": None,
    "bool": ValueError,
    "huge int": None,
    "huger int": ValueError,
    "nan": ValueError,
    "inf": ValueError,
}
# argument -> (call(value), expectations); every error names the argument
ARGUMENTS = {
    "ignore_index": (
        lambda v: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), ignore_index=v),
        INTEGER_ARGUMENT,
    ),
    "temperature": (
        lambda v: ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=v),
        REAL_ARGUMENT,
    ),
    "eps": (
        lambda v: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), eps=v),
        REAL_ARGUMENT,
    ),
    "pass_threshold": (
        lambda v: ck.group_advantages(torch.zeros(2), torch.tensor([0, 0]), pass_threshold=v),
        REAL_ARGUMENT,
    ),
    "num_groups": (
        lambda v: ck.group_advantages(torch.zeros(2), torch.tensor([0, 1]), num_groups=v),
        INTEGER_ARGUMENT,
    ),
    "CalibRLConfig.clip_high": (
        lambda v: CalibRLConfig(clip_high=v),
        REAL_ARGUMENT,
    ),
    "CalibRLConfig.loss_scale_factor": (
        lambda v: CalibRLConfig(loss_scale_factor=v),
        REAL_ARGUMENT,
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("argument", sorted(ARGUMENTS))
def test_every_numeric_argument_takes_or_refuses_each_numeric_type(argument, kind):
    call, expected = ARGUMENTS[argument]
    error = expected[kind]
    if error is None:
        call(KINDS[kind])
        return
    with pytest.raises(error) as excinfo:
        call(KINDS[kind])
    assert argument in str(excinfo.value)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_module_ignore_index_accepts_exactly_what_the_op_accepts(kind, backend):
    value = KINDS[kind]
    args = fused_args()
    positional = [args.pop(k) for k in ("logits", "targets", "old_logp", "advantages", "mask")]
    try:
        functional = ck.fused_calibrl_loss(*positional, ignore_index=value, **args)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error), match="ignore_index"):
            ck.CalibRLLoss(ignore_index=value)
        with pytest.raises(type(error), match="ignore_index"):
            ck.LinearCalibRLLoss(ignore_index=value)
        return
    module = ck.CalibRLLoss(ignore_index=value)
    assert type(module.ignore_index) is int
    torch.testing.assert_close(module(*positional, **args).loss, functional.loss)
