"""Bad input gets a clear ValueError / TypeError naming the argument, the expected and the actual value."""

import pytest
import torch

import calibrl_kernels as ck
from calibrl_kernels import CalibRLConfig, _checks, _dispatch

B, T, V, D = 3, 4, 7, 5


def loss_args(**changes):
    args = dict(
        logp=-torch.rand(B, T),
        old_logp=-torch.rand(B, T),
        advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
        expert_logp=-torch.rand(B, T),
        passed=torch.tensor([True, False, True]),
        is_expert=torch.tensor([False, False, True]),
    )
    args.update(changes)
    return args


def call_loss(**changes):
    args = loss_args(**changes)
    positional = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    return ck.calibrl_loss(*positional, **args)


def assert_message(excinfo, *parts):
    message = str(excinfo.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ------------------------------------------------------------------ token_logprobs
@pytest.mark.parametrize(
    "logits, targets, error, parts",
    [
        ([[0.0, 1.0]], torch.tensor([0]), TypeError, ("logits", "torch.Tensor", "list")),
        (
            torch.zeros(2, V, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            TypeError,
            ("logits", "floating", "int64"),
        ),
        (torch.zeros(V), torch.zeros((), dtype=torch.long), ValueError, ("logits", "(N, V) or (B, T, V)", "1-d")),
        (torch.zeros(2, V), torch.zeros(3, dtype=torch.long), ValueError, ("targets", "(2,)", "(3,)")),
        (torch.zeros(2, V), torch.zeros(2), TypeError, ("targets", "integer", "float32")),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), ValueError, ("logits", "V = 0")),
        (torch.zeros(2, V), torch.tensor([0, V]), ValueError, ("targets", f"[0, {V})", f"got {V}", "position 1")),
        (torch.zeros(2, V), torch.tensor([-1, 0]), ValueError, ("targets", "ignore_index=-100", "got -1")),
        (torch.zeros(2, V), torch.zeros(2, dtype=torch.long, device="meta"), ValueError, ("targets", "cpu", "meta")),
    ],
)
def test_token_logprobs_bad_inputs(logits, targets, error, parts):
    with pytest.raises(error) as excinfo:
        ck.token_logprobs(logits, targets)
    assert_message(excinfo, *parts)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError) as excinfo:
        ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), temperature=temperature)
    assert_message(excinfo, "temperature", "> 0")


def test_bad_ignore_index_type():
    with pytest.raises(TypeError, match="ignore_index"):
        ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), ignore_index=1.5)


def test_value_checks_can_be_switched_off(monkeypatch):
    scores, group_ids, is_expert = torch.zeros(3), torch.tensor([0, 0, 1]), torch.tensor([False, False, True])
    with pytest.raises(ValueError, match="at least one on-policy row"):
        ck.group_advantages(scores, group_ids, is_expert=is_expert)
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "0")  # no device sync: the caller vouches for the values
    stats = ck.group_advantages(scores, group_ids, is_expert=is_expert)
    assert stats.count.tolist() == [2, 0]


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize(
    "hidden, weight, bias, error, parts",
    [
        (
            torch.zeros(2, D),
            torch.zeros(V, D + 1),
            None,
            ValueError,
            ("weight", f"D = hidden.shape[-1] = {D}", f"({V}, {D + 1})"),
        ),
        (
            torch.zeros(2, D),
            torch.zeros(V, D, dtype=torch.float64),
            None,
            TypeError,
            ("weight", "torch.float32", "torch.float64"),
        ),
        (torch.zeros(2, D), torch.zeros(V, D), torch.zeros(V + 1), ValueError, ("bias", f"({V},)", f"({V + 1},)")),
        (torch.zeros(2, D), torch.zeros(V), None, ValueError, ("weight", "(V, D)", "1-d")),
        (torch.zeros(2, D), torch.zeros(0, D), None, ValueError, ("weight", "V = 0")),
        (
            torch.zeros(2, D),
            torch.zeros(V, D),
            torch.zeros(V, dtype=torch.float64),
            TypeError,
            ("bias", "torch.float32", "torch.float64"),
        ),
        (torch.zeros(2, D), torch.zeros(V, D, device="meta"), None, ValueError, ("weight", "cpu", "meta")),
        (torch.zeros(2, D), torch.zeros(V, D), torch.zeros(V, device="meta"), ValueError, ("bias", "cpu", "meta")),
    ],
)
def test_linear_bad_inputs(hidden, weight, bias, error, parts):
    with pytest.raises(error) as excinfo:
        ck.linear_token_logprobs(hidden, weight, torch.zeros(2, dtype=torch.long), bias=bias)
    assert_message(excinfo, *parts)


