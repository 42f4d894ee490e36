"""Input validation for every public op, in one place.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, device or
value) with a message that names the argument and states what was expected and what was given.
Nothing is broadcast or truncated silently: per-row tensors must have exactly B rows, per-token
tensors exactly (B, T).

Checks on tensor *values* (targets in range, masks non-negative, every group has an on-policy row)
read the data and so synchronise a GPU with the host; set ``CALIBRL_VALUE_CHECKS=0`` to skip only
those in hot loops.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Sequence

import torch

from .config import CalibRLConfig, LossInputs

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (any case); unset -> default."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{name}: expected one of {_TRUE_WORDS + _FALSE_WORDS}, got {raw!r}")


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values (and synchronise the device) run (CALIBRL_VALUE_CHECKS).

    Never inside a ``torch.compile`` region: reading a value there would break the graph (run a step
    eagerly to have the inputs checked)."""
    if torch.compiler.is_compiling():
        return False
    return env_flag("CALIBRL_VALUE_CHECKS", True)


def check_bool_argument(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def is_real_number(value) -> bool:
    """A real scalar: Python int / float or a NumPy integer / floating scalar; never a bool (np.bool_ is no Real)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_float(name: str, value) -> float:
    """value (int, float, np.float32, np.int64, ...) as a Python float; bools, strings, tensors refused.

    An int too large for a float (e.g. 2**1100) is refused with a ValueError naming the argument
    (float() itself would raise a bare OverflowError)."""
    if not is_real_number(value):
        raise ValueError(f"{name}: expected a finite number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a finite number, got an int too large for a float ({value!r})") from None


INT64_RANGE = (-(2**63), 2**63 - 1)


def as_int(name: str, value) -> int:
    """value (int or NumPy integer scalar) as a Python int in the int64 range; bools and floats refused.

    Every kernel takes integer arguments as int64: a larger int (e.g. 2**70) is refused here with a
    ValueError naming the argument, instead of an OverflowError deep inside a backend."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    number = int(value)
    if not INT64_RANGE[0] <= number <= INT64_RANGE[1]:
        raise ValueError(f"{name}: expected an int in the int64 range [-2**63, 2**63 - 1], got {number}")
    return number


def check_finite_number(name: str, value) -> float:
    """A finite real number (Python or NumPy scalar); returns it as a Python float."""
    number = as_float(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return number


def require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float32, bfloat16, float16 or float64), got {t.dtype}")


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_integer(name: str, t: torch.Tensor) -> None:
    if t.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype (int64, int32, int16, int8 or uint8), got {t.dtype}")


def check_bool(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {t.dtype}")


def check_mask_dtype(name: str, t: torch.Tensor) -> None:
    """Masks are 0/1 (bool, integer or floating) or non-negative floating token weights."""
    if t.dtype != torch.bool and t.dtype not in FLOAT_DTYPES and t.dtype not in INTEGER_DTYPES:
        raise TypeError(
            f"{name}: expected a bool, integer or floating mask (0/1 or non-negative weights), got {t.dtype}"
        )


def check_mask_values(name: str, t: torch.Tensor) -> None:
    """A mask's entries are token weights: finite and >= 0 (a value check)."""
    if not value_checks_enabled() or t.dtype == torch.bool or t.numel() == 0:
        return
    bad = (t < 0) | ~torch.isfinite(t) if t.is_floating_point() else t < 0
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: expected 0/1 or non-negative finite weights, got {t[where].item()} at {where}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str, like: Optional[str] = None) -> None:
    """t.shape == expected; the message names t, the symbolic and actual expected shape and (like) its source."""
    if tuple(t.shape) != tuple(expected):
        source = f" (like {like})" if like else ""
        raise ValueError(f"{name}: expected shape {what} = {tuple(expected)}{source}, got {tuple(t.shape)}")


def check_ndim(name: str, t: torch.Tensor, allowed: Sequence[int], what: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name}: expected {what}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def check_token_batch(name: str, t: torch.Tensor, what: str) -> None:
    """The main input of a fused loss op: B rows of T tokens, what = "(B, T, V)" (logits) or "(B, T, D)" (hidden)."""
    if t.dim() != 3:
        raise ValueError(f"{name}: expected shape {what}, got {tuple(t.shape)}")


def check_device(name: str, t: torch.Tensor, device: torch.device, reference_name: str) -> None:
    if t.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the device of {reference_name}), got one on {t.device}"
        )


def check_positive_number(name: str, value) -> float:
    """A finite real number > 0 (Python or NumPy scalar); returns it as a Python float."""
    number = as_float(name, value) if is_real_number(value) else math.nan
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return number


def token_ids(targets: torch.Tensor) -> torch.Tensor:
    """Integer targets of any dtype as int64 (no copy for int64).

    Every backend compares targets with ignore_index and V as integers, never in the targets' own
    dtype: uint8 targets compared with -100 in uint8 would wrap it to 156 (token 156 ignored), and
    ``targets >= 300`` would wrap 300. An ignore_index outside the dtype's range (the default -100 with
    uint8 targets) therefore matches no target: nothing is ignored, on every backend."""
    return targets.long()


