"""The policy's forward pass, generation and rollout batches agree with each other."""

import pytest
import torch

pytest.importorskip("easy_vqa", reason="the trainer tests use easy-vqa's data (pip install easy-vqa)")

import calibrl_kernels as ck  # noqa: E402
from calibrl import model  # noqa: E402
from calibrl.config import parse_config  # noqa: E402
from calibrl.data import load_examples  # noqa: E402
from calibrl.evaluate import evaluate  # noqa: E402
from calibrl.model import PolicyForward, build_tiny_policy  # noqa: E402
from calibrl.rollout import (
    IGNORE_INDEX,
    _generation_config,
    collate_responses,
    collect_rollouts,  # noqa: E402
    old_logprobs,
    sequence_inputs,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def policy():
    cfg = parse_config(["--quick", "--hidden-size", "32", "--num-heads", "2"])
    examples = load_examples("easy-vqa", "train", 64)
    return build_tiny_policy(cfg, [t for e in examples for t in (e.question, e.expert)] + ["user\n", "assistant\n"])


@pytest.fixture(scope="module")
def examples():
    data = load_examples("easy-vqa", "train", 200)
    short = min(data, key=lambda e: len(e.question))
    long = max(data, key=lambda e: len(e.question))
    return [short, long, data[7]]


def test_left_padding_does_not_change_hidden_states(policy, examples):
    """Rows of a padded batch see exactly what they see alone (M-RoPE positions skip the padding)."""
    forward = PolicyForward(policy).eval()
    prompts = policy.encode_prompts(examples)
    assert (prompts.attention_mask.sum(1) < prompts.input_ids.shape[1]).any()  # some rows are padded
    responses = [policy.encode_response(e.expert) for e in examples]
    ids, mask = collate_responses(responses, policy.pad_token_id)
    with torch.no_grad():
        batched, weight, _ = forward(**sequence_inputs(prompts, torch.arange(3), ids, mask, CPU))
        for i, example in enumerate(examples):
            alone_ids, alone_mask = collate_responses([responses[i]], policy.pad_token_id)
            alone, _, _ = forward(
                **sequence_inputs(policy.encode_prompts([example]), torch.arange(1), alone_ids, alone_mask, CPU)
            )
            n = len(responses[i])
            torch.testing.assert_close(batched[i, :n], alone[0, :n], atol=1e-5, rtol=1e-5)
    assert weight is policy.model.get_output_embeddings().weight


def test_old_logprobs_match_the_sampling_distribution(policy, examples):
    """log-probs recomputed from hidden states == log-softmax of the logits generate sampled from."""
    prompts = policy.encode_prompts(examples)
    index = torch.arange(3).repeat_interleave(2)
    vision = prompts.vision_inputs(index, CPU)
    inputs = policy.model_inputs(prompts.input_ids[index], prompts.attention_mask[index], vision)
    inputs.pop("position_ids", None)
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.model.generate(
            **inputs,
            generation_config=_generation_config(policy, 6, 1.0, greedy=False),
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, prompts.input_ids.shape[1] :]  # (R, t)
    logits = torch.stack(out.logits, dim=1)  # (R, t, V)
    logits[..., policy.suppressed_token_ids] = float("-inf")  # what the sampler saw
    sampled_logp = torch.log_softmax(logits.float(), -1).gather(-1, new[..., None]).squeeze(-1)
    mask = torch.ones_like(new, dtype=torch.float32)
    forward = PolicyForward(policy)
    recomputed = old_logprobs(forward, _batch(prompts, index, new, mask), 1.0, 0)
    # the recomputed log-probs normalise over the whole vocabulary (suppressed tokens included)
    torch.testing.assert_close(recomputed, sampled_logp, atol=2e-3, rtol=1e-3)


def _batch(prompts, index, ids, mask):
    from calibrl.rollout import RolloutBatch

    n = len(index)
    zeros = torch.zeros(n)
    return RolloutBatch(
        prompts,
        index,
        index.clone(),
        torch.zeros(n, dtype=torch.bool),
        ids,
        mask,
        zeros,
        zeros,
        zeros,
        torch.zeros(n, dtype=torch.bool),
        [""] * n,
    )


def test_collect_rollouts_layout(policy, examples):
    torch.manual_seed(0)
    batch = collect_rollouts(policy, examples, [10, 11, 12], rollouts_per_prompt=3, max_new_tokens=5, temperature=1.0)
    assert len(batch) == 3 * 4
    assert batch.is_expert.tolist() == [False, False, False, True] * 3
    assert batch.group_ids.tolist() == [10] * 4 + [11] * 4 + [12] * 4
    assert batch.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    experts = batch.select(batch.is_expert.nonzero().squeeze(1))
    assert experts.texts == [e.expert for e in examples]
    assert experts.rewards.tolist() == pytest.approx([1.1] * 3)
    lengths = batch.response_mask.sum(1).long()
    for row in range(len(batch)):  # the mask covers the tokens up to the end token, padding after
        assert batch.response_mask[row, : lengths[row]].all() and not batch.response_mask[row, lengths[row] :].any()
        ended = batch.response_ids[row, lengths[row] - 1] == policy.end_token_id
        assert bool(ended) != bool(batch.truncated[row])
    assert not any(policy.image_token_id in row for row in batch.response_ids.tolist())  # suppressed
    targets = batch.targets()
    assert ((targets == IGNORE_INDEX) == (batch.response_mask == 0)).all()


def test_linear_token_logprobs_on_hidden_equals_explicit_logits(policy, examples):
    forward = PolicyForward(policy)
    prompts = policy.encode_prompts(examples)
    ids, mask = collate_responses([policy.encode_response(e.expert) for e in examples], policy.pad_token_id)
    with torch.no_grad():
        hidden, weight, _ = forward(**sequence_inputs(prompts, torch.arange(3), ids, mask, CPU))
        full = policy.model(
            **policy.model_inputs(
                torch.cat([prompts.input_ids, ids], 1),
                torch.cat([prompts.attention_mask, mask.long()], 1),
                prompts.vision_inputs(torch.arange(3), CPU),
            )
        )
    logits = full.logits[:, -ids.shape[1] - 1 : -1]  # (B, T, V) the HF head on the same positions
    targets = ids.masked_fill(mask == 0, IGNORE_INDEX)
    expected = ck.token_logprobs(logits, targets, ignore_index=IGNORE_INDEX)
    got = ck.linear_token_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "device, compute_dtype, installed, expected",
    [
        ("cuda", torch.bfloat16, True, "flash_attention_2"),
        ("cuda:1", torch.float16, True, "flash_attention_2"),
        ("cuda", None, True, "sdpa"),  # fp32 inputs: flash-attn would refuse them
        ("cpu", torch.bfloat16, True, "sdpa"),
        ("cuda", torch.bfloat16, False, "sdpa"),
    ],
)
def test_attention_implementation(monkeypatch, device, compute_dtype, installed, expected):
    real_find_spec = model.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "flash_attn":
            return object() if installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(model.importlib.util, "find_spec", find_spec)
    assert model.attention_implementation(torch.device(device), compute_dtype) == expected