def test_linear_targets_on_another_device():
    with pytest.raises(ValueError) as excinfo:
        ck.linear_token_logprobs(torch.zeros(2, D), torch.zeros(V, D), torch.zeros(2, dtype=torch.long, device="meta"))
    assert_message(excinfo, "targets", "cpu", "meta")


@pytest.mark.parametrize("call", ["token", "linear", "baseline"])
def test_flag_arguments_must_be_bools(call):
    with pytest.raises(TypeError) as excinfo:
        if call == "token":
            ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long), return_entropy="no")
        elif call == "linear":
            ck.linear_token_logprobs(
                torch.zeros(2, D), torch.zeros(V, D), torch.zeros(2, dtype=torch.long), return_entropy=1
            )
        else:
            ck.expert_baseline(
                torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0, 0]), torch.tensor([True, False]), return_mask="no"
            )
    assert_message(excinfo, "expected a bool")


# ------------------------------------------------------------------ group statistics
@pytest.mark.parametrize(
    "scores, group_ids, is_expert, error, parts",
    [
        (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), None, ValueError, ("scores", "(B,)", "2-d")),
        (torch.zeros(3), torch.zeros(3), None, TypeError, ("group_ids", "integer", "float32")),
        (torch.zeros(3), torch.zeros(4, dtype=torch.long), None, ValueError, ("group_ids", "(3,)", "(4,)")),
        (
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3),
            TypeError,
            ("is_expert", "torch.bool", "float32"),
        ),
        (
            torch.zeros(3),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(2, dtype=torch.bool),
            ValueError,
            ("is_expert", "(3,)", "(2,)"),
        ),
        (torch.zeros(0), torch.zeros(0, dtype=torch.long), None, ValueError, ("scores", "B = 0")),
        (
            torch.zeros(3),
            torch.tensor([0, 0, 1]),
            torch.tensor([False, False, True]),
            ValueError,
            ("is_expert", "at least one on-policy row", "group ids [1]"),
        ),
    ],
)
def test_group_advantages_bad_inputs(scores, group_ids, is_expert, error, parts):
    with pytest.raises(error) as excinfo:
        ck.group_advantages(scores, group_ids, is_expert=is_expert)
    assert_message(excinfo, *parts)


@pytest.mark.parametrize(
    "kwargs, error, parts",
    [
        (dict(eps=0.0), ValueError, ("eps", "> 0", "0.0")),
        (dict(eps=float("nan")), ValueError, ("eps", "> 0", "nan")),
        (dict(norm_by_std="no"), TypeError, ("norm_by_std", "bool", "'no'")),
        (dict(pass_threshold="0.1"), ValueError, ("pass_threshold", "finite number", "'0.1'")),
        (dict(pass_threshold=float("nan")), ValueError, ("pass_threshold", "finite number", "nan")),
        (dict(num_groups=3), ValueError, ("num_groups", "[1, B = 2]", "3")),
        (dict(num_groups=2.0), TypeError, ("num_groups", "int", "float")),
    ],
)
def test_group_advantages_bad_options(kwargs, error, parts):
    with pytest.raises(error) as excinfo:
        ck.group_advantages(torch.zeros(2), torch.tensor([0, 1]), **kwargs)
    assert_message(excinfo, *parts)


def test_group_inputs_on_another_device():
    with pytest.raises(ValueError) as excinfo:
        ck.group_advantages(torch.zeros(2), torch.tensor([0, 1], device="meta"))
    assert_message(excinfo, "group_ids", "cpu", "meta")
    with pytest.raises(ValueError) as excinfo:
        ck.group_advantages(
            torch.zeros(2), torch.tensor([0, 1]), is_expert=torch.zeros(2, dtype=torch.bool, device="meta")
        )
    assert_message(excinfo, "is_expert", "cpu", "meta")


@pytest.mark.parametrize(
    "is_expert, parts",
    [
        (torch.tensor([True, True, False, True]), ("is_expert", "exactly one expert row", "got 2 in group 0")),
        (torch.tensor([False, False, False, True]), ("is_expert", "exactly one expert row", "got 0 in group 0")),
    ],
)
def test_expert_baseline_needs_one_expert_per_group(is_expert, parts):
    with pytest.raises(ValueError) as excinfo:
        ck.expert_baseline(torch.zeros(4, 2), torch.ones(4, 2), torch.tensor([0, 0, 1, 1]), is_expert)
    assert_message(excinfo, *parts)


