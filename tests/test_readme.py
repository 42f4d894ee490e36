"""The documented plain-PyTorch snippets run as written, on a tiny Qwen2 model, and agree with each other.

The snippets are read from docs/getting-started.md (the ```python blocks of the "Plain PyTorch" paragraph),
and README.md's example must be the first of them, so an edit that breaks either fails here. The inputs are
a real batch: 2 prompts x (3 sampled rows + 1 expert row), old log-probs from the model itself, padded
responses.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "transformers", reason="the README snippets use a transformers model (pip install 'calibrl[train]')"
)

from _tiny_models import tiny_causal_lm  # noqa: E402

import calibrl_kernels as ck  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
SNIPPETS_END = "<!-- end of the plain-PyTorch snippets -->"
README_EXAMPLE = "<!-- readme-example:"


def plain_pytorch_snippets():
    """The ```python blocks between '**Plain PyTorch**' and the end marker in docs/getting-started.md."""
    text = GETTING_STARTED.read_text()
    start, end = text.index("**Plain PyTorch**"), text.index(SNIPPETS_END)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) == 2, f"expected the two plain-PyTorch snippets, found {len(blocks)}"
    return blocks


def readme_example():
    """The ```python block right after the readme-example marker in README.md."""
    text = README.read_text()
    match = re.compile(r"```python\n(.*?)```", flags=re.S).search(text, text.index(README_EXAMPLE))
    assert match, "README.md: no ```python block after the readme-example marker"
    return match.group(1)


def test_readme_example_is_the_first_documented_snippet():
    first, _ = plain_pytorch_snippets()
    assert readme_example() == first


def snippet_inputs(seed: int = 0):
    """The names the snippets use: a model and one RL batch of B = 8 rows (2 groups of 3 sampled + 1 expert)."""
    torch.manual_seed(seed)
    vocab, prompt_len, T = 40, 5, 6
    model = tiny_causal_lm(vocab, seed=seed).float()
    B = 8
    input_ids = torch.randint(2, vocab, (B, prompt_len + T))  # (B, P + T)
    attention_mask = torch.ones(B, prompt_len + T, dtype=torch.long)  # (B, P + T)
    response_ids = input_ids[:, prompt_len:].clone()  # (B, T)
    lengths = torch.tensor([6, 4, 5, 6, 6, 3, 6, 2])  # response lengths
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # (B, T)
    response_ids[mask == 0] = 0
    attention_mask[:, prompt_len:] = mask.long()
    prompt_ids = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])  # (B,)
    is_expert = torch.tensor([False, False, False, True] * 2)  # (B,)
    rewards = torch.tensor([1.1, 0.0, 0.1, 1.1, 0.0, 1.1, 0.0, 1.1])  # (B,)
    with torch.no_grad():
        hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state[:, -T - 1 : -1]
        old_logp = ck.linear_token_logprobs(hidden, model.lm_head.weight, response_ids)  # (B, T)
        old_logp = old_logp + 0.05 * torch.randn_like(old_logp)  # a slightly different sampling policy
    logged = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return dict(
        model=model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        T=T,
        response_ids=response_ids,
        old_logp=old_logp,
        mask=mask,
        prompt_ids=prompt_ids,
        is_expert=is_expert,
        rewards=rewards,
        log=logged.append,
        logged=logged,
        optimizer=optimizer,
    )


def test_first_snippet_trains_the_model_through_the_fused_loss():
    first, _ = plain_pytorch_snippets()
    names = snippet_inputs()
    exec(first, names)
    out, model = names["out"], names["model"]
    assert math.isfinite(out.loss.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # the gradient reaches the body
    (metrics,) = names["logged"]
    assert {"pg_loss", "guide_loss", "entropy", "clipfrac"} <= set(metrics)
    assert metrics["guide_loss"] != 0


def test_second_snippet_equals_the_first_and_the_reference():
    first, second = plain_pytorch_snippets()
    names = snippet_inputs()
    exec(first, names)
    explicit = names["out"].loss.detach()
    explicit_grad = names["model"].lm_head.weight.grad.clone()

    # the second snippet replaces the first's statistics, baseline and loss call (same cfg and hidden)
    setup = "\n".join(line for line in first.splitlines() if line.startswith(("import ", "cfg =", "hidden =")))
    fresh = snippet_inputs()
    exec(setup + "\n" + second, fresh)
    fresh["out"].loss.backward()
    torch.testing.assert_close(fresh["out"].loss.detach(), explicit)
    torch.testing.assert_close(fresh["model"].lm_head.weight.grad, explicit_grad)

    # the same loss from the reference on materialised logits
    logits = names["hidden"].detach() @ names["model"].lm_head.weight.detach().T  # (B, T, V)
    stats = ck.reference.group_advantages(names["rewards"], names["prompt_ids"], names["is_expert"])
    baseline = ck.reference.expert_baseline(names["old_logp"], names["mask"], names["prompt_ids"], names["is_expert"])
    logp, entropy = ck.reference.token_logprobs(logits, names["response_ids"], return_entropy=True)
    ref = ck.reference.calibrl_loss(
        logp,
        names["old_logp"],
        stats.advantages,
        names["mask"],
        expert_logp=baseline,
        passed=stats.passed,
        is_expert=names["is_expert"],
        entropy=entropy,
        config=names["cfg"],
    )
    torch.testing.assert_close(explicit, ref.loss, rtol=1e-5, atol=1e-6)
