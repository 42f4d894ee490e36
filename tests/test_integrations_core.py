"""The expert-completion parser shared by the TRL and verl integrations (no TRL or verl needed)."""

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
