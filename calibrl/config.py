"""Configuration of a training run: ``TrainConfig`` (one help text per field) and its command line.

Precedence, lowest first: the field defaults, the ``--quick`` preset, a YAML/JSON file given with
``--config``, then flags. Every ``CalibRLConfig`` field (the loss) is a flag too (``--guide-coef``,
``--norm-by-std`` / ``--no-norm-by-std``, ...); unset loss fields take the ``--algo`` preset
(``CalibRLConfig.for_algo``). In a config file the loss fields may sit at the top level or under ``loss:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import typing
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from calibrl_kernels import CalibRLConfig
from calibrl_kernels.config import ALGORITHM_PRESETS

ALGOS = tuple(ALGORITHM_PRESETS)  # --algo choices
LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(CalibRLConfig))


class SettingsWarning(UserWarning):
    """Saved settings that this version does not know were ignored."""


class ConfigError(ValueError):
    """A setting (flag, config file or resumed run) that cannot work; ``main`` reports it like argparse."""


def _field(default, help_text: str, low=None, high=None):
    """A TrainConfig field; ``low`` / ``high``: the range of a numeric field (``high`` None: unbounded)."""
    metadata = {"help": help_text} if low is None else {"help": help_text, "low": low, "high": high}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run; the defaults are the no-argument CPU run (<= 10 minutes on 2 cores)."""

    # --- what to train on
    algo: str = _field("calibrl", f"algorithm: one of {ALGOS}")
    model: Optional[str] = _field(None, "local Hugging Face checkpoint folder; default: build the tiny Qwen2-VL model")
    data: str = _field("easy-vqa", "'easy-vqa' or a JSONL file of {image, question, answer, expert} rows")
    eval_data: Optional[str] = _field(
        None, "JSONL for evaluation; default: easy-vqa's test split (with JSONL data: none)"
    )
    ood_eval_data: Optional[str] = _field(
        None,
        "a second held-out JSONL (e.g. out-of-domain questions), evaluated "
        "beside eval_data; its metrics are logged as ood_eval_*",
    )
    train_examples: int = _field(0, "use only the first N training questions (0: all)", low=0)
    eval_examples: int = _field(512, "held-out questions per greedy evaluation (0: all)", low=0)
    reward_fn: Optional[str] = _field(
        None,
        "your verifier as 'package.module:function' (response, answer) -> Score "
        "or reward; default: calibrl.rewards.score_response. A sample it "
        "raises on scores 0 and is counted in reward_errors",
    )
    reward_format: str = _field(
        "strict",
        "the built-in verifier: 'strict' (one <think> block then one <answer> block, "
        "nothing else; a response cut at max_new_tokens fails the format and "
        "scores 0, also with --reward-fn) or 'authors' (first <answer>, lazy "
        "format match, truncation ignored: docs/method.md's reward parsing)",
    )
    instruction: Optional[str] = _field(
        None,
        "text appended to every question; default: none for the tiny model, "
        "a <think>/<answer> format instruction for --model",
    )
    # --- the tiny built-in model (ignored with --model)
    image_size: int = _field(64, "images are resized to image_size x image_size pixels", low=1)
    patch_size: int = _field(8, "vision patch size; (image_size / patch_size)^2 / 4 visual tokens per image", low=1)
    vision_dim: int = _field(96, "vision tower width", low=1)
    vision_depth: int = _field(2, "vision tower blocks", low=1)
    hidden_size: int = _field(192, "language model width (a multiple of 16 * num_heads)", low=1)
    num_layers: int = _field(3, "language model decoder layers", low=1)
    num_heads: int = _field(2, "attention heads of the language model", low=1)
    mlp_ratio: int = _field(4, "MLP width / hidden_size in the language model", low=1)
    vocab_size: int = _field(512, "upper bound of the BPE vocabulary trained on the task text", low=1)
    init_from: Optional[str] = _field(
        None,
        "start from the latest checkpoint of this run folder (its weights and "
        "tokenizer; the model flags must match it) instead of a fresh model",
    )
    # --- supervised warm start on expert traces
    sft_steps: int = _field(350, "supervised steps on expert responses before RL", low=0)
    extra_sft_steps: int = _field(100, "sft+grpo only: further supervised steps (its SFT stage is longer)", low=0)
    sft_batch_size: int = _field(
        32,
        "questions per supervised step, over all processes (a multiple of the number of processes under torchrun)",
        low=1,
    )
    sft_lr: float = _field(5e-4, "learning rate of the warm start (2e-3 never learns to look at the image)", low=0.0)
    # --- RL
    max_steps: int = _field(80, "RL steps (each: rollouts, group statistics, PPO updates)", low=0)
    prompts_per_step: int = _field(
        8,
        "P: prompts (groups) per RL step, over all processes (a multiple of the "
        "number of processes under torchrun: each samples P / processes prompts)",
        low=1,
    )
    rollouts_per_prompt: int = _field(8, "n: on-policy responses per prompt (plus 1 expert row)", low=1)
    max_new_tokens: int = _field(24, "longest sampled response", low=1)
    lr: float = _field(
        5e-5,
        "learning rate of the RL updates (AdamW, fresh after the warm start; 2e-4 degrades the tiny model)",
        low=0.0,
    )
    weight_decay: float = _field(0.01, "AdamW weight decay", low=0.0)
    grad_clip: float = _field(1.0, "global gradient-norm clip (0: none)", low=0.0)
    warmup_steps: int = _field(20, "linear learning-rate warmup (optimizer steps) at the start of each phase", low=0)
    ppo_epochs: int = _field(1, "passes over each RL batch", low=1)
    mini_batches: int = _field(
        2,
        "optimizer steps per epoch: the step's P groups (over all processes) are split "
        "into this many mini-batches (at most P); under torchrun a process holding no "
        "group of a mini-batch takes part with a zero-weight pass",
        low=1,
    )
    micro_batch_rows: int = _field(
        0,
        "rows per forward/backward of each process within a mini-batch "
        "(0: the process's whole share of the mini-batch)",
        low=0,
    )
    mix_ratio: float = _field(1.0, "probability that a group keeps its expert row in the batch", low=0.0, high=1.0)
    mixup_policy: str = _field(
        "always",
        "'always' (mix_ratio) or 'pass' (keep the expert when the pass rate lies in [pass_ratio_low, pass_ratio_high])",
    )
    pass_ratio_low: float = _field(
        0.0, "mixup_policy=pass: lowest pass rate that keeps the expert row", low=0.0, high=1.0
    )
    pass_ratio_high: float = _field(
        1.0, "mixup_policy=pass: highest pass rate that keeps the expert row", low=0.0, high=1.0
    )
    # --- evaluation, logging, checkpoints
    eval_every: int = _field(10, "greedy held-out evaluation every K RL steps (and after the warm start)", low=1)
    eval_batch_size: int = _field(128, "prompts per evaluation generate call of each process", low=1)
    eval_samples: int = _field(
        1,
        "temperature-1 samples per held-out question: eval_sampled_* are their means; "
        "> 1 adds eval_distinct_answers, >= 8 eval_pass_at_8 (the study uses 8)",
        low=1,
    )
    eval_metrics: Optional[str] = _field(
        None,
        "extra held-out metrics as 'package.module:function' (response, answer) "
        "-> {name: value}, logged as eval_<name> (greedy) and "
        "eval_sampled_<name>",
    )
    diagnostics_every: int = _field(
        5,
        "log the guide regime (calibrl.diagnostics: z shares, guide / PG gradient "
        "norms and cosine) every K RL steps (0: never)",
        low=0,
    )
    save_every: int = _field(20, "checkpoint every K steps (also at the end and on Ctrl-C)", low=1)
    keep_checkpoints: int = _field(2, "checkpoints kept in the run folder (oldest removed; 0 keeps all)", low=0)
    out: Optional[str] = _field(None, "run folder; default runs/<algo>-seed<seed>")
    resume: Optional[str] = _field(None, "continue the run in this folder from its latest checkpoint")
    tensorboard: bool = _field(True, "also write TensorBoard event files")
    progress: bool = _field(True, "show the tqdm progress bar")
    # --- machine
    # below 2**31: numpy seeds the processes with seed + 1000 * rank, below 2**32
    seed: int = _field(0, "seed of model init, data order and sampling", low=0, high=2**31 - 1)
    device: str = _field("auto", "'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _field(
        "auto",
        "'auto' (bf16 on cuda, fp32 on cpu), 'fp32', 'bf16': bf16 means bf16 autocast of "
        "every forward pass (sampling, old log-probs, update, evaluation) with fp32 "
        "weights and optimizer state",
    )
    threads: int = _field(
        1,
        "torch CPU threads (0: torch's default); 1 is fastest for the tiny model and robust "
        "on a shared machine (2 busy-waiting threads on 2 busy cores crawl)",
        low=0,
    )
    quick: bool = _field(False, "a tiny run of a few seconds (tests, smoke checks)")
    compile: bool = _field(
        False,
        "run the policy loss (the fused lm_head op with its group statistics and baseline) under "
        "torch.compile(fullgraph=True); the model forward stays eager",
    )
    # --- faults
    max_bad_steps: int = _field(
        3,
        "stop (after checkpointing the last good state) when this many steps in a row "
        "had a non-finite loss or gradient; such a step never updates the weights",
        low=1,
    )
    skip_bad_rows: bool = _field(
        False,
        "skip (and count) data rows that fail validation instead of refusing "
        "to start; each is reported with its file:line",
    )
    # --- the loss: CalibRLConfig overrides; unset fields follow the --algo preset
    loss: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"help": "CalibRLConfig overrides"})
    # --- not a setting: the fields the user set explicitly (checked on --resume); never saved
    explicit: Tuple[str, ...] = dataclasses.field(default=(), compare=False, metadata={"help": None})

    def loss_config(self) -> CalibRLConfig:
        """The CalibRLConfig of this run: the algorithm's preset with the overrides applied."""
        return CalibRLConfig.for_algo(self.algo, **self.loss)

    def validate(self) -> "TrainConfig":
        check_field_types(self)
        if self.algo not in ALGOS:
            raise ConfigError(f"algo: expected one of {ALGOS}, got {self.algo!r}")
        unknown = sorted(set(self.loss) - set(LOSS_FIELDS))
        if unknown:
            raise ConfigError(f"loss: unknown CalibRLConfig field(s) {unknown}; known: {LOSS_FIELDS}")
        try:
            self.loss_config()  # validates the loss fields
        except (TypeError, ValueError) as error:
            raise ConfigError(f"loss: {error}") from error
        for name, (low, high) in NUMERIC_RANGES.items():
            value = getattr(self, name)
            above_low = value > low if name in POSITIVE else value >= low
            if not (above_low and (high is None or value <= high) and math.isfinite(value)):  # False for NaN
                kind = "an integer" if isinstance(low, int) else "a number" if high is not None else "a finite number"
                bound = (
                    f"in [{_show(low)}, {_show(high)}]"
                    if high is not None
                    else f"{'>' if name in POSITIVE else '>='} {_show(low)}"
                )
                raise ConfigError(f"{name}: expected {kind} {bound}, got {value}")
        if self.mini_batches > self.prompts_per_step:
            raise ConfigError(
                f"mini_batches: expected at most prompts_per_step={self.prompts_per_step}, got {self.mini_batches}"
            )
        if self.pass_ratio_low > self.pass_ratio_high:
            raise ConfigError(
                f"pass_ratio_low: expected at most pass_ratio_high={self.pass_ratio_high}, got {self.pass_ratio_low}"
            )
        if self.mixup_policy not in ("always", "pass"):
            raise ConfigError(f"mixup_policy: expected 'always' or 'pass', got {self.mixup_policy!r}")
        if self.reward_format not in ("strict", "authors"):
            raise ConfigError(f"reward_format: expected 'strict' or 'authors', got {self.reward_format!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype: expected 'auto', 'fp32' or 'bf16', got {self.dtype!r}")
        if self.init_from and self.model:
            raise ConfigError("init_from: cannot be combined with model (which brings its own weights)")
        if self.model is None and self.image_size % (2 * self.patch_size):
            raise ConfigError(
                f"image_size: expected a multiple of 2 * patch_size = {2 * self.patch_size}, got {self.image_size}"
            )
        return self

    def check_processes(self, world_size: int) -> "TrainConfig":
        """The per-process limits of a run over ``world_size`` processes (torchrun): batches split evenly."""
        for name in ("prompts_per_step", "sft_batch_size"):
            if getattr(self, name) % world_size:
                raise ConfigError(
                    f"{name}: expected a multiple of the number of processes ({world_size}) so that "
                    f"each process gets the same share, got {getattr(self, name)}"
                )
        return self

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", f"{self.algo.replace('+', '-')}-seed{self.seed}")

    def to_dict(self) -> Dict[str, Any]:
        """The saved settings (config.json, checkpoints): every field except ``explicit``."""
        values = dataclasses.asdict(self)
        values.pop("explicit")
        return values


