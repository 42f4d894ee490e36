import pytest

from calibrl_kernels import CalibRLConfig


def test_defaults_match_the_paper():
    cfg = CalibRLConfig()
    assert (cfg.mode, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c) == ("calibrl", 0.2, 0.2, 3.0)
    assert (cfg.guide_coef, cfg.activation, cfg.negative_slope) == (0.1, "leaky_relu", 0.5)
    assert (cfg.baseline, cfg.entropy_coef, cfg.loss_agg_mode) == ("position", 0.0, "token-mean")
    assert cfg.weight_by_advantage and not cfg.mask_beyond_expert and not cfg.norm_by_std


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "ppo"),
        ("activation", "gelu"),
        ("baseline", "token"),
        ("loss_agg_mode", "mean"),
        ("clip_low", -0.1),
        ("clip_high", -0.1),
        ("clip_low", 1.0),
        ("dual_clip_c", 1.0),
        ("negative_slope", 1.5),
        ("negative_slope", -0.1),
        ("temperature", 0.0),
        ("guide_coef", float("nan")),
        ("loss_scale_factor", 0),
        ("loss_scale_factor", True),
    ],
)
def test_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"CalibRLConfig.{field}"):
        CalibRLConfig(**{field: value})


def test_dual_clip_can_be_turned_off():
    assert CalibRLConfig(dual_clip_c=None).dual_clip_c is None
    assert CalibRLConfig(dual_clip_c=None).dual_clip_bound > 1e20  # never binds: rho <= exp(20)
    assert CalibRLConfig(dual_clip_c=2).dual_clip_bound == 2.0


def test_bool_fields_reject_non_bools():
    with pytest.raises(TypeError, match="weight_by_advantage"):
        CalibRLConfig(weight_by_advantage=1)


def test_config_is_frozen():
    cfg = CalibRLConfig()
    with pytest.raises(Exception):
        cfg.mode = "grpo"
    assert cfg.replace(mode="grpo").mode == "grpo"


@pytest.mark.parametrize(
    "algo, mode, norm, agg",
    [
        ("calibrl", "calibrl", False, "token-mean"),
        ("grpo", "grpo", True, "seq-mean-token-mean"),
        ("sft+grpo", "grpo", True, "seq-mean-token-mean"),
        ("dapo", "dapo", True, "token-mean"),
        ("drgrpo", "drgrpo", False, "seq-mean-token-sum-norm"),
        ("luffy", "luffy", False, "token-mean"),
        ("rlplus", "rlplus", False, "token-mean"),
    ],
)
def test_algorithm_presets(algo, mode, norm, agg):
    cfg = CalibRLConfig.for_algo(algo)
    assert (cfg.mode, cfg.norm_by_std, cfg.loss_agg_mode) == (mode, norm, agg)
    assert CalibRLConfig.for_algo(algo, clip_high=0.28).clip_high == 0.28
    with pytest.raises(ValueError, match="algo"):
        CalibRLConfig.for_algo("ppo2")


# ------------------------------------------------------------------------------------------------
# TrainConfig: every numeric setting, from every source (flag, YAML / JSON file, Python dataclass)
# ------------------------------------------------------------------------------------------------
# Numeric fields for which 0 is meaningful (0: all / none / off / torch's default); for every other one 0 is
# refused. A new numeric field must be added to one of the two sets.
ZERO_ALLOWED = {
    "train_examples",
    "eval_examples",
    "sft_steps",
    "extra_sft_steps",
    "max_steps",
    "warmup_steps",
    "micro_batch_rows",
    "keep_checkpoints",
    "threads",
    "seed",
    "weight_decay",
    "grad_clip",
    "mix_ratio",
    "pass_ratio_low",
    "pass_ratio_high",
    "diagnostics_every",
}
ZERO_REFUSED = {
    "image_size",
    "patch_size",
    "vision_dim",
    "vision_depth",
    "hidden_size",
    "num_layers",
    "num_heads",
    "mlp_ratio",
    "vocab_size",
    "sft_batch_size",
    "sft_lr",
    "prompts_per_step",
    "rollouts_per_prompt",
    "max_new_tokens",
    "lr",
    "ppo_epochs",
    "mini_batches",
    "eval_every",
    "eval_batch_size",
    "save_every",
    "max_bad_steps",
    "eval_samples",
}