def check_targets(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """targets must lie in [0, V) or equal ignore_index (compared as int64, see token_ids)."""
    if not value_checks_enabled() or targets.numel() == 0:
        return
    targets = token_ids(targets)
    bad = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0]) if bad.dim() == 1 else tuple(bad.nonzero()[0].tolist())
        value = int(targets[first])
        raise ValueError(
            f"targets: expected values in [0, {vocab_size}) or ignore_index={ignore_index}, "
            f"got {value} at position {first}"
        )


def check_token_logprobs_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature, ignore_index) -> None:
    require_tensor("logits", logits)
    require_tensor("targets", targets)
    check_floating("logits", logits)
    check_integer("targets", targets)
    check_ndim("logits", logits, (2, 3), "(N, V) or (B, T, V)")
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    check_device("targets", targets, logits.device, "logits")
    if logits.shape[-1] == 0:
        raise ValueError("logits: expected a vocabulary of at least one entry, got V = 0")
    check_positive_number("temperature", temperature)
    ignore_index = as_int("ignore_index", ignore_index)
    check_targets(targets, logits.shape[-1], ignore_index)


def check_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias, temperature, ignore_index
) -> None:
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    require_tensor("targets", targets)
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    check_integer("targets", targets)
    check_ndim("hidden", hidden, (2, 3), "(N, D) or (B, T, D)")
    check_ndim("weight", weight, (2,), "(V, D)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: expected a vocabulary of at least one row, got V = 0")
    if hidden.shape[-1] == 0:
        raise ValueError(
            f"hidden: expected a hidden size D >= 1 (shape (N, D) or (B, T, D)), "
            f"got D = 0 in shape {tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    check_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    check_device("weight", weight, hidden.device, "hidden")
    check_device("targets", targets, hidden.device, "hidden")
    if bias is not None:
        require_tensor("bias", bias)
        check_floating("bias", bias)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected the dtype of weight ({weight.dtype}), got {bias.dtype}")
        check_shape("bias", bias, (weight.shape[0],), "(V,)")
        check_device("bias", bias, hidden.device, "hidden")
    check_positive_number("temperature", temperature)
    ignore_index = as_int("ignore_index", ignore_index)
    check_targets(targets, weight.shape[0], ignore_index)


def check_group_inputs(scores: torch.Tensor, group_ids: torch.Tensor, is_expert: Optional[torch.Tensor]) -> None:
    require_tensor("scores", scores)
    require_tensor("group_ids", group_ids)
    check_floating("scores", scores)
    check_ndim("scores", scores, (1,), "(B,)")
    check_integer("group_ids", group_ids)
    check_shape("group_ids", group_ids, scores.shape, "(B,) like scores")
    check_device("group_ids", group_ids, scores.device, "scores")
    if scores.numel() == 0:
        raise ValueError("scores: expected at least one row, got B = 0")
    if is_expert is not None:
        require_tensor("is_expert", is_expert)
        check_bool("is_expert", is_expert)
        check_shape("is_expert", is_expert, scores.shape, "(B,) like scores")
        check_device("is_expert", is_expert, scores.device, "scores")


def check_every_group_has_on_policy_rows(count: torch.Tensor, group_keys: torch.Tensor) -> None:
    """count (G,): on-policy rows per group. A group made of expert rows only has no statistics."""
    if not value_checks_enabled():
        return
    empty = count == 0
    if bool(empty.any()):
        keys = group_keys[empty][:5].tolist()
        raise ValueError(
            f"is_expert: expected every group to have at least one on-policy row, "
            f"got {int(empty.sum())} group(s) with expert rows only (group ids {keys})"
        )


def check_num_groups_argument(num_groups, batch_size: int) -> None:
    """num_groups, when given, is an int in [1, B] (its agreement with the data is a value check)."""
    if num_groups is None:
        return
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected None or an int, got {type(num_groups).__name__}")
    if not 1 <= int(num_groups) <= batch_size:
        raise ValueError(f"num_groups: expected None or an int in [1, B = {batch_size}], got {num_groups}")


def chunk_bytes_argument(chunk_bytes) -> Optional[int]:
    """chunk_bytes, when given, is a positive int: the chunked path's byte budget per logits chunk."""
    if chunk_bytes is None:
        return None
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Integral):
        raise TypeError(f"chunk_bytes: expected an int (bytes), got {type(chunk_bytes).__name__} {chunk_bytes!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected a positive number of bytes, got {chunk_bytes!r}")
    return int(chunk_bytes)


def check_num_groups(num_groups: int, actual: int) -> None:
    """The num_groups a caller promised must equal the number of distinct group ids."""
    if num_groups != actual:
        raise ValueError(f"num_groups: expected the number of distinct group_ids ({actual}), got {num_groups}")


