"""What the TRL and verl integrations share, checked without TRL or verl: the expert-completion parser and
the CalibRLConfig field map."""

import pytest

from calibrl.integrations._core import expert_text, expert_token_ids


def test_expert_text_accepts_every_dataset_form():
    assert expert_text("plain", "expert") == "plain"
    assert expert_text({"role": "assistant", "content": "one message"}, "expert") == "one message"
    assert expert_text({"content": "no role"}, "expert") == "no role"  # a bare message is the assistant's
    conversation = [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": [{"type": "text", "text": "la"}, {"type": "image"}, {"text": "st"}]},
    ]
    assert expert_text(conversation, "expert") == "last"  # the last assistant message, its text blocks joined


@pytest.mark.parametrize(
    "value, error, message",
    [
        (5, TypeError, r"col \(row 2\): expected a string or an assistant message, got int: 5"),
        (None, TypeError, r"col \(row 2\): expected a string .* got NoneType"),
        ([], TypeError, r"col \(row 2\): expected a string .* got list"),
        ("  \n", ValueError, r"col \(row 2\): expected a non-empty expert completion, got '  \\n'"),
        ([{"role": "user", "content": "q"}], ValueError, r"col \(row 2\): messages without an assistant message"),
        ({"role": "assistant", "content": [{"type": "image"}]}, ValueError, r"col \(row 2\): expected a non-empty"),
    ],
)
def test_expert_text_rejects_bad_values(value, error, message):
    with pytest.raises(error, match=message):
        expert_text(value, "col (row 2)")


def encode(text):
    return [ord(c) - ord("a") + 1 for c in text]


def test_expert_token_ids_appends_eos_once_and_checks_the_limit():
    assert expert_token_ids("abc", encode, [9], 4, "expert", "limit") == [1, 2, 3, 9]
    assert expert_token_ids("abc", encode, [], None, "expert", "limit") == [1, 2, 3]  # no EOS wanted
    # Already ending with any of the EOS ids: nothing appended.
    assert expert_token_ids("abc", encode, [9, 3], 3, "expert", "limit") == [1, 2, 3]
    with pytest.raises(ValueError, match=r"expert: the expert completion has 5 tokens, more than limit=4; shorten"):
        expert_token_ids("abcd", encode, [9], 4, "expert", "limit")


def test_verl_field_map_covers_every_calibrl_config_field():
    import dataclasses

    import calibrl_kernels as ck
    from calibrl.integrations import verl as cverl  # imports without verl

    defaults = ck.CalibRLConfig()
    kernel = {f.name for f in dataclasses.fields(ck.CalibRLConfig)}
    assert set(cverl.VERL_OWNED_FIELDS) <= kernel
    for name in sorted(kernel - set(cverl.VERL_OWNED_FIELDS)):  # the `calibrl:` section takes every other field
        assert cverl.calibrl_overrides({name: getattr(defaults, name)}) == {name: getattr(defaults, name)}
    for name, key in cverl.VERL_OWNED_FIELDS.items():
        with pytest.raises(ValueError, match=f"calibrl.{name}: set it through verl's {key} instead"):
            cverl.calibrl_overrides({name: getattr(defaults, name)})
    with pytest.raises(ValueError, match="calibrl.no_such_field: not a CalibRLConfig field"):
        cverl.calibrl_overrides({"no_such_field": 1})
    # verl's policy-loss names come from the loss modes of the one algorithm table.
    assert sorted(cverl.POLICY_LOSSES.values()) == sorted(ck.config.MODES)
