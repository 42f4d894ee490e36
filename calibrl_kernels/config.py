"""Configuration and result types shared by every implementation of the CalibRL loss.

The semantics are those of the paper (arXiv 2602.20197) and the authors' verl-based code.
``CalibRLConfig`` is frozen and validated on construction: a bad field raises ``ValueError``
or ``TypeError`` naming the field, the allowed values and the value given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from typing import Dict, NamedTuple, Optional

import torch


class AlgorithmPreset(NamedTuple):
    """A named algorithm of the comparison: its loss mode, advantage normalisation, aggregation and summary."""

    mode: str
    norm_by_std: bool  # A = (r - mean) / (std + eps) instead of r - mean
    loss_agg_mode: str
    summary: str  # one line for logs and --help


# The one table of algorithm names: CalibRLConfig.for_algo, the trainer's --algo choices, and the names the
# TRL and verl integrations accept are all derived from it. luffy / rlplus use A = r - mean: std-normalising
# would divide an expert's reward by a zero std when every rollout of a group fails (group statistics
# exclude the expert).
ALGORITHM_PRESETS: Dict[str, AlgorithmPreset] = {
    "calibrl": AlgorithmPreset(
        "calibrl",
        False,
        "token-mean",
        "PPO dual-clip term + LeakyReLU calibration against the expert baseline, A = r - mean",
    ),
    "grpo": AlgorithmPreset(
        "grpo", True, "seq-mean-token-mean", "PPO term on on-policy rows, A = (r - mean) / std, seq-mean-token-mean"
    ),
    "dapo": AlgorithmPreset("dapo", True, "token-mean", "PPO term on on-policy rows, A = (r - mean) / std, token-mean"),
    "drgrpo": AlgorithmPreset(
        "drgrpo", False, "seq-mean-token-sum-norm", "PPO term on on-policy rows, A = r - mean, seq-mean-token-sum-norm"
    ),
    "luffy": AlgorithmPreset(
        "luffy", False, "token-mean", "expert rows trained with LUFFY's shaped term -A p / (p + 0.1), PPO on the rest"
    ),
    "rlplus": AlgorithmPreset(
        "rlplus", False, "token-mean", "expert rows trained with RL-PLUS's term, PPO on the rest"
    ),
    # The longer supervised warm start is the trainer's; the loss is grpo's.
    "sft+grpo": AlgorithmPreset(
        "grpo", True, "seq-mean-token-mean", "a longer supervised stage on expert responses, then grpo"
    ),
}
MODES = tuple(dict.fromkeys(preset.mode for preset in ALGORITHM_PRESETS.values()))  # loss modes, in table order
ACTIVATIONS = ("leaky_relu", "relu", "tanh", "sigmoid", "huber", "none")
BASELINES = ("position", "sequence-mean")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Modes whose loss drops expert rows (they enter only through group statistics and the baseline).
ON_POLICY_ONLY_MODES = ("calibrl", "grpo", "dapo", "drgrpo")

# The log importance ratio log(pi / pi_old) is clamped to +-LOG_RATIO_CLAMP before exp(), as in
# verl's compute_policy_loss (which the authors' code builds on); it only matters for runaway ratios
# and keeps exp() finite so that gradients never become inf * 0.
LOG_RATIO_CLAMP = 20.0

# Constants of the hybrid-policy baselines' expert-token terms (LUFFY's policy shaping and RL-PLUS).
LUFFY_SHAPING_GAMMA = 0.1
RLPLUS_OLD_WEIGHT = 1.5
RLPLUS_MIX = 0.5
RLPLUS_FOCAL_POWER = 0.5

# The cap the kernels use when the dual clip is off (dual_clip_c=None): the ratio never exceeds
# exp(LOG_RATIO_CLAMP) ~ 4.9e8, so min(lc, -c A) = lc exactly, and c A stays finite in fp32 (no inf * 0).
DUAL_CLIP_OFF_BOUND = 1e30

# Denominator guard of token-mean aggregation, exactly as in the formula sum(m*l) / (sum(m) + 1e-8).
AGG_EPS = 1e-8


def _fits_float(value) -> bool:
    """A real number that is a finite float (an int too large for a float, e.g. 2**1100, is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _knob(default, help_text: str):
    """A CalibRLConfig field with its help text (the trainer integrations generate their flags from it)."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def _fail(field: str, expected: str, actual) -> None:
    raise ValueError(f"CalibRLConfig.{field}: expected {expected}, got {actual!r}")


@dataclasses.dataclass(frozen=True)
class CalibRLConfig:
    """Every knob of the CalibRL loss (and of the baselines the same function offers)."""

    mode: str = _knob(
        "calibrl",
        "Which loss: calibrl (PPO + calibrated guide), grpo / dapo / drgrpo (PPO term only, on-policy rows), "
        "luffy / rlplus (expert rows kept, with their expert-token terms).",
    )
    clip_low: float = _knob(0.2, "PPO ratio clip: rho is clamped to [1 - clip_low, 1 + clip_high].")
    clip_high: float = _knob(0.2, "PPO ratio clip: rho is clamped to [1 - clip_low, 1 + clip_high].")
    dual_clip_c: Optional[float] = _knob(
        3.0,
        "Dual clip for negative advantages: the PPO term is capped at -dual_clip_c * A (must be > 1); None "
        "turns it off (plain PPO clipping).",
    )
    guide_coef: float = _knob(0.1, "beta, weight of the guide (calibration) term in the total loss.")
    activation: str = _knob(
        "leaky_relu",
        "Guide activation of z = -s * (lp - b): leaky_relu (CalibRL), relu, tanh, sigmoid, huber (the paper's "
        "ablation), or none (no guide).",
    )
    negative_slope: float = _knob(
        0.5, "alpha, slope of the guide's LeakyReLU on the z < 0 side, where a row already agrees with its expert."
    )
    weight_by_advantage: bool = _knob(True, "Weight each row's guide term by w = |A| (group rareness) or by 1.")
    baseline: str = _knob(
        "position",
        "Expert baseline b: position (the expert's old log-prob at the same token index) or sequence-mean "
        "(its mean token log-prob, one scalar per group).",
    )
    mask_beyond_expert: bool = _knob(
        False, "Drop guide terms at positions past the expert's length (else they compare with b = 0)."
    )
    entropy_coef: float = _knob(0.0, "Entropy bonus: loss -= entropy_coef * agg(H), aggregated like the loss.")
    loss_agg_mode: str = _knob(
        "token-mean",
        "How token terms become a scalar: token-mean, seq-mean-token-mean, seq-mean-token-sum, "
        "seq-mean-token-sum-norm (the last divides by loss_scale_factor, default the padded length T).",
    )
    loss_scale_factor: Optional[float] = _knob(
        None, "Constant divisor of seq-mean-token-sum-norm (Dr.GRPO); None uses the mask's T."
    )
    temperature: float = _knob(1.0, "Sampling temperature: the fused ops divide logits by it before the softmax.")
    # Group statistics used when the fused ops are given scores + group ids instead of advantages.
    norm_by_std: bool = _knob(False, "Advantages A = r - mean (False) or (r - mean) / (std + adv_eps) (True).")
    adv_eps: float = _knob(1e-6, "eps of the std normalisation of advantages.")
    pass_threshold: float = _knob(
        0.1,
        "A row passes when its reward r > pass_threshold; passing rows are pulled toward the expert baseline, "
        "failing rows pushed away from it.",
    )
    huber_delta: float = _knob(1.0, "Transition point of the huber ablation activation.")

    def __post_init__(self) -> None:
        choices = {
            "mode": MODES,
            "activation": ACTIVATIONS,
            "baseline": BASELINES,
            "loss_agg_mode": LOSS_AGG_MODES,
        }
        for field, allowed in choices.items():
            value = getattr(self, field)
            if value not in allowed:
                _fail(field, f"one of {allowed}", value)
        for field in ("weight_by_advantage", "mask_beyond_expert", "norm_by_std"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"CalibRLConfig.{field}: expected bool, got {type(getattr(self, field)).__name__}")
        for field in (
            "clip_low",
            "clip_high",
            *(("dual_clip_c",) if self.dual_clip_c is not None else ()),
            "guide_coef",
            "negative_slope",
            "entropy_coef",
            "temperature",
            "adv_eps",
            "pass_threshold",
            "huber_delta",
        ):
            value = getattr(self, field)
            # Python int / float or NumPy scalars (np.float32(0.2), np.int64(3)); stored as Python floats.
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _fits_float(value):
                _fail(field, "a finite number", value)
            object.__setattr__(self, field, float(value))
        if not 0.0 <= self.clip_low < 1.0:
            _fail("clip_low", "a number in [0, 1)", self.clip_low)
        if self.clip_high < 0.0:
            _fail("clip_high", "a number >= 0", self.clip_high)
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            _fail("dual_clip_c", "None or a number > 1", self.dual_clip_c)
        if self.guide_coef < 0.0:
            _fail("guide_coef", "a number >= 0", self.guide_coef)
        if not 0.0 <= self.negative_slope <= 1.0:
            _fail("negative_slope", "a number in [0, 1]", self.negative_slope)
        if self.temperature <= 0.0:
            _fail("temperature", "a number > 0", self.temperature)
        if self.adv_eps <= 0.0:
            _fail("adv_eps", "a number > 0", self.adv_eps)
        if self.huber_delta <= 0.0:
            _fail("huber_delta", "a number > 0", self.huber_delta)
        if self.loss_scale_factor is not None:
            if not (
                isinstance(self.loss_scale_factor, numbers.Real)
                and not isinstance(self.loss_scale_factor, bool)
                and _fits_float(self.loss_scale_factor)
                and self.loss_scale_factor > 0
            ):
                _fail("loss_scale_factor", "None or a number > 0", self.loss_scale_factor)
            object.__setattr__(self, "loss_scale_factor", float(self.loss_scale_factor))
        # The configuration as one string: how it crosses a torch.library schema (see ``from_key``).
        object.__setattr__(self, "key", json.dumps(dataclasses.asdict(self), sort_keys=True))

    @staticmethod
    def from_key(key: str) -> "CalibRLConfig":
        """The configuration whose ``key`` (a JSON string of every field) is ``key``."""
        return _config_from_key(key)

    @property
    def dual_clip_bound(self) -> float:
        """The dual-clip cap c every backend applies (a cap that never binds when dual_clip_c is None)."""
        return DUAL_CLIP_OFF_BOUND if self.dual_clip_c is None else self.dual_clip_c

    @property
    def uses_guide(self) -> bool:
        """True when the loss has a calibration (guide) term at all."""
        return self.mode == "calibrl" and self.activation != "none"

    @property
    def keeps_expert_rows(self) -> bool:
        """True for the hybrid baselines (luffy, rlplus) whose loss counts expert rows."""
        return self.mode not in ON_POLICY_ONLY_MODES

    def replace(self, **changes) -> "CalibRLConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_algo(cls, algo: str, **overrides) -> "CalibRLConfig":
        """The configuration of a named algorithm of ``ALGORITHM_PRESETS`` (its mode, advantage
        normalisation and aggregation), with overrides."""
        if algo not in ALGORITHM_PRESETS:
            raise ValueError(f"for_algo: algo expected one of {tuple(ALGORITHM_PRESETS)}, got {algo!r}")
        preset = ALGORITHM_PRESETS[algo]
        fields = dict(mode=preset.mode, norm_by_std=preset.norm_by_std, loss_agg_mode=preset.loss_agg_mode)
        return cls(**{**fields, **overrides})


@functools.lru_cache(maxsize=256)
def _config_from_key(key: str) -> CalibRLConfig:
    return CalibRLConfig(**json.loads(key))


DEFAULT_CONFIG = CalibRLConfig()  # the default of every op and module taking a config

# The method's fixed constants as the fused kernels name them (the C++ kernels read them by these names).
KERNEL_CONSTANTS = dict(
    log_ratio_clamp=LOG_RATIO_CLAMP,
    luffy_gamma=LUFFY_SHAPING_GAMMA,
    rlplus_old_weight=RLPLUS_OLD_WEIGHT,
    rlplus_mix=RLPLUS_MIX,
    rlplus_focal_power=RLPLUS_FOCAL_POWER,
)


# The runtime scalars of a config that every fused loss kernel reads (C++ by name, Triton as a tuple in this order):
# the PPO clip widths, the dual clip bound c, beta, alpha of leaky_relu, the huber transition, the entropy coefficient.
KERNEL_SCALARS = ("clip_low", "clip_high", "dual_clip_c", "guide_coef", "negative_slope", "huber_delta", "entropy_coef")


def kernel_scalars(config: CalibRLConfig) -> dict:
    """The KERNEL_SCALARS of ``config`` by name."""
    values = {name: getattr(config, name) for name in KERNEL_SCALARS}
    values["dual_clip_c"] = config.dual_clip_bound  # the bound the kernels apply (finite when the dual clip is off)
    return values


class GroupStats(NamedTuple):
    """Group statistics over on-policy rows (expert rows excluded), per row and per group.

    Groups are ordered by ascending group id; ``group_index`` maps each row to its group's position.
    """

    advantages: torch.Tensor  # (B,) A = r - mean[g] (or divided by std[g] + eps), expert rows included
    weights: torch.Tensor  # (B,) |A|, the rareness weight
    passed: torch.Tensor  # (B,) bool, r > pass_threshold
    mean: torch.Tensor  # (G,) on-policy mean reward (0 for a single on-policy row)
    std: torch.Tensor  # (G,) on-policy unbiased std (1 for a single on-policy row)
    pass_rate: torch.Tensor  # (G,) fraction of on-policy rows that pass
    count: torch.Tensor  # (G,) int64 number of on-policy rows
    group_index: torch.Tensor  # (B,) int64 in [0, G)
    group_keys: torch.Tensor  # (G,) the distinct group ids, ascending


class LossInputs(NamedTuple):
    """The per-token inputs of the loss, validated and resolved once by ``ops`` and handed to every backend.

    Only tensors and one integer, so a backend entry ``op(logits, targets, inputs, config, ...)`` maps onto a
    ``torch.library`` schema of tensors and scalars. B rows of T response tokens.
    """

    old_logp: torch.Tensor  # (B, T) log-probs of the behaviour policy
    advantages: torch.Tensor  # (B,) or (B, T)
    mask: torch.Tensor  # (B, T) response-token mask (0/1 or non-negative weights)
    expert_logp: Optional[torch.Tensor] = None  # (B, T) or (B,) expert baseline b (guide term only)
    passed: Optional[torch.Tensor] = None  # (B,) bool, reward above the pass threshold (guide term only)
    is_expert: Optional[torch.Tensor] = None  # (B,) bool, the row is an off-policy expert demonstration
    expert_mask: Optional[torch.Tensor] = None  # (B, T) expert's response length (mask_beyond_expert only)
    ignore_index: int = -100  # targets equal to it are left out of the loss

    def optional_fields(self) -> dict:
        """The optional fields (expert_logp, passed, is_expert, expert_mask: those between mask and ignore_index)
        as keyword arguments."""
        return {name: getattr(self, name) for name in self._fields[3:-1]}

    def fields(self) -> dict:
        """The optional fields and ignore_index as keyword arguments (the reference's calling convention)."""
        return dict(self.optional_fields(), ignore_index=self.ignore_index)


class LossOutput(NamedTuple):
    """Result of every loss op: ``loss`` carries the gradient, the rest are detached metrics."""

    loss: torch.Tensor  # pg_loss + guide_coef * guide_loss - entropy_coef * agg(H)
    pg_loss: torch.Tensor  # agg of the policy term (PPO dual clip; LUFFY/RL-PLUS terms on expert rows)
    guide_loss: torch.Tensor  # agg of w * act(z) over on-policy rows (0 when there is no guide)
    entropy: torch.Tensor  # token-mean entropy of on-policy rows (nan when entropy was not given)
    clipfrac: torch.Tensor  # token-mean of (l2 > l1) over every row, expert rows included
    clipfrac_lower: torch.Tensor  # token-mean of (lc > -c*A) & (A < 0) over every row
    ppo_kl: torch.Tensor  # token-mean of old_logp - logp over every row

    def metrics(self, prefix: str = "") -> dict:
        """All fields as Python floats (this synchronises with the device)."""
        return {prefix + name: float(value.detach()) for name, value in self._asdict().items()}