@pytest.mark.parametrize(
    "setting, device, expected",
    [
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cpu", None),
        ("bf16", "cpu", torch.bfloat16),
        ("bf16", "cuda", torch.bfloat16),
        ("fp32", "cuda", None),
        ("fp32", "cpu", None),
    ],
)
def test_autocast_dtype_of_the_dtype_setting(setting, device, expected):
    assert model.autocast_dtype(torch.device(device), setting) == expected


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, None])
def test_every_forward_pass_runs_under_the_policy_precision(policy, examples, compute_dtype):
    """Sampling, old log-probs, the update's forward and evaluation see the same autocast, so the policy
    that samples is the one whose log-probs are pi_old. Checked on the output dtype of every Linear."""
    seen = {}
    phase = ["none"]
    linears = [m for m in policy.model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [
        m.register_forward_hook(lambda m, i, out: seen.setdefault(phase[0], set()).add(out.dtype)) for m in linears
    ]
    previous, policy.compute_dtype = policy.compute_dtype, compute_dtype
    try:
        torch.manual_seed(0)
        phase[0] = "sampling"
        batch = collect_rollouts(policy, examples[:2], [0, 1], rollouts_per_prompt=2, max_new_tokens=3, temperature=1.0)
        phase[0] = "old log-probs"
        old_logprobs(PolicyForward(policy), batch, 1.0, 0)
        phase[0] = "update"
        PolicyForward(policy)(**batch.forward_inputs(CPU))[0].sum().backward()
        phase[0] = "evaluation"
        evaluate(policy, examples[:2], 3, 2, 1.0, _single_process())
    finally:
        policy.compute_dtype = previous
        policy.model.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.remove()
    expected = compute_dtype or torch.float32
    assert seen == {name: {expected} for name in ("sampling", "old log-probs", "update", "evaluation")}


def test_bf16_setting_keeps_fp32_weights():
    cfg = parse_config(["--quick", "--dtype", "bf16"])
    policy = build_tiny_policy(cfg, ["what color is the shape?", "user\n", "assistant\n"])
    assert policy.compute_dtype == torch.bfloat16 and policy.model.config._attn_implementation == "sdpa"
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}  # the optimizer's master weights


def _single_process():
    from calibrl.distributed import DistInfo

    return DistInfo(0, 1, CPU)
