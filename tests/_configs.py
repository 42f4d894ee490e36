"""The matrix of loss configurations the kernel tests run, in one place; each test module takes a subset.

``CONFIG_MATRIX`` names every configuration once. The CPU-path tests (C++ backend, chunked path, closed-form
coefficients, modules) take ``CPU_CASES``, every mode, activation and aggregation mode plus option mixes; the
Triton tests run under the interpreter, which is slow, so they take smaller subsets: ``LOGITS_KERNEL_CASES``
(fused logits loss), ``LINEAR_KERNEL_CASES`` (lm_head loss) and ``NAN_CASES`` (non-finite logits).
"""

from __future__ import annotations

from typing import Dict, List

from calibrl_kernels.config import ACTIVATIONS, LOSS_AGG_MODES, MODES, CalibRLConfig

CONFIG_MATRIX: Dict[str, CalibRLConfig] = {}
for _mode in MODES:
    CONFIG_MATRIX[_mode] = CalibRLConfig(mode=_mode)
for _act in ACTIVATIONS:
    CONFIG_MATRIX[f"calibrl-{_act}"] = CalibRLConfig(activation=_act)
for _agg in LOSS_AGG_MODES:
    CONFIG_MATRIX[f"calibrl-{_agg}"] = CalibRLConfig(loss_agg_mode=_agg, entropy_coef=0.01)
CONFIG_MATRIX.update(
    {
        "calibrl-options": CalibRLConfig(
            mask_beyond_expert=True,
            weight_by_advantage=False,
            entropy_coef=0.05,
            baseline="sequence-mean",
            loss_agg_mode="seq-mean-token-sum-norm",
            loss_scale_factor=7.0,
            clip_low=0.1,
            clip_high=0.3,
            guide_coef=0.5,
        ),
        "luffy-entropy-seqmean": CalibRLConfig(mode="luffy", entropy_coef=0.02, loss_agg_mode="seq-mean-token-mean"),
        "rlplus-entropy": CalibRLConfig(mode="rlplus", entropy_coef=-0.03),
        "grpo-preset": CalibRLConfig.for_algo("grpo", entropy_coef=0.01),
        "dapo-no-dual-clip": CalibRLConfig.for_algo("dapo", dual_clip_c=None, clip_high=0.28),
        # the algorithm presets as the trainers build them
        "preset-grpo": CalibRLConfig.for_algo("grpo"),
        "preset-dapo": CalibRLConfig.for_algo("dapo", clip_high=0.28),
        "preset-drgrpo": CalibRLConfig.for_algo("drgrpo"),
        "preset-drgrpo-scaled": CalibRLConfig.for_algo("drgrpo", loss_scale_factor=7.0),
        "preset-luffy": CalibRLConfig.for_algo("luffy"),
        "preset-rlplus": CalibRLConfig.for_algo("rlplus"),
        "preset-rlplus-entropy": CalibRLConfig.for_algo("rlplus", entropy_coef=0.01),
        # single options of the CalibRL loss and their mixes
        "huber-delta": CalibRLConfig(activation="huber", huber_delta=0.7),
        "flat-guide": CalibRLConfig(negative_slope=0.0, guide_coef=0.5),
        "unweighted-guide": CalibRLConfig(weight_by_advantage=False),
        "beyond-expert": CalibRLConfig(mask_beyond_expert=True),
        "entropy": CalibRLConfig(entropy_coef=0.05),
        "entropy-small": CalibRLConfig(entropy_coef=0.02),
        "seqmean-entropy": CalibRLConfig(loss_agg_mode="seq-mean-token-mean", entropy_coef=0.02),
        "seqsum": CalibRLConfig(loss_agg_mode="seq-mean-token-sum"),
        "seqsumnorm-beyond-expert": CalibRLConfig(loss_agg_mode="seq-mean-token-sum-norm", mask_beyond_expert=True),
        "narrow-clip": CalibRLConfig(dual_clip_c=1.5, clip_low=0.1, clip_high=0.1),
        "narrow-clip-no-dual": CalibRLConfig(dual_clip_c=None, clip_low=0.1, clip_high=0.1),
        "tanh-beyond-expert": CalibRLConfig(activation="tanh", mask_beyond_expert=True),
        "huber-unweighted": CalibRLConfig(activation="huber", weight_by_advantage=False),
        "cold": CalibRLConfig(temperature=0.7),
        "hot-seqsum": CalibRLConfig(temperature=1.3, loss_agg_mode="seq-mean-token-sum"),
    }
)

# One config per (mode, activation) pair that makes sense, plus the aggregation modes and options.
CPU_CASES = (
    *MODES,
    *(f"calibrl-{a}" for a in ACTIVATIONS),
    *(f"calibrl-{a}" for a in LOSS_AGG_MODES),
    "calibrl-options",
    "luffy-entropy-seqmean",
    "rlplus-entropy",
    "grpo-preset",
    "dapo-no-dual-clip",
)
LOGITS_KERNEL_CASES = (
    "calibrl",
    "calibrl-relu",
    "calibrl-tanh",
    "calibrl-sigmoid",
    "huber-delta",
    "calibrl-none",
    "flat-guide",
    "unweighted-guide",
    "beyond-expert",
    "entropy",
    "preset-grpo",
    "preset-dapo",
    "preset-drgrpo",
    "preset-drgrpo-scaled",
    "preset-luffy",
    "preset-rlplus-entropy",
    "seqmean-entropy",
    "seqsum",
    "seqsumnorm-beyond-expert",
    "narrow-clip",
    "narrow-clip-no-dual",
)
LINEAR_KERNEL_CASES = (
    "entropy-small",
    "tanh-beyond-expert",
    "huber-unweighted",
    "preset-grpo",
    "preset-dapo",
    "preset-drgrpo",
    "preset-luffy",
    "preset-rlplus-entropy",
    "cold",
    "hot-seqsum",
)
NAN_CASES = ("preset-grpo", "calibrl-token-mean", "calibrl-relu", "preset-rlplus")


def configs(names) -> List[CalibRLConfig]:
    """The configurations of the cases ``names``, in that order."""
    return [CONFIG_MATRIX[name] for name in names]
