"""CalibRL inside TRL: ``CalibRLTrainer(GRPOTrainer)`` and ``CalibRLGRPOConfig(GRPOConfig)``.

Tested against TRL 1.16.0 with transformers 5.23.0 and torch 2.13.0. What it changes in TRL's GRPO loop:

* Generation and scoring (``GRPOTrainer._generate_and_score_completions``): TRL generates, scores and computes
  its advantages as always (``scale_rewards``, ``multi_objective_aggregation``, rows whose rewards are all
  ``None`` get advantage 0, ``mask_truncated_completions``); those advantages are kept. In the modes that use
  experts (calibrl, luffy, rlplus) this class then appends, per prompt, one expert completion taken from the
  dataset column ``expert_column``, scores it with the same reward functions (``GRPOTrainer._calculate_rewards``),
  computes its old log-probs (``_get_per_token_logps_and_entropies``) and the expert baseline. Per-row fields
  (group id, is_expert, pass flag, reward, scorable flag, expert baseline (B, T)) are added as tensors whose
  first dimension is the row, so they survive TRL's ``shuffle_sequence_dict`` and ``split_tensor_dict``
  (images go through ``split_pixel_values_by_grid`` like TRL's own fields).
* Loss (``compute_loss``): the model body is run once to get its last hidden states and the loss is
  ``calibrl_kernels.fused_linear_calibrl_loss`` on those and the lm_head weight, so the (B*T, V) logits
  never exist. The kernels aggregate over the micro-batch; the result is rescaled by one scalar to TRL's
  normaliser of ``loss_type`` (grpo: rows of the micro-batch, empty rows included; bnpo: its tokens; dr_grpo:
  rows x ``max_completion_length``; dapo: the generation batch's tokens over every process and accumulation
  step), so the shared loss types equal ``GRPOTrainer._compute_loss`` (tests/test_integration_trl.py runs
  both). TRL 1.16 scores tokens through the fused LM head it patches onto the model
  (``trl.trainer.utils.add_fused_lm_head``); this class patches the model's forward the same way with one
  extra keyword, ``calibrl_hidden_states=True``, that returns the body's last hidden states, so the call
  still goes through DDP/FSDP wrappers.
* Metrics: pg_loss, guide_loss (as the loss is normalised), entropy, clipfrac, clipfrac_lower, ppo_kl (token
  means over every process, as TRL's) and pass rate / expert reward, beside TRL's own reward and length metrics.

Modes (``calibrl_algo``): ``grpo`` is TRL's own loss of ``loss_type`` (no expert column); ``calibrl`` adds the
calibrated guide term to it; ``luffy`` / ``rlplus`` train the expert rows with their own terms. TRL's fields
keep their meaning in every mode; those left unset (None) take CalibRL's setting in the expert modes
(``loss_type="bnpo"``, ``scale_rewards="none"``, ``delta=3.0``: the paper's per-micro-batch token mean, A = r - mean
and dual clip c = 3) and TRL's defaults in grpo mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import calibrl_kernels as ck
from calibrl_kernels.config import ALGORITHM_PRESETS

from . import _core

try:  # TRL is an optional dependency: `pip install calibrl[trl]`
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.trainer.utils import nanstd, split_pixel_values_by_grid, unsplit_pixel_values_by_grid
except ImportError as _error:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        f"calibrl.integrations.trl needs TRL >= 1.16: pip install 'calibrl[trl]' (importing trl failed: {_error})"
    ) from _error

__all__ = ["CalibRLGRPOConfig", "CalibRLTrainer", "calibrl_batch_loss", "hybrid_batch_fields"]

calibrl_batch_loss = _core.calibrl_batch_loss
hybrid_batch_fields = _core.hybrid_batch_fields

# TRL loss types computed exactly as GRPOTrainer._compute_loss does (the others are refused).
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
# The kernels' per-micro-batch aggregation each loss type starts from (then rescaled to TRL's normaliser).
_KERNEL_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
# TRL's advantage normalisation guard: (r - mean) / (std + 1e-4).
TRL_ADV_EPS = 1e-4
# Values of TRL's fields left unset (None): CalibRL's setting in the expert modes, TRL's defaults in grpo mode.
_UNSET_DEFAULTS = {
    "expert modes": {"loss_type": "bnpo", "scale_rewards": "none", "delta": 3.0},
    "grpo": {"loss_type": "dapo", "scale_rewards": "group", "delta": None},
}
# Former preset names and what says the same thing now.
_FORMER_ALGOS = {
    "dapo": "calibrl_algo='grpo', loss_type='dapo'",
    "drgrpo": "calibrl_algo='grpo', loss_type='dr_grpo', scale_rewards='none'",
    "sft+grpo": "run trl.SFTTrainer on the expert column, then calibrl_algo='grpo'",
}
# calibrl_algo choices: the algorithms of the one table that are not TRL loss types here.
ALGOS = tuple(name for name in ALGORITHM_PRESETS if name not in _FORMER_ALGOS)
# CalibRLConfig fields that TRL's own fields (or calibrl_algo) decide: see CalibRLGRPOConfig._trl_owned_fields.
_TRL_OWNED = (
    "mode",
    "clip_low",
    "clip_high",
    "temperature",
    "dual_clip_c",
    "loss_agg_mode",
    "loss_scale_factor",
    "norm_by_std",
    "adv_eps",
)
# Every other CalibRLConfig field is a flat CLI field calibrl_<name> of CalibRLGRPOConfig (None: CalibRLConfig's
# default), generated from CalibRLConfig with its help text plus the TRL-specific notes below.
_FLAT_FIELDS = tuple(f.name for f in dataclasses.fields(ck.CalibRLConfig) if f.name not in _TRL_OWNED)
_TRL_NOTES = {
    "pass_threshold": "Here r is the weighted sum of the reward functions, before normalisation: set it between "
    "your reward's fail and pass values.",
    "entropy_coef": "TRL's own entropy_coef is refused.",
}
# Per-row TRL-only field: False on a row whose reward functions all returned None (it gets no loss terms).
FIELD_SCORABLE = "calibrl_scorable"  # (B,) bool
# Batch fields whose second dimension is prompt + completion tokens (padded with zeros when the
# completion width grows to fit an expert row).
_SEQUENCE_WIDE_FIELDS = ("token_type_ids", "mm_token_type_ids")
# Batch fields whose second dimension is the completion length.
_COMPLETION_WIDE_FIELDS = ("completion_ids", "completion_mask", "old_per_token_logps")
# Multimodal keys TRL keeps in its batch and hands to the model.
_MODEL_INPUT_FIELDS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def _with_flat_fields(cls):
    """Add ``calibrl_<name>: Optional[<type>] = None`` to cls (before @dataclass) for every name of _FLAT_FIELDS."""
    for f in dataclasses.fields(ck.CalibRLConfig):
        if f.name in _FLAT_FIELDS:
            notes = " ".join(text for text in (f.metadata["help"], _TRL_NOTES.get(f.name)) if text)
            cls.__annotations__[f"calibrl_{f.name}"] = f"Optional[{f.type}]"
            help_text = f"{notes} None: CalibRLConfig's default ({f.default!r})."
            setattr(cls, f"calibrl_{f.name}", field(default=None, metadata={"help": help_text}))
    return cls


@dataclass
@_with_flat_fields
class CalibRLGRPOConfig(GRPOConfig):
    """GRPOConfig plus the CalibRL mode, its guide-term settings and the dataset's expert column.

    TRL's fields mean what they mean in ``GRPOTrainer`` and are the single source of truth for what they set:
    ``epsilon`` / ``epsilon_high`` (clip range), ``temperature``, ``delta`` (two-sided clip = CalibRL's dual
    clip c), ``loss_type`` (normaliser) and ``scale_rewards`` / ``multi_objective_aggregation`` (advantages).
    ``loss_type``, ``scale_rewards`` and ``delta`` left None take CalibRL's setting in the calibrl / luffy /
    rlplus modes (bnpo, none, 3.0) and TRL's defaults in grpo mode (dapo, group, None); ``delta=inf`` turns the
    dual clip off. ``beta`` (TRL's KL penalty) must stay 0: this trainer loads no reference model.
    """

    calibrl: Optional[Any] = field(
        default=None,
        metadata={
            "help": "A calibrl_kernels.CalibRLConfig giving the mode and guide-term fields (instead of "
            "calibrl_algo and the flat calibrl_* fields). Its clip, temperature, dual clip, "
            "aggregation and advantage fields come from TRL's fields: leave them at their defaults "
            "or equal to what TRL's fields give."
        },
    )
    calibrl_algo: Optional[str] = field(
        default=None,
        metadata={
            "help": "calibrl (default): TRL's loss plus the calibrated guide term toward each prompt's expert "
            "completion; grpo: TRL's own loss of loss_type, no expert column; luffy / rlplus: the "
            "expert rows are trained with LUFFY's / RL-PLUS's terms."
        },
    )
    expert_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Dataset column with one expert completion per prompt (text or assistant message), used "
            "by calibrl / luffy / rlplus only. None: 'expert' in those modes; grpo reads no expert "
            "column and refuses one."
        },
    )
    expert_append_eos: bool = field(
        default=True, metadata={"help": "End each expert completion with the tokenizer's EOS, as generation does."}
    )
    loss_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "TRL's loss_type, one of grpo, dapo, dr_grpo, bnpo (the same normaliser as GRPOTrainer). "
            "None: bnpo (CalibRL's per-micro-batch token mean) in calibrl / luffy / rlplus, dapo "
            "(TRL's default) in grpo."
        },
    )
    scale_rewards: Optional[str] = field(
        default=None,
        metadata={
            "help": "TRL's scale_rewards: group, batch or none. None: none (A = r - mean, CalibRL) in "
            "calibrl / luffy / rlplus, group (TRL's default) in grpo."
        },
    )
    delta: Optional[float] = field(
        default=None,
        metadata={
            "help": "TRL's two-sided clip, the same as CalibRL's dual clip c: for A < 0 the ratio term is "
            "capped at delta * |A|; needs delta >= 1 + epsilon_high. inf: off. None: 3.0 (CalibRL) in "
            "calibrl / luffy / rlplus, off (TRL's default) in grpo."
        },
    )

    def __post_init__(self):
        if self.calibrl is not None and not isinstance(self.calibrl, ck.CalibRLConfig):
            raise TypeError(
                f"calibrl: expected a calibrl_kernels.CalibRLConfig or None, got {type(self.calibrl).__name__}"
            )
        algo = self.algo
        unset = _UNSET_DEFAULTS["grpo" if algo == "grpo" else "expert modes"]
        for name, value in unset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if algo == "grpo" and self.expert_column is not None:
            raise ValueError(
                f"expert_column: calibrl_algo='grpo' uses no expert completions, got {self.expert_column!r}; "
                "leave it None (or choose calibrl, luffy or rlplus)"
            )
        if algo != "grpo" and self.expert_column is None:
            self.expert_column = "expert"
        super().__post_init__()
        self.calibrl_config  # validate now, not at the first batch

    @property
    def algo(self) -> str:
        """The mode of this run: calibrl, grpo, luffy or rlplus."""
        if self.calibrl_algo in _FORMER_ALGOS:
            raise ValueError(
                f"calibrl_algo: {self.calibrl_algo!r} is a TRL loss type here; use {_FORMER_ALGOS[self.calibrl_algo]}"
            )
        if self.calibrl_algo is not None and self.calibrl_algo not in ALGOS:
            raise ValueError(f"calibrl_algo: expected one of {ALGOS} or None, got {self.calibrl_algo!r}")
        if self.calibrl is None:
            return self.calibrl_algo or "calibrl"
        mode = "grpo" if self.calibrl.mode in ("grpo", "dapo", "drgrpo") else self.calibrl.mode
        if self.calibrl_algo not in (None, mode):
            raise ValueError(f"calibrl_algo: {self.calibrl_algo!r} disagrees with calibrl.mode={self.calibrl.mode!r}")
        return mode

    def _trl_owned_fields(self) -> Dict[str, Any]:
        """CalibRLConfig fields that TRL's own fields decide, with their values."""
        clip_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.delta is not None and not math.isinf(self.delta) and not self.delta >= 1.0 + clip_high:
            raise ValueError(
                f"delta: expected None, inf or a number >= 1 + epsilon_high = {1.0 + clip_high} (below that TRL's "
                f"two-sided clip also caps positive advantages, which the dual clip does not), got {self.delta!r}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type: CalibRLTrainer computes TRL's loss types {LOSS_TYPES}, got {self.loss_type!r}"
            )
        return {
            "clip_low": self.epsilon,
            "clip_high": clip_high,
            "temperature": self.temperature,
            "dual_clip_c": None if self.delta is None or math.isinf(self.delta) else float(self.delta),
            "loss_agg_mode": _KERNEL_AGGREGATION[self.loss_type],
            "loss_scale_factor": float(self.max_completion_length) if self.loss_type == "dr_grpo" else None,
            "norm_by_std": self.scale_rewards != "none",
            "adv_eps": TRL_ADV_EPS,
        }

    @property
    def calibrl_config(self) -> ck.CalibRLConfig:
        """The resolved CalibRLConfig of this run (its aggregation is per micro-batch: see CalibRLTrainer)."""
        owned = self._trl_owned_fields()
        flat = {name: getattr(self, f"calibrl_{name}") for name in _FLAT_FIELDS}
        flat = {name: value for name, value in flat.items() if value is not None}
        if self.calibrl is None:
            return ck.CalibRLConfig(mode=self.algo, **flat, **owned)
        if flat:
            raise ValueError(
                f"calibrl: give the guide settings either as calibrl or as calibrl_* fields, got both "
                f"(calibrl_{', calibrl_'.join(flat)})"
            )
        defaults = ck.CalibRLConfig()
        for name, value in owned.items():
            given = getattr(self.calibrl, name)
            if given != value and given != getattr(defaults, name):
                raise ValueError(
                    f"calibrl.{name}: TRL's fields decide it here (epsilon, epsilon_high, temperature, delta, "
                    f"loss_type, scale_rewards): expected {value!r} or the default {getattr(defaults, name)!r}, "
                    f"got {given!r}"
                )
        return self.calibrl.replace(**owned)

    def to_dict(self):
        d = super().to_dict()
        if isinstance(d.get("calibrl"), ck.CalibRLConfig):
            d["calibrl"] = dataclasses.asdict(d["calibrl"])
        return d


def expert_text(value: Any, column: str, row: int) -> str:
    """The text of one expert completion (``calibrl.integrations._core.expert_text``), errors naming column and row."""
    return _core.expert_text(value, f"{column} (row {row})")


def _pad_width(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad dim 1 of t to ``width``."""
    return t if t.size(1) == width else F.pad(t, (0, width - t.size(1)), value=value)


def _take_rows(batch: Dict[str, Any], rows: Sequence[int], num_rows: int) -> Dict[str, Any]:
    """The given rows of a TRL batch whose per-row values are tensors (first dim) or lists."""
    out = {}
    index = torch.as_tensor(list(rows), dtype=torch.long)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == num_rows:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == num_rows:
            out[key] = [value[i] for i in rows]
        elif value is None or (isinstance(value, torch.Tensor) and value.dim() == 0):
            out[key] = value
        else:
            raise ValueError(
                f"{key}: expected one entry per row ({num_rows}) in TRL's generated batch, got "
                f"{type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}"
            )
    return out


def _concat_rows(first: Dict[str, Any], second: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in first.items():
        other = second[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = torch.cat([value, other.to(value.device)], dim=0)
        elif isinstance(value, list):
            out[key] = value + other
        else:
            out[key] = value
    return out


class CalibRLTrainer(GRPOTrainer):
    """GRPOTrainer running TRL's GRPO-family loss plus, per mode, CalibRL's guide term or LUFFY's / RL-PLUS's terms.

    Same arguments as ``trl.GRPOTrainer``; ``args`` must be a ``CalibRLGRPOConfig``. The dataset needs the
    ``args.expert_column`` column (one expert completion per prompt) in the calibrl, luffy and rlplus modes.
    """

    _tag_names = ["trl", "grpo", "calibrl"]
    _name = "CalibRL"

    def __init__(self, *args, **kwargs):
        trainer_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(trainer_args, CalibRLGRPOConfig):
            raise TypeError(f"args: expected a CalibRLGRPOConfig, got {type(trainer_args).__name__}")
        self.calibrl_config = trainer_args.calibrl_config
        self._check_supported(trainer_args)
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError(
                f"router_aux_loss_coef: the CalibRL loss has no MoE load-balancing term, "
                f"got {self.router_aux_loss_coef}"
                "; set router_aux_loss_coef=0.0"
            )
        self._expert_column = self.args.expert_column if _core.needs_experts(self.calibrl_config) else None
        self._check_dataset_columns(self.train_dataset, "train_dataset")
        self._check_group_layout()
        self._add_hidden_state_forward()
        self._captured_rewards = None

    # ------------------------------------------------------------------ set-up checks
    def _check_supported(self, args: CalibRLGRPOConfig) -> None:
        """TRL options whose semantics the CalibRL loss does not implement fail here, not silently."""
        cfg = self.calibrl_config
        unsupported = {
            "beta": (args.beta, 0.0, "CalibRLTrainer loads no reference model and has no KL penalty"),
            "top_entropy_quantile": (args.top_entropy_quantile, 1.0, ""),
            "off_policy_mask_threshold": (args.off_policy_mask_threshold, None, ""),
            "importance_sampling_level": (args.importance_sampling_level, "token", ""),
            "entropy_coef": (
                args.entropy_coef,
                0.0,
                "TRL's entropy bonus; calibrl_entropy_coef is CalibRL's, normalised like the policy term",
            ),
            "use_adaptive_entropy": (args.use_adaptive_entropy, False, ""),
        }
        for name, (value, default, hint) in unsupported.items():
            if value != default:
                raise ValueError(
                    f"{name}: CalibRLTrainer supports only {name}={default!r}, got {value!r}"
                    + (f" ({hint})" if hint else "")
                )
        if args.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: expected 'group', 'batch' or 'none', got {args.scale_rewards!r}")
        aggregation = args.multi_objective_aggregation
        if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(
                f"multi_objective_aggregation: expected 'sum_then_normalize' or 'normalize_then_sum', "
                f"got {aggregation!r}"
            )
        if cfg.keeps_expert_rows and aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation: mode {cfg.mode!r} trains expert rows, whose advantage needs the summed "
                f"reward (sum_then_normalize), got {aggregation!r}"
            )
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise ValueError(
                "vllm_importance_sampling_correction: not supported by the CalibRL loss; set it to False "
                "(old log-probs are then recomputed by the training model)"
            )

    def _check_dataset_columns(self, dataset, name: str) -> None:
        columns = getattr(dataset, "column_names", None)
        if self._expert_column and columns is not None and self._expert_column not in columns:
            raise ValueError(
                f"expert_column: the {name} has no column {self._expert_column!r} (columns: {list(columns)}); "
                "add one expert completion per prompt or set expert_column"
            )

    def _rows_after_experts(self, rows: int) -> int:
        return rows // self.num_generations * (self.num_generations + (1 if self._expert_column else 0))

    def _check_group_layout(self) -> None:
        if not self._expert_column:  # without experts, groups may span processes as in TRL
            return
        rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if rows % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {rows} rows per process must hold whole "
                f"prompt groups of num_generations={self.num_generations} (the expert rows and baseline are "
                "added per process)"
            )
        total = self._rows_after_experts(rows)
        if total % self.args.steps_per_generation != 0:
            raise ValueError(
                f"steps_per_generation: the {rows // self.num_generations} prompt groups of {self.num_generations} "
                f"rows + 1 expert row make {total} rows per process, not divisible by steps_per_generation="
                f"{self.args.steps_per_generation}; TRL would drop the remainder"
            )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and getattr(self.args, "expert_column", None):
            if self.args.expert_column not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, self.args.expert_column]

    def _add_hidden_state_forward(self) -> None:
        """Let ``model(..., calibrl_hidden_states=True)`` return the body's last hidden states.

        The same seam as TRL's ``add_fused_lm_head`` (which this wraps): the body is the model's
        ``base_model`` (transformers 5), the head is ``get_output_embeddings()``.
        """
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        text_config = target.config.get_text_config()
        for attr in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "lm_head_multiplier",
            "logits_scaling",
        ):
            value = getattr(text_config, attr, None)
            if value not in (None, 1.0):
                raise NotImplementedError(
                    f"{type(target).__name__}: config.{attr}={value!r} transforms the logits; the fused CalibRL loss "
                    "supports plain linear lm_heads only"
                )
        previous_forward = target.forward

        @functools.wraps(type(target).forward)  # keep the signature: `generate` validates its kwargs against it
        def forward(module_self, *args, calibrl_hidden_states: bool = False, **kwargs):
            if not calibrl_hidden_states:
                return previous_forward(*args, **kwargs)
            kwargs["use_cache"] = False
            return module_self.base_model(*args, **kwargs).last_hidden_state

        target.forward = types.MethodType(forward, target)

    # ------------------------------------------------------------------ generation + scoring
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._captured_rewards is None:  # the on-policy call inside GRPOTrainer's scoring step
            self._captured_rewards = (rewards, prompts)
        return rewards

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        n = self.num_generations if mode == "train" else self.num_generations_eval
        num_rows = len(inputs)
        if self._expert_column:
            if num_rows % n != 0:
                raise ValueError(f"inputs: {num_rows} rows are not whole groups of num_generations={n}")
            for row, example in enumerate(inputs):
                if self._expert_column not in example or example[self._expert_column] is None:
                    raise ValueError(
                        f"expert_column: row {row} of the batch has no {self._expert_column!r} value "
                        f"(keys: {sorted(example)})"
                    )
        self._captured_rewards = None
        try:
            batch = super()._generate_and_score_completions(inputs)
            rewards_per_func, reward_prompts = self._captured_rewards
        finally:
            self._captured_rewards = None
        # The reward matrix covers every process's rows; keep this process's.
        start = self.accelerator.process_index * num_rows
        local_rewards = rewards_per_func[start : start + num_rows]  # (B_on, F), NaN where a function returned None
        scores = self._weighted_scores(local_rewards)  # (B_on,)
        scorable = ~torch.isnan(local_rewards).all(dim=1)  # (B_on,)
        # TRL's advantages (scale_rewards, multi_objective_aggregation, 0 on unscorable rows), kept as they are.
        advantages = batch["advantages"].float()  # (B_on,)
        device = scores.device
        group_ids = torch.div(torch.arange(start, start + num_rows, device=device), n, rounding_mode="floor")
        batch.pop("importance_sampling_ratio", None)
        batch.pop("sampling_per_token_logps", None)
        if "tool_mask" in batch:
            raise NotImplementedError("tool_mask: tool calling is not supported by CalibRLTrainer")

        if self._expert_column:
            batch, scores, group_ids, is_expert, baseline_logp, expert_rewards = self._append_expert_rows(
                batch, inputs, reward_prompts, scores, group_ids, n, num_rows // n, mode
            )
            expert_mask = batch["completion_mask"][is_expert]  # (G, T)
            if self.calibrl_config.keeps_expert_rows:
                expert_advantages = self._expert_advantages(rewards_per_func, expert_rewards, n)
                # TRL's token count of the generation batch (the dapo normaliser) covers the rows the loss trains.
                batch["num_items_in_batch"] = (
                    batch["num_items_in_batch"] + self.accelerator.gather(expert_mask.sum()).sum()
                )
            else:  # calibrl: expert rows enter only through the baseline; their advantage is never read
                expert_advantages = torch.zeros(expert_mask.size(0), device=device)
            advantages = torch.cat([advantages, expert_advantages])
            scorable = torch.cat([scorable, ~torch.isnan(expert_rewards).all(dim=1)])
        else:
            is_expert = torch.zeros(num_rows, dtype=torch.bool, device=device)
            baseline_logp = torch.zeros(batch["completion_ids"].shape, dtype=torch.float32, device=device)
        fields = _core.hybrid_batch_fields(
            scores, group_ids, is_expert, baseline_logp, batch["completion_mask"], self.calibrl_config
        )
        fields["advantages"] = advantages  # TRL's (see above), in place of CalibRL's group statistics
        fields[FIELD_SCORABLE] = scorable
        batch.update(fields)
        self._log_group_metrics(mode, scores, is_expert, fields[_core.FIELD_PASSED], batch["completion_mask"])
        return batch

    def _weighted_scores(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """One scalar reward per row: TRL's weighted sum over reward functions (unscorable rows -> 0)."""
        weights = self.reward_weights.to(rewards_per_func.device)
        scores = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        return torch.where(unscorable, torch.zeros_like(scores), scores).float()

    def _expert_advantages(self, rewards_per_func: torch.Tensor, expert_rewards: torch.Tensor, n: int) -> torch.Tensor:
        """TRL's advantage formula for one more row per group: the expert's (G,) from its rewards (G, F).

        (r_e - mean) / (std + 1e-4) with the mean of the group's scorable on-policy rewards and the std of the
        group (scale_rewards='group') or of the whole generation batch ('batch'); no division for 'none'. An
        expert whose reward functions all returned None gets 0, as TRL's unscorable rows.
        """
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)  # (B_all,) every process's on-policy rows
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        grouped = rewards.view(-1, n)  # (G_all, n)
        num_groups = expert_rewards.size(0)
        local = slice(self.accelerator.process_index * num_groups, (self.accelerator.process_index + 1) * num_groups)
        expert = (expert_rewards * weights).nansum(dim=1)  # (G,)
        expert[torch.isnan(expert_rewards).all(dim=1)] = torch.nan
        advantages = expert - torch.nanmean(grouped, dim=1)[local]
        if self.scale_rewards == "group":
            std = nanstd(grouped, dim=1)[local] if n > 1 else torch.zeros_like(advantages)
            advantages = advantages / (std + TRL_ADV_EPS)
        elif self.scale_rewards == "batch":
            std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(advantages)
            advantages = advantages / (std + TRL_ADV_EPS)
        return torch.nan_to_num(advantages, nan=0.0).float()

    def _expert_completion_ids(self, inputs, num_groups: int, n: int) -> List[List[int]]:
        column = self._expert_column
        eos_ids = self.eos_token_ids if self.args.expert_append_eos else []
        return [
            _core.expert_token_ids(
                expert_text(inputs[g * n][column], column, g * n),
                lambda text: self._tokenizer(text, add_special_tokens=False)["input_ids"],
                eos_ids,
                self.max_completion_length,
                f"{column} (row {g * n})",
                "max_completion_length",
            )
            for g in range(num_groups)
        ]

    def _append_expert_rows(self, batch, inputs, reward_prompts, scores, group_ids, n, num_groups, mode):
        device = scores.device
        num_rows = num_groups * n
        expert_ids = self._expert_completion_ids(inputs, num_groups, n)
        # Score the experts with the same reward functions (TRL gathers across processes; keep ours).
        texts = [self._tokenizer.decode(ids, skip_special_tokens=True) for ids in expert_ids]
        conversational = is_conversational({"prompt": reward_prompts[0]})
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        heads = [g * n for g in range(num_groups)]
        expert_rewards = GRPOTrainer._calculate_rewards(
            self, [inputs[i] for i in heads], [reward_prompts[i] for i in heads], completions, expert_ids
        )
        start = self.accelerator.process_index * num_groups
        expert_rewards = expert_rewards[start : start + num_groups]  # (G, F)
        expert_scores = self._weighted_scores(expert_rewards)

        # Widen the completion axis to fit the longest expert, then copy each group's prompt row.
        split = split_pixel_values_by_grid(batch)
        width = max(split["completion_ids"].size(1), max(len(ids) for ids in expert_ids))
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        extra = width - split["completion_ids"].size(1)
        pad_id = self._tokenizer.pad_token_id
        for key in _COMPLETION_WIDE_FIELDS:
            if key in split:
                split[key] = _pad_width(split[key], width, pad_id if key == "completion_ids" else 0)
        for key in _SEQUENCE_WIDE_FIELDS:
            if key in split:
                split[key] = _pad_width(split[key], split[key].size(1) + extra, 0)
        experts = _take_rows(split, heads, num_rows)
        experts["completion_ids"] = torch.full((num_groups, width), pad_id, dtype=torch.long, device=device)
        experts["completion_mask"] = torch.zeros(
            (num_groups, width), dtype=split["completion_mask"].dtype, device=device
        )
        for g, ids in enumerate(expert_ids):
            experts["completion_ids"][g, : len(ids)] = torch.tensor(ids, device=device)
            experts["completion_mask"][g, : len(ids)] = 1
        expert_old = self._old_logps(unsplit_pixel_values_by_grid(experts), width, mode)  # (G, T)
        if "old_per_token_logps" in split:
            experts["old_per_token_logps"] = expert_old
        merged = unsplit_pixel_values_by_grid(_concat_rows(split, experts))

        is_expert = torch.cat([torch.zeros(num_rows, dtype=torch.bool), torch.ones(num_groups, dtype=torch.bool)]).to(
            device
        )
        baseline_logp = torch.cat([torch.zeros(num_rows, width, device=device), expert_old.float()])
        all_scores = torch.cat([scores, expert_scores])
        all_groups = torch.cat([group_ids, group_ids[torch.as_tensor(heads, device=device)]])
        return merged, all_scores, all_groups, is_expert, baseline_logp, expert_rewards

    @torch.no_grad()
    def _old_logps(self, rows: Dict[str, Any], width: int, mode: str) -> torch.Tensor:
        """Log-probs of the rows' completions under the current (sampling) policy, (rows, width)."""
        input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
        attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        model_inputs = {key: rows[key] for key in _MODEL_INPUT_FIELDS if rows.get(key) is not None}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model,
            input_ids,
            attention_mask,
            width,
            batch_size=batch_size,
            num_images=rows.get("num_images"),
            num_tiles=rows.get("num_tiles"),
            **model_inputs,
        )
        return logps * rows["completion_mask"]  # zero on padding, as the authors' baseline is

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs: CalibRLTrainer does not return model outputs")
        return self.calibrl_loss_output(model, inputs).loss

    def calibrl_loss_output(self, model, inputs) -> ck.LossOutput:
        """The LossOutput of one micro-batch, normalised as GRPOTrainer normalises ``loss_type``.

        ``loss`` is what ``GRPOTrainer.compute_loss`` returns (gradient accumulation included), ``pg_loss`` and
        ``guide_loss`` its terms; the metrics are logged here, averaged over processes as TRL's.
        """
        missing = [key for key in ("advantages", FIELD_SCORABLE, *_core.ROW_FIELDS) if key not in inputs]
        if missing:
            raise ValueError(f"inputs: missing {missing}; the batch was not produced by CalibRLTrainer's scoring step")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        # Rows whose rewards were all None take no part in any term (TRL: advantage 0) but still count in
        # TRL's normalisers, which come from completion_mask below.
        kernel_mask = completion_mask * inputs[FIELD_SCORABLE].unsqueeze(1).to(completion_mask.dtype)  # (B, T)
        hidden = self.completion_hidden_states(model, inputs)  # (B, T, D)
        head = self.accelerator.unwrap_model(model)
        head = head.get_base_model() if is_peft_model(head) else head
        lm_head = head.get_output_embeddings()
        with self.accelerator.autocast():
            out = _core.calibrl_batch_loss(
                hidden,
                lm_head.weight,
                completion_ids,
                kernel_mask,
                inputs.get("old_per_token_logps"),
                {key: inputs[key] for key in ("advantages", *_core.ROW_FIELDS)},
                self.calibrl_config,
                bias=lm_head.bias,
            )
        mode = "train" if self.model.training else "eval"
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        accumulation = accumulation if mode == "train" else 1
        scale = self._trl_normaliser_scale(inputs, kernel_mask, mode, accumulation)
        out = out._replace(loss=out.loss * scale, pg_loss=out.pg_loss * scale, guide_loss=out.guide_loss * scale)
        self._log_loss_metrics(mode, out, accumulation, kernel_mask, inputs[_core.FIELD_IS_EXPERT])
        return out

    def _trl_normaliser_scale(self, inputs, kernel_mask: torch.Tensor, mode: str, accumulation: int) -> torch.Tensor:
        """The factor that turns the kernels' per-micro-batch aggregate into GRPOTrainer's loss for ``loss_type``.

        Over the rows the loss trains (on-policy rows; every row in luffy / rlplus), with M = TRL's completion
        mask and K = the kernels' mask (M without unscorable rows): grpo: sum_rows(mean_t) / rows (rows without
        tokens count); dr_grpo: sum / (rows * max_completion_length); bnpo: sum / tokens(M); dapo: sum / (the
        generation batch's tokens over every process / processes * accumulation / steps_per_generation).
        """
        loss_rows = (
            torch.ones_like(inputs[_core.FIELD_IS_EXPERT])
            if self.calibrl_config.keeps_expert_rows
            else ~inputs[_core.FIELD_IS_EXPERT]
        )  # (B,) bool
        trl_mask = inputs["completion_mask"][loss_rows].float()  # (R, T)
        kept = kernel_mask[loss_rows].float()  # (R, T)
        if self.loss_type in ("grpo", "dr_grpo"):  # the kernels divide by the rows that have tokens
            scale = (kept.sum(-1) > 0).sum() / max(int(loss_rows.sum()), 1) / accumulation
        elif self.loss_type == "bnpo":
            scale = kept.sum() / trl_mask.sum().clamp(min=1.0) / accumulation
        else:  # dapo: GRPOTrainer rescales the generation batch's token count to one accumulation window
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * accumulation / self.args.steps_per_generation
            scale = kept.sum() / normaliser
        return scale.float()

    def completion_hidden_states(self, model, inputs) -> torch.Tensor:
        """Last hidden states (B, T, D) at the positions that predict the T completion tokens."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        model_inputs = {key: inputs[key] for key in _MODEL_INPUT_FIELDS if inputs.get(key) is not None}
        num_tokens = inputs["completion_ids"].size(1)
        with self.accelerator.autocast():
            hidden = model(
                input_ids=input_ids, attention_mask=attention_mask, calibrl_hidden_states=True, **model_inputs
            )
        return hidden[:, -num_tokens - 1 : -1]

    # ------------------------------------------------------------------ metrics
    def _mean_across_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.gather(value.detach().float().reshape(1)).nanmean().item()

    def _token_mean_across_processes(self, mean: torch.Tensor, count: torch.Tensor) -> float:
        """The token mean over every process's tokens, from this process's mean over its ``count`` tokens."""
        totals = self.accelerator.reduce(torch.stack([mean.detach().float() * count, count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(self, mode: str, out: ck.LossOutput, accumulation: int, kernel_mask, is_expert) -> None:
        # pg_loss / guide_loss: the micro-batch's terms before the accumulation division (TRL's policy_loss).
        for name in ("pg_loss", "guide_loss"):
            self._metrics[mode][name].append(self._mean_across_processes(getattr(out, name) * accumulation))
        tokens = kernel_mask.sum()
        on_policy_tokens = kernel_mask[~is_expert].sum()
        self._metrics[mode]["entropy"].append(self._token_mean_across_processes(out.entropy, on_policy_tokens))
        for name in ("clipfrac", "clipfrac_lower", "ppo_kl"):
            self._metrics[mode][name].append(self._token_mean_across_processes(getattr(out, name), tokens))

    def _log_group_metrics(self, mode, scores, is_expert, passed, completion_mask) -> None:
        on_policy = ~is_expert
        self._metrics[mode]["calibrl/pass_rate"].append(self._mean_across_processes(passed[on_policy].float().mean()))
        if bool(is_expert.any()):
            self._metrics[mode]["calibrl/expert_reward"].append(self._mean_across_processes(scores[is_expert].mean()))
            expert_len = completion_mask[is_expert].sum(-1).float().mean()
            self._metrics[mode]["calibrl/expert_length"].append(self._mean_across_processes(expert_len))