def _numeric_fields():
    import dataclasses
    import typing

    from calibrl.config import TrainConfig, _base_type

    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: _base_type(hints[f.name])
        for f in dataclasses.fields(TrainConfig)
        if _base_type(hints[f.name]) in (int, float)
    }


def test_every_numeric_setting_is_in_the_table():
    assert set(_numeric_fields()) == ZERO_ALLOWED | ZERO_REFUSED and not ZERO_ALLOWED & ZERO_REFUSED


def _bad_values(name, kind):
    """(value as a Python object, as YAML text) pairs that must be refused for field ``name``."""
    values = [(-1, "-1"), (True, "true"), ("abc", "abc"), ([1], "[1]")]
    if name not in ZERO_ALLOWED:
        values.append((0, "0"))
    if kind is float:
        values += [
            (float("nan"), ".nan"),
            (float("inf"), ".inf"),
            (float("-inf"), "-.inf"),
            ("nan", "'nan'"),
            ("1e-4", "'1e-4'"),
        ]  # a string is refused from Python (the file converts it, see below)
    else:
        values += [(2.5, "2.5"), (float("nan"), ".nan"), (float("inf"), ".inf")]
    return values


@pytest.mark.parametrize("name, kind", sorted(_numeric_fields().items()))
def test_bad_numeric_settings_are_refused_naming_the_field_from_every_source(tmp_path, name, kind, capsys):
    from calibrl.config import ConfigError, TrainConfig, build_parser, parse_config

    flag = f"--{name.replace('_', '-')}"
    for value, yaml_text in _bad_values(name, kind):
        if not (isinstance(value, str) and kind is float and value == "1e-4"):
            with pytest.raises(ConfigError, match=rf"^{name}: expected "):  # the Python dataclass
                TrainConfig(**{name: value}).validate()
        path = tmp_path / "run.yaml"
        path.write_text(f"{name}: {yaml_text}\n")
        if yaml_text == "'1e-4'":
            assert getattr(parse_config(["--config", str(path)]), name) == 1e-4  # YAML reads 1e-4 as text
            continue
        with pytest.raises(ConfigError, match=rf"^{name}: expected "):  # a YAML config file
            parse_config(["--config", str(path)])
        if isinstance(value, list):
            continue
        text = yaml_text.lstrip(".").replace("'", "").replace("-.", "-").replace("true", "True")
        try:  # a flag: argparse refuses what is no number of the type, naming the flag (usage error, exit 2)
            parse_config([flag, text], build_parser())
        except SystemExit as exit_info:
            assert exit_info.code == 2 and f"argument {flag}" in capsys.readouterr().err
        except ConfigError as error:
            assert str(error).startswith(f"{name}: expected ")
        else:
            pytest.fail(f"{flag} {text} was accepted")


def test_file_strings_are_converted_to_the_field_type(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; numeric and boolean fields convert what parses."""
    from calibrl.config import parse_config

    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\nmax_steps: '7'\ntensorboard: 'false'\nloss:\n  guide_coef: '0.3'\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.lr, cfg.max_steps, cfg.tensorboard, cfg.loss_config().guide_coef) == (1e-4, 7, False, 0.3)


def test_the_trainer_validates_a_config_built_in_python():
    import torch

    from calibrl import distributed
    from calibrl.config import ConfigError, TrainConfig
    from calibrl.train import Trainer

    with pytest.raises(ConfigError, match="lr: expected a finite number > 0, got nan"):
        Trainer(TrainConfig(lr=float("nan")), distributed.DistInfo(0, 1, torch.device("cpu")))