def test_expert_baseline_bad_kind_and_shapes():
    with pytest.raises(ValueError, match="kind"):
        ck.expert_baseline(
            torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([0, 0]), torch.tensor([True, False]), kind="token"
        )
    with pytest.raises(ValueError) as excinfo:
        ck.expert_baseline(torch.zeros(2, 2), torch.ones(2, 3), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert_message(excinfo, "mask", "(2, 2)", "(2, 3)")


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize(
    "changes, error, parts",
    [
        (dict(old_logp=torch.zeros(B, T + 1)), ValueError, ("old_logp", f"({B}, {T})", f"({B}, {T + 1})")),
        (dict(mask=torch.ones(1, T)), ValueError, ("mask", f"({B}, {T})", f"(1, {T})")),
        (
            dict(mask=torch.ones(B, T, dtype=torch.complex64)),
            TypeError,
            ("mask", "0/1 or non-negative weights", "complex64"),
        ),
        (dict(mask=-torch.ones(B, T)), ValueError, ("mask", "non-negative finite weights", "got -1.0")),
        (dict(mask=torch.full((B, T), float("nan"))), ValueError, ("mask", "non-negative finite weights", "nan")),
        (
            dict(expert_mask=torch.ones(B, T + 1, dtype=torch.bool)),
            ValueError,
            ("expert_mask", f"({B}, {T})", f"({B}, {T + 1})"),
        ),
        (dict(expert_mask=torch.ones(B, T, dtype=torch.complex64)), TypeError, ("expert_mask", "mask", "complex64")),
        (dict(advantages=torch.zeros(B + 1)), ValueError, ("advantages", f"({B},)", f"({B + 1},)")),
        (dict(advantages=torch.zeros(B, dtype=torch.long)), TypeError, ("advantages", "floating", "int64")),
        (dict(expert_logp=torch.zeros(T)), ValueError, ("expert_logp", "(B, T)", f"({T},)")),
        (dict(passed=torch.tensor([1, 0, 1])), TypeError, ("passed", "torch.bool", "int64")),
        (dict(passed=torch.tensor([True, False])), ValueError, ("passed", f"({B},)", "(2,)")),
        (dict(is_expert=torch.tensor([False] * (B + 2))), ValueError, ("is_expert", f"({B},)", f"({B + 2},)")),
        (dict(expert_logp=None), ValueError, ("expert_logp", "required", "expert_baseline")),
        (dict(passed=None), ValueError, ("passed", "required")),
        (dict(logp=-torch.rand(B, T, 1)), ValueError, ("logp", "(B, T)", "3-d")),
        (dict(logp=torch.zeros(B, T, dtype=torch.long)), TypeError, ("logp", "floating", "int64")),
        (dict(entropy=torch.zeros(B, T + 1)), ValueError, ("entropy", f"({B}, {T})", f"({B}, {T + 1})")),
        (dict(old_logp=torch.zeros(B, T, device="meta")), ValueError, ("old_logp", "cpu", "meta")),
    ],
)
def test_calibrl_loss_bad_inputs(changes, error, parts):
    with pytest.raises(error) as excinfo:
        call_loss(**changes)
    assert_message(excinfo, *parts)


def test_loss_option_dependencies():
    with pytest.raises(ValueError, match="expert_mask: required when config.mask_beyond_expert"):
        call_loss(config=CalibRLConfig(mask_beyond_expert=True))
    with pytest.raises(ValueError, match="entropy: required when config.entropy_coef"):
        call_loss(config=CalibRLConfig(entropy_coef=0.01))
    with pytest.raises(TypeError, match="config: expected a CalibRLConfig"):
        call_loss(config={"mode": "calibrl"})
    call_loss(expert_logp=None, passed=None, config=CalibRLConfig(mode="grpo"))  # grpo needs neither


def test_fused_loss_bad_inputs():
    logits = torch.zeros(B, T, V)
    targets = torch.zeros(B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="give either advantages"):
        ck.fused_calibrl_loss(logits, targets, torch.zeros(B, T), None, torch.ones(B, T))
    with pytest.raises(ValueError) as excinfo:
        ck.fused_calibrl_loss(
            logits, targets, torch.zeros(B, T + 1), torch.zeros(B), torch.ones(B, T), config=CalibRLConfig(mode="grpo")
        )
    assert_message(excinfo, "old_logp", f"({B}, {T})", f"({B}, {T + 1})")
    with pytest.raises(ValueError, match="logits: expected shape"):
        ck.fused_calibrl_loss(
            logits[0], targets[0], torch.zeros(T), torch.zeros(T), torch.ones(T), config=CalibRLConfig(mode="grpo")
        )
    with pytest.raises(ValueError, match="expert_logp: required for mode='calibrl'; pass it, or pass group_ids"):
        ck.fused_calibrl_loss(
            logits, targets, torch.zeros(B, T), torch.zeros(B), torch.ones(B, T), passed=torch.ones(B, dtype=torch.bool)
        )
    grpo = CalibRLConfig(mode="grpo")

    def grpo_loss(advantages, **group_fields):
        return ck.fused_calibrl_loss(
            logits, targets, torch.zeros(B, T), advantages, torch.ones(B, T), config=grpo, **group_fields
        )

    with pytest.raises(ValueError) as excinfo:  # checked even when advantages make them unnecessary
        grpo_loss(torch.zeros(B), scores=torch.zeros(B + 1))
    assert_message(excinfo, "scores", f"({B},)", f"({B + 1},)")
    with pytest.raises(TypeError) as excinfo:
        grpo_loss(None, scores=torch.zeros(B), group_ids=torch.zeros(B))
    assert_message(excinfo, "group_ids", "integer", "float32")
    with pytest.raises(ValueError) as excinfo:
        grpo_loss(None, scores=torch.zeros(B, T), group_ids=torch.zeros(B, dtype=torch.long))
    assert_message(excinfo, "scores", f"({B},)", f"({B}, {T})")
    hidden, weight = torch.zeros(B, T, D), torch.zeros(V, D)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        ck.fused_linear_calibrl_loss(
            hidden[0],
            weight,
            targets[0],
            torch.zeros(T),
            torch.zeros(T),
            torch.ones(T),
            config=CalibRLConfig(mode="grpo"),
        )


def test_fused_ops_pass_num_groups_to_group_statistics():
    logits = torch.randn(4, 2, V)
    targets = torch.randint(0, V, (4, 2))
    args = (logits, targets, -torch.rand(4, 2), None, torch.ones(4, 2))
    kwargs = dict(
        scores=torch.tensor([1.0, 0.0, 1.0, 1.0]),
        group_ids=torch.tensor([5, 5, 9, 9]),
        config=CalibRLConfig(mode="grpo"),
    )
    same = ck.fused_calibrl_loss(*args, num_groups=2, **kwargs)
    torch.testing.assert_close(same.loss, ck.fused_calibrl_loss(*args, **kwargs).loss)
    with pytest.raises(ValueError, match=r"num_groups: expected the number of distinct group_ids \(2\), got 3"):
        ck.fused_calibrl_loss(*args, num_groups=3, **kwargs)


# ------------------------------------------------------------------ environment variables
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("0", False),
        ("false", False),
        ("OFF", False),
        ("no", False),
        ("1", True),
        ("True", True),
        ("on", True),
        ("", True),
    ],
)
def test_value_checks_flag_words(monkeypatch, raw, expected):
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", raw)
    assert _checks.value_checks_enabled() is expected


def test_unknown_flag_word_is_an_error(monkeypatch):
    monkeypatch.setenv("CALIBRL_VALUE_CHECKS", "maybe")
    with pytest.raises(ValueError, match="CALIBRL_VALUE_CHECKS: expected one of .* got 'maybe'"):
        _checks.value_checks_enabled()


# ------------------------------------------------------------------ dispatch
def test_bad_calibrl_impl_value(monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", "cuda")
    with pytest.raises(ValueError, match="CALIBRL_IMPL: expected one of"):
        ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long))


def test_forcing_the_torch_backend(monkeypatch):
    monkeypatch.setenv("CALIBRL_IMPL", "torch")
    assert _dispatch.selected_impl("token_logprobs", torch.device("cpu")) == "torch"
    out = ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, torch.full((2,), -torch.log(torch.tensor(float(V)))))


def test_forcing_an_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(_dispatch, "availability", lambda name, device: (name == "torch", "not built here"))
    monkeypatch.setenv("CALIBRL_IMPL", "cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' was requested but cannot run on cpu: not built here"):
        ck.token_logprobs(torch.zeros(2, V), torch.zeros(2, dtype=torch.long))