# Allowed values of every numeric field, from its declaration: (lowest, highest or None); ints for integer fields.
NUMERIC_RANGES: Dict[str, Tuple[Any, Any]] = {
    f.name: (f.metadata["low"], f.metadata["high"]) for f in dataclasses.fields(TrainConfig) if "low" in f.metadata
}

POSITIVE = ("sft_lr", "lr")  # fields whose lowest value is excluded


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    """The resolved field annotations of a dataclass (resolving them is slow: done once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _show(bound) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _expected_type(annotation) -> Tuple[type, bool]:
    """(bool, int, float or str, whether None is allowed) of a TrainConfig field's annotation."""
    args = typing.get_args(annotation)
    return _base_type(annotation), type(None) in args


def check_field_types(cfg: "TrainConfig") -> None:
    """Every field holds its declared type (a bool is no number, an int is a valid float): ConfigError naming it."""
    hints = _hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_FLAGS:
            continue
        kind, optional = _expected_type(hints[f.name])
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            continue
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ConfigError(
                f"{f.name}: expected {_TYPE_NAMES[kind]}{' or None' if optional else ''}, got "
                f"{value!r} ({type(value).__name__})"
            )
    if not isinstance(cfg.loss, dict):
        raise ConfigError(f"loss: expected a mapping of CalibRLConfig fields, got {cfg.loss!r}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def coerce_text(name: str, value: Any, kind: type) -> Any:
    """A config file's string ``value`` of a numeric or boolean field as the field's type (YAML reads 1e-4
    as a string); other values unchanged (the type check then refuses what does not fit)."""
    if not isinstance(value, str) or kind is str:
        return value
    text = value.strip()
    try:
        if kind is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{name}: expected {_TYPE_NAMES[kind]}, got {value!r}") from None
    return value


# A run of a few seconds on 2 cores: tiny model, 2 groups of 3 rollouts, 2 RL steps.
QUICK_PRESET: Dict[str, Any] = dict(
    train_examples=256,
    eval_examples=8,
    image_size=32,
    patch_size=8,
    vision_dim=32,
    vision_depth=1,
    hidden_size=32,
    num_layers=1,
    num_heads=1,
    mlp_ratio=2,
    sft_steps=2,
    extra_sft_steps=2,
    sft_batch_size=4,
    max_steps=2,
    prompts_per_step=2,
    rollouts_per_prompt=3,
    max_new_tokens=8,
    mini_batches=2,
    eval_every=1,
    eval_batch_size=8,
    save_every=1,
    progress=False,
)
# Fields that are no flags: the loss overrides have their own flags; ``explicit`` is bookkeeping.
NOT_FLAGS = ("loss", "explicit")
# Flags that may differ when resuming a run (they do not change what is computed).
RESUME_SAFE = (
    "max_steps",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "tensorboard",
    "progress",
    "device",
    "threads",
    "resume",
    "out",
    "max_bad_steps",
    "skip_bad_rows",
    "compile",
    "diagnostics_every",
    "data",
    "eval_data",
    "ood_eval_data",
)  # changed data is checked against the run's (calibrl.data)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def _base_type(annotation) -> type:
    """float for Optional[float], str for Optional[str] and so on."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _add_flag(parser: argparse.ArgumentParser, name: str, kind: type, help_text: str) -> None:
    flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    if kind is bool:
        parser.add_argument(
            *flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
        )
    else:
        parser.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m calibrl.train",
        description="Hybrid-policy RL (CalibRL and baselines) on a small multimodal model; CPU by default.",
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig / CalibRLConfig fields")
    train_hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in NOT_FLAGS:
            _add_flag(parser, f.name, _base_type(train_hints[f.name]), f.metadata["help"])
    group = parser.add_argument_group("loss (CalibRLConfig; default: the --algo preset)")
    hints = typing.get_type_hints(CalibRLConfig)
    for f in dataclasses.fields(CalibRLConfig):
        _add_flag(group, f.name, _base_type(hints[f.name]), f"CalibRLConfig.{f.name}: {f.metadata['help']}")
    return parser


def read_config_file(path: str) -> Dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file of fields; loss fields flat or under 'loss'."""
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(handle) or {}
        else:
            values = json.load(handle)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values, got {type(values).__name__}")
    return values


def _apply(
    values: Dict[str, Any], train: Dict[str, Any], loss: Dict[str, Any], origin: str, from_file: bool = False
) -> None:
    """Sort ``values`` into TrainConfig fields and CalibRLConfig fields; unknown names raise ValueError.
    ``from_file``: strings of numeric / boolean fields are converted (YAML reads 1e-4 as text)."""
    train_hints = {name: hint for name, hint in _hints(TrainConfig).items() if name not in NOT_FLAGS}
    loss_hints = _hints(CalibRLConfig)

    def converted(key: str, value: Any, hints: Dict[str, Any]) -> Any:
        return coerce_text(key, value, _base_type(hints[key])) if from_file else value

    for key, value in values.items():
        if key == "loss":
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: 'loss' must be a mapping of CalibRLConfig fields, got {value!r}")
            _unknown(origin, [k for k in value if k not in LOSS_FIELDS])
            loss.update({k: converted(k, v, loss_hints) for k, v in value.items()})
        elif key in train_hints:
            train[key] = converted(key, value, train_hints)
        elif key in LOSS_FIELDS:
            loss[key] = converted(key, value, loss_hints)
        else:
            _unknown(origin, [key])


def _unknown(origin: str, names: List[str]) -> None:
    if names:
        raise ConfigError(f"{origin}: unknown field(s) {names}; see python -m calibrl.train --help")


def parse_config(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """TrainConfig from defaults < --quick preset < --config file < flags (ConfigError when invalid)."""
    args = vars((parser or build_parser()).parse_args(argv))
    file_path = args.pop("config", None)
    file_values = read_config_file(file_path) if file_path else {}
    train: Dict[str, Any] = {}
    loss: Dict[str, Any] = {}
    if args.get("quick") or file_values.get("quick"):
        _apply(QUICK_PRESET, train, loss, "--quick preset")
    _apply(file_values, train, loss, file_path or "", from_file=True)
    _apply(args, train, loss, "command line")
    explicit = tuple(sorted(set(args) | set(file_values)))  # what the user set (checked on --resume)
    return TrainConfig(**train, loss=loss, explicit=explicit).validate()


def config_from_dict(values: Dict[str, Any], origin: str = "saved config") -> TrainConfig:
    """TrainConfig from a saved ``to_dict`` (checkpoint / config.json); settings this version does not know
    (a run of a newer version) are ignored with a warning naming them."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"explicit"}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(
            f"{origin}: ignoring setting(s) {unknown} unknown to this version of calibrl (written by a newer one?)",
            SettingsWarning,
            stacklevel=2,
        )
    return TrainConfig(**{k: v for k, v in values.items() if k in known}).validate()


def merge_resume(saved: TrainConfig, given: TrainConfig) -> TrainConfig:
    """The saved config of a resumed run with the resume-safe flags the user gave now."""
    changed: List[str] = []
    for name in given.explicit:
        if name in ("quick", "config"):
            continue
        if name in RESUME_SAFE:
            setattr(saved, name, getattr(given, name))
        elif name in LOSS_FIELDS:
            if saved.loss.get(name) != given.loss.get(name):
                changed.append(name)
        elif getattr(saved, name) != getattr(given, name):
            changed.append(name)
    if changed:
        raise ConfigError(f"--resume: {changed} differ from the saved run's config; only {RESUME_SAFE} may change")
    return saved.validate()
