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