def check_expert_baseline_inputs(old_logp, mask, group_ids, is_expert) -> None:
    require_tensor("old_logp", old_logp)
    check_floating("old_logp", old_logp)
    check_ndim("old_logp", old_logp, (2,), "(B, T)")
    B = old_logp.shape[0]
    for name, t, what in (("mask", mask, "(B, T)"), ("group_ids", group_ids, "(B,)"), ("is_expert", is_expert, "(B,)")):
        require_tensor(name, t)
        check_shape(name, t, old_logp.shape if what == "(B, T)" else (B,), what, like="old_logp")
        check_device(name, t, old_logp.device, "old_logp")
    check_mask_dtype("mask", mask)
    check_integer("group_ids", group_ids)
    check_bool("is_expert", is_expert)


def check_one_expert_per_group(expert_count: torch.Tensor, group_keys: torch.Tensor) -> None:
    if not value_checks_enabled():
        return
    bad = expert_count != 1
    if bool(bad.any()):
        idx = bad.nonzero()[0, 0]
        raise ValueError(
            f"is_expert: expected exactly one expert row in every group, got {int(expert_count[idx])} "
            f"in group {int(group_keys[idx])} ({int(bad.sum())} group(s) affected)"
        )


def check_optional_group_fields(scores, group_ids, batch_size: int, device: torch.device) -> None:
    """scores / group_ids given to a fused op: (B,) like the batch, whether or not they end up used."""
    if scores is not None:
        require_tensor("scores", scores)
        check_floating("scores", scores)
        check_shape("scores", scores, (batch_size,), "(B,)", like="old_logp.shape[0]")
        check_device("scores", scores, device, "old_logp")
    if group_ids is not None:
        require_tensor("group_ids", group_ids)
        check_integer("group_ids", group_ids)
        check_shape("group_ids", group_ids, (batch_size,), "(B,)", like="old_logp.shape[0]")
        check_device("group_ids", group_ids, device, "old_logp")


def check_config(config) -> None:
    if not isinstance(config, CalibRLConfig):
        raise TypeError(f"config: expected a CalibRLConfig, got {type(config).__name__}")


def check_loss_inputs(
    logp: torch.Tensor,
    inputs: LossInputs,
    *,
    entropy: Optional[torch.Tensor],
    config: CalibRLConfig,
    logp_name: str = "logp",
    computes_entropy: bool = False,
) -> None:
    """Validate the (B, T) / (B,) tensors of the loss (inputs, entropy) against logp's shape and device.

    inputs.ignore_index is not read. Fused ops pass old_logp as ``logp`` (logp_name="old_logp") and
    computes_entropy=True.
    """
    old_logp, advantages, mask, expert_logp, passed, is_expert, expert_mask, _ = inputs
    check_config(config)
    require_tensor(logp_name, logp)
    check_floating(logp_name, logp)
    check_ndim(logp_name, logp, (2,), "(B, T)")
    B, T = logp.shape
    device = logp.device

    def per_token(name, t, floating=True):
        require_tensor(name, t)
        check_shape(name, t, (B, T), "(B, T)", like=logp_name)
        check_device(name, t, device, logp_name)
        if floating:
            check_floating(name, t)

    def per_row(name, t):
        require_tensor(name, t)
        check_shape(name, t, (B,), "(B,)", like=f"{logp_name}.shape[0]")
        check_device(name, t, device, logp_name)
        check_bool(name, t)

    def per_row_or_token(name, t, expected):
        require_tensor(name, t)
        check_floating(name, t)
        if tuple(t.shape) not in ((B,), (B, T)):
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
        check_device(name, t, device, logp_name)

    per_token("old_logp", old_logp)
    per_token("mask", mask, floating=False)
    check_mask_dtype("mask", mask)
    check_mask_values("mask", mask)
    per_row_or_token("advantages", advantages, f"(B,) = {(B,)} or (B, T) = {(B, T)} (like {logp_name})")
    if expert_logp is not None:
        per_row_or_token(
            "expert_logp", expert_logp, f"(B, T) = {(B, T)} (position baseline) or (B,) = {(B,)} (one baseline per row)"
        )
    if passed is not None:
        per_row("passed", passed)
    if is_expert is not None:
        per_row("is_expert", is_expert)
    if entropy is not None:
        per_token("entropy", entropy)
    if expert_mask is not None:
        per_token("expert_mask", expert_mask, floating=False)
        check_mask_dtype("expert_mask", expert_mask)
    if config.uses_guide:
        if expert_logp is None:
            raise ValueError(
                f"expert_logp: required for mode='calibrl' with activation={config.activation!r} "
                "(build it with expert_baseline(old_logp, mask, group_ids, is_expert))"
            )
        if passed is None:
            raise ValueError("passed: required for mode='calibrl' (the (B,) bool pass flags, e.g. GroupStats.passed)")
        if config.mask_beyond_expert and expert_mask is None:
            raise ValueError(
                "expert_mask: required when config.mask_beyond_expert=True "
                "(get it from expert_baseline(..., return_mask=True))"
            )
    if config.entropy_coef != 0.0 and entropy is None and not computes_entropy:
        raise ValueError(f"entropy: required when config.entropy_coef is non-zero ({config.entropy_coef})")
