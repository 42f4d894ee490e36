"""CalibRL inside TRL: ``CalibRLTrainer(GRPOTrainer)`` and ``CalibRLGRPOConfig(GRPOConfig)``.

Tested against TRL 1.16.0 with transformers 5.23.0 and torch 2.13.0. What it changes in TRL's GRPO loop:

* Generation and scoring (``GRPOTrainer._generate_and_score_completions``): TRL generates ``num_generations``
  completions per prompt and scores them; this class then appends, per prompt, one expert completion
  taken from the dataset column ``expert_column``, scores it with the same reward functions
  (``GRPOTrainer._calculate_rewards``), computes its old log-probs (``_get_per_token_logps_and_entropies``),
  and replaces TRL's advantages by CalibRL's group statistics over the on-policy rows. Per-row fields
  (group id, is_expert, pass flag, reward, expert baseline (B, T)) are added as tensors whose first
  dimension is the row, so they survive TRL's ``shuffle_sequence_dict`` and ``split_tensor_dict`` (images
  go through ``split_pixel_values_by_grid`` like TRL's own fields).
* Loss (``compute_loss``): the model body is run once to get its last hidden states and the loss is
  ``calibrl_kernels.fused_linear_calibrl_loss`` on those and the lm_head weight, so the (B*T, V) logits
  never exist. TRL 1.16 itself scores tokens through the fused LM head it patches onto the model
  (``trl.trainer.utils.add_fused_lm_head``; its ``use_liger_kernel`` loss path is deprecated and no longer
  hands hidden states to a loss); this class patches the model's forward the same way with one extra
  keyword, ``calibrl_hidden_states=True``, that returns the body's last hidden states, so the call still
  goes through DDP/FSDP wrappers.
* Metrics: pg_loss, guide_loss, entropy, clipfrac, clipfrac_lower, ppo_kl and expert reward / pass rate
  are logged beside TRL's own reward and length metrics.

Every ``CalibRLConfig.mode`` works (calibrl, grpo, dapo, drgrpo, luffy, rlplus); modes without expert
terms also run without an expert column (``expert_column=None``). ``calibrl_algo="sft+grpo"`` is plain
``grpo`` here: this class runs no supervised warm start (run ``trl.SFTTrainer`` on the expert column first).

The CalibRL preset decides the loss aggregation (``loss_agg_mode``) and whether advantages are divided by
the group's std (``norm_by_std``); TRL's ``loss_type`` and ``scale_rewards`` would say the same thing
differently, so they must keep TRL's defaults (``"dapo"``, ``"group"``; both ignored) and any other value
is refused: set ``calibrl_loss_agg_mode`` / ``calibrl_norm_by_std`` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import calibrl_kernels as ck

from . import _core

try:  # TRL is an optional dependency: `pip install calibrl[trl]`
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid
except ImportError as _error:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "calibrl.integrations.trl needs TRL >= 1.16: pip install 'calibrl[trl]' "
        f"(importing trl failed: {_error})"
    ) from _error

__all__ = ["CalibRLGRPOConfig", "CalibRLTrainer", "calibrl_batch_loss", "hybrid_batch_fields"]

calibrl_batch_loss = _core.calibrl_batch_loss
hybrid_batch_fields = _core.hybrid_batch_fields

# Flat CLI fields of CalibRLGRPOConfig -> CalibRLConfig fields (None leaves the algorithm preset's value).
_FLAT_FIELDS = (
    "guide_coef", "negative_slope", "activation", "baseline", "mask_beyond_expert", "weight_by_advantage",
    "dual_clip_c", "loss_agg_mode", "loss_scale_factor", "norm_by_std", "pass_threshold", "entropy_coef",
)
# Batch fields whose second dimension is prompt + completion tokens (padded with zeros when the
# completion width grows to fit an expert row).
_SEQUENCE_WIDE_FIELDS = ("token_type_ids", "mm_token_type_ids")
# Batch fields whose second dimension is the completion length.
_COMPLETION_WIDE_FIELDS = ("completion_ids", "completion_mask", "old_per_token_logps")
# Multimodal keys TRL keeps in its batch and hands to the model.
_MODEL_INPUT_FIELDS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
    "mm_token_type_ids", "image_position_ids",
)


def _flat_field(name: str, help_text: str):
    return field(default=None, metadata={"help": f"CalibRLConfig.{name} (None: the algorithm's preset). {help_text}"})


@dataclass
class CalibRLGRPOConfig(GRPOConfig):
    """GRPOConfig plus the CalibRL loss configuration and the dataset's expert column.

    The loss configuration is ``calibrl`` when given (a ``calibrl_kernels.CalibRLConfig``), else
    ``CalibRLConfig.for_algo(calibrl_algo)`` with the non-None flat ``calibrl_*`` fields applied (these
    are what the command line sets). In both cases the PPO clip range and the temperature are TRL's
    ``epsilon``, ``epsilon_high`` and ``temperature`` (one source of truth; a ``calibrl`` object that
    disagrees is an error). ``beta`` (TRL's KL term) must stay 0: CalibRL has no KL term. ``loss_type`` and
    ``scale_rewards`` must keep TRL's defaults: the preset's ``loss_agg_mode`` and ``norm_by_std`` decide
    (``calibrl_loss_agg_mode`` / ``calibrl_norm_by_std`` change them). ``calibrl_algo="sft+grpo"`` is the
    ``grpo`` loss: no supervised warm start happens inside this trainer.
    """

    calibrl: Optional[Any] = field(
        default=None, metadata={"help": "A calibrl_kernels.CalibRLConfig; overrides calibrl_algo and the flat fields."}
    )
    calibrl_algo: str = field(
        default="calibrl",
        metadata={"help": "Preset of CalibRLConfig.for_algo: calibrl, grpo, sft+grpo (= grpo: no warm start in "
                          "TRL), dapo, drgrpo, luffy, rlplus."},
    )
    expert_column: Optional[str] = field(
        default="expert",
        metadata={"help": "Dataset column with one expert completion per prompt (text or assistant message); "
                  "None runs without expert rows (grpo/dapo/drgrpo only)."},
    )
    expert_append_eos: bool = field(
        default=True, metadata={"help": "End each expert completion with the tokenizer's EOS, as generation does."}
    )
    calibrl_guide_coef: Optional[float] = _flat_field("guide_coef", "beta, weight of the guide term.")
    calibrl_negative_slope: Optional[float] = _flat_field("negative_slope", "alpha of the LeakyReLU.")
    calibrl_activation: Optional[str] = _flat_field("activation", "leaky_relu, relu, tanh, sigmoid, huber, none.")
    calibrl_baseline: Optional[str] = _flat_field("baseline", "position or sequence-mean.")
    calibrl_mask_beyond_expert: Optional[bool] = _flat_field("mask_beyond_expert", "")
    calibrl_weight_by_advantage: Optional[bool] = _flat_field("weight_by_advantage", "")
    calibrl_dual_clip_c: Optional[float] = _flat_field("dual_clip_c", "")
    calibrl_loss_agg_mode: Optional[str] = _flat_field("loss_agg_mode", "")
    calibrl_loss_scale_factor: Optional[float] = _flat_field("loss_scale_factor", "")
    calibrl_norm_by_std: Optional[bool] = _flat_field("norm_by_std", "")
    calibrl_pass_threshold: Optional[float] = _flat_field("pass_threshold", "")
    calibrl_entropy_coef: Optional[float] = _flat_field("entropy_coef", "")

    def __post_init__(self):
        super().__post_init__()
        if self.calibrl is not None and not isinstance(self.calibrl, ck.CalibRLConfig):
            raise TypeError(
                f"calibrl: expected a calibrl_kernels.CalibRLConfig or None, got {type(self.calibrl).__name__}")
        self.calibrl_config  # validate now, not at the first batch

    @property
    def calibrl_config(self) -> ck.CalibRLConfig:
        """The resolved CalibRLConfig of this run."""
        clip_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        shared = {"clip_low": self.epsilon, "clip_high": clip_high, "temperature": self.temperature}
        if self.calibrl is not None:
            for name, value in shared.items():
                if getattr(self.calibrl, name) != value:
                    trl_name = {"clip_low": "epsilon", "clip_high": "epsilon_high", "temperature": "temperature"}[name]
                    raise ValueError(
                        f"calibrl.{name}: expected the GRPOConfig value {trl_name}={value!r} (TRL's field is the "
                        f"single source of truth), got {getattr(self.calibrl, name)!r}"
                    )
            return self.calibrl
        overrides = {name: getattr(self, f"calibrl_{name}") for name in _FLAT_FIELDS}
        overrides = {name: value for name, value in overrides.items() if value is not None}
        return ck.CalibRLConfig.for_algo(self.calibrl_algo, **overrides, **shared)

    def to_dict(self):
        d = super().to_dict()
        if isinstance(d.get("calibrl"), ck.CalibRLConfig):
            d["calibrl"] = dataclasses.asdict(d["calibrl"])
        return d


def expert_text(value: Any, column: str, row: int) -> str:
    """The text of one expert completion: a string, an assistant message, or a list of messages."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        assistant = [m for m in value if m.get("role", "assistant") == "assistant"]
        if not assistant:
            raise ValueError(f"{column}: row {row} has messages but no assistant message: {value!r}")
        content = assistant[-1].get("content")
        if isinstance(content, list):  # content blocks: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        value = content
    if not isinstance(value, str):
        raise TypeError(
            f"{column}: row {row} expected a string or an assistant message, got {type(value).__name__}: {value!r}"
        )
    if not value.strip():
        raise ValueError(f"{column}: row {row} holds an empty expert completion")
    return value


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
    """GRPOTrainer running the CalibRL hybrid-policy loss (or GRPO/DAPO/Dr.GRPO/LUFFY/RL-PLUS).

    Same arguments as ``trl.GRPOTrainer``; ``args`` must be a ``CalibRLGRPOConfig``. The dataset needs the
    ``args.expert_column`` column (one expert completion per prompt) unless the mode uses no expert.
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
        self._expert_column = self.args.expert_column
        self._check_dataset_columns(self.train_dataset, "train_dataset")
        self._check_group_layout()
        self._add_hidden_state_forward()
        self._captured_rewards = None

    # ------------------------------------------------------------------ set-up checks
    def _check_supported(self, args: CalibRLGRPOConfig) -> None:
        """TRL options whose semantics the CalibRL loss does not implement fail here, not silently."""
        cfg = self.calibrl_config
        if _core.needs_experts(cfg) and not args.expert_column:
            raise ValueError(f"expert_column: mode={cfg.mode!r} needs an expert completion per prompt, got None")
        unsupported = {
            "beta": (args.beta, 0.0, "CalibRL has no KL term; add one with calibrl_entropy_coef or keep beta=0"),
            "top_entropy_quantile": (args.top_entropy_quantile, 1.0, ""),
            "off_policy_mask_threshold": (args.off_policy_mask_threshold, None, ""),
            "importance_sampling_level": (args.importance_sampling_level, "token", ""),
            "delta": (args.delta, None, ""),
            "entropy_coef": (args.entropy_coef, 0.0, "use calibrl_entropy_coef"),
            "use_adaptive_entropy": (args.use_adaptive_entropy, False, ""),
        }
        decided_by_preset = {
            "loss_type": (args.loss_type, "dapo", f"the CalibRL preset aggregates with loss_agg_mode="
                          f"{cfg.loss_agg_mode!r}; set calibrl_loss_agg_mode to change it"),
            "scale_rewards": (args.scale_rewards, "group", f"the CalibRL preset decides std-normalisation of the "
                              f"advantages (norm_by_std={cfg.norm_by_std}); set calibrl_norm_by_std to change it"),
        }
        unsupported.update(decided_by_preset)
        for name, (value, default, hint) in unsupported.items():
            if value != default:
                raise ValueError(
                    f"{name}: CalibRLTrainer supports only {name}={default!r}, got {value!r}"
                    + (f" ({hint})" if hint else "")
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
        rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if rows % self.num_generations != 0:
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation = {rows} rows per process must hold whole "
                f"prompt groups of num_generations={self.num_generations} (group statistics and the expert "
                "baseline are computed per process)"
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
        for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling"):
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
        if num_rows % n != 0:
            raise ValueError(f"inputs: {num_rows} rows are not whole groups of num_generations={n}")
        num_groups = num_rows // n
        if self._expert_column:
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
        scores = self._weighted_scores(rewards_per_func[start:start + num_rows])  # (B_on,)
        device = scores.device
        first_group = self.accelerator.process_index * num_groups
        group_ids = torch.arange(num_groups, device=device).repeat_interleave(n) + first_group
        batch.pop("importance_sampling_ratio", None)
        batch.pop("sampling_per_token_logps", None)
        if "tool_mask" in batch:
            raise NotImplementedError("tool_mask: tool calling is not supported by CalibRLTrainer")

        if self._expert_column:
            batch, scores, group_ids, is_expert, baseline_logp = self._append_expert_rows(
                batch, inputs, reward_prompts, scores, group_ids, n, num_groups, mode
            )
        else:
            is_expert = torch.zeros(num_rows, dtype=torch.bool, device=device)
            baseline_logp = torch.zeros(batch["completion_ids"].shape, dtype=torch.float32, device=device)
        fields = _core.hybrid_batch_fields(
            scores, group_ids, is_expert, baseline_logp, batch["completion_mask"], self.calibrl_config
        )
        batch.update(fields)
        self._log_group_metrics(mode, scores, is_expert, fields[_core.FIELD_PASSED], batch["completion_mask"])
        return batch

    def _weighted_scores(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """One scalar reward per row: TRL's weighted sum over reward functions (unscorable rows -> 0)."""
        weights = self.reward_weights.to(rewards_per_func.device)
        scores = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        return torch.where(unscorable, torch.zeros_like(scores), scores).float()

    def _expert_completion_ids(self, inputs, num_groups: int, n: int) -> List[List[int]]:
        ids_list, limit = [], self.max_completion_length
        for g in range(num_groups):
            text = expert_text(inputs[g * n][self._expert_column], self._expert_column, g * n)
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.args.expert_append_eos and (not ids or ids[-1] not in self.eos_token_ids):
                ids = ids + [self.eos_token_ids[0]]
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"{self._expert_column}: the expert completion of row {g * n} has {len(ids)} tokens, more than "
                    f"max_completion_length={limit}; shorten it or raise max_completion_length"
                )
            ids_list.append(ids)
        return ids_list

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
        expert_scores = self._weighted_scores(expert_rewards[start:start + num_groups])

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
        experts["completion_mask"] = torch.zeros((num_groups, width), dtype=split["completion_mask"].dtype,
                                                 device=device)
        for g, ids in enumerate(expert_ids):
            experts["completion_ids"][g, : len(ids)] = torch.tensor(ids, device=device)
            experts["completion_mask"][g, : len(ids)] = 1
        expert_old = self._old_logps(unsplit_pixel_values_by_grid(experts), width, mode)  # (G, T)
        if "old_per_token_logps" in split:
            experts["old_per_token_logps"] = expert_old
        merged = unsplit_pixel_values_by_grid(_concat_rows(split, experts))

        is_expert = torch.cat([torch.zeros(num_rows, dtype=torch.bool),
                               torch.ones(num_groups, dtype=torch.bool)]).to(device)
        baseline_logp = torch.cat([torch.zeros(num_rows, width, device=device), expert_old.float()])
        all_scores = torch.cat([scores, expert_scores])
        all_groups = torch.cat([group_ids, group_ids[torch.as_tensor(heads, device=device)]])
        return merged, all_scores, all_groups, is_expert, baseline_logp

    @torch.no_grad()
    def _old_logps(self, rows: Dict[str, Any], width: int, mode: str) -> torch.Tensor:
        """Log-probs of the rows' completions under the current (sampling) policy, (rows, width)."""
        input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
        attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        model_inputs = {key: rows[key] for key in _MODEL_INPUT_FIELDS if rows.get(key) is not None}
        logps, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, attention_mask, width, batch_size=batch_size,
            num_images=rows.get("num_images"), num_tiles=rows.get("num_tiles"), **model_inputs,
        )
        return logps * rows["completion_mask"]  # zero on padding, as the authors' baseline is

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs: CalibRLTrainer does not return model outputs")
        out = self.calibrl_loss_output(model, inputs)
        mode = "train" if self.model.training else "eval"
        self._log_loss_metrics(mode, out)
        # TRL's GRPO losses are scaled for gradient accumulation in compute_loss (loss_is_scaled_for_ga).
        accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = accumulation if mode == "train" else 1.0
        return out.loss / scale

    def calibrl_loss_output(self, model, inputs) -> ck.LossOutput:
        """The LossOutput of one TRL micro-batch (the loss is not yet scaled for gradient accumulation)."""
        missing = [key for key in ("advantages", *_core.ROW_FIELDS) if key not in inputs]
        if missing:
            raise ValueError(f"inputs: missing {missing}; the batch was not produced by CalibRLTrainer's scoring step")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        hidden = self.completion_hidden_states(model, inputs)  # (B, T, D)
        head = self.accelerator.unwrap_model(model)
        head = head.get_base_model() if is_peft_model(head) else head
        lm_head = head.get_output_embeddings()
        with self.accelerator.autocast():
            return _core.calibrl_batch_loss(
                hidden, lm_head.weight, completion_ids, completion_mask, inputs.get("old_per_token_logps"),
                {key: inputs[key] for key in ("advantages", *_core.ROW_FIELDS)}, self.calibrl_config,
                bias=lm_head.bias,
            )

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

    def _log_loss_metrics(self, mode: str, out: ck.LossOutput) -> None:
        for name in ("pg_loss", "guide_loss", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl"):
            self._metrics[mode][name].append(self._mean_across_processes(getattr(out, name)))

    def _log_group_metrics(self, mode, scores, is_expert, passed, completion_mask) -> None:
        on_policy = ~is_expert
        self._metrics[mode]["calibrl/pass_rate"].append(self._mean_across_processes(passed[on_policy].float().mean()))
        if bool(is_expert.any()):
            self._metrics[mode]["calibrl/expert_reward"].append(self._mean_across_processes(scores[is_expert].mean()))
            expert_len = completion_mask[is_expert].sum(-1).float().mean()
            self._metrics[mode]["calibrl/expert_length"].append(self._mean_across_processes(expert_len))
