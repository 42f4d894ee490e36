"""Tokens/s and peak memory of one RL update step of a Qwen2-architecture model (random weights, built in code):
``python -m bench.bench_train --config tiny|cpu|gpu`` (gpu: Qwen2-0.5B-like width and vocabulary, bf16)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from calibrl import algorithms
from calibrl_kernels.config import LossInputs

from . import harness
from .bench_fused_calibrl_loss import OP as LOGITS_LOSS
from .harness import Timing
from .runner import DTYPES, LOSS_CONFIG

KERNEL = "train_step"
PROVIDERS = ("calibrl", "calibrl-logits", "eager")


@dataclass(frozen=True)
class TrainConfig:
    vocab: int  # V
    hidden: int  # D
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # MLP width
    rows: int  # B rows per step
    prompt: int  # P prompt tokens per row
    responses: tuple  # T response tokens per row, one measurement each
    group_size: int  # rows per prompt group (the first one the expert's)
    dtype: str
    timing: Timing
    threads: Optional[int] = None


CONFIGS: Dict[str, TrainConfig] = {
    "tiny": TrainConfig(128, 32, 1, 2, 1, 64, 4, 4, (8,), 2, "float32", Timing(1, 2, 2, 0.0), threads=1),
    "cpu": TrainConfig(32000, 256, 2, 4, 2, 1024, 8, 32, (128, 256), 4, "float32", Timing(1, 3, 10, 2.0)),
    "gpu": TrainConfig(151936, 896, 4, 14, 2, 4864, 8, 128, (512, 1024), 4, "bfloat16", Timing(2, 3, 3, 0.0)),
}


def build_model(config: TrainConfig, device: torch.device, max_positions: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate)
    heads = dict(num_attention_heads=config.heads, num_key_value_heads=config.kv_heads)
    fixed = dict(max_position_embeddings=max_positions, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**sizes, **heads, **fixed, num_hidden_layers=config.layers))
    return model.to(device=device, dtype=DTYPES[config.dtype]).train()


def synthetic_batch(config: TrainConfig, response: int, device: torch.device) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    rows, row = config.rows, torch.arange(config.rows)
    lengths = torch.randint(response // 2, response + 1, (rows,), generator=generator)
    batch = {
        "input_ids": torch.randint(0, config.vocab, (rows, config.prompt + response), generator=generator),  # (B, P+T)
        "mask": (torch.arange(response)[None, :] < lengths[:, None]).float(),  # (B, T)
        "old_logp": -math.log(config.vocab) + 0.1 * torch.randn(rows, response, generator=generator),  # (B, T)
        "scores": torch.rand(rows, generator=generator),  # (B,)
        "group_ids": row // config.group_size,  # (B,)
        "is_expert": row % config.group_size == 0,  # (B,)
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["targets"] = batch["input_ids"][:, config.prompt :]  # (B, T) the response tokens
    return batch


def make_step(provider: str, config: TrainConfig, response: int, device: torch.device):
    """One RL update step (returning the loss) of ``provider`` with its own model (same weights), AdamW and batch."""
    model = build_model(config, device, config.prompt + response)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = synthetic_batch(config, response, device)

    def step() -> torch.Tensor:
        ids, experts, old_logp, mask = (batch[key] for key in ("group_ids", "is_expert", "old_logp", "mask"))
        stats = algorithms.group_statistics(batch["scores"], ids, experts, LOSS_CONFIG)
        expert_logp, expert_mask = algorithms.expert_baseline(old_logp, mask, ids, experts, LOSS_CONFIG)
        states = model.model(input_ids=batch["input_ids"]).last_hidden_state  # (B, P + T, D)
        hidden = states[:, config.prompt - 1 : -1]  # (B, T, D): the states that predict the response tokens
        fields = dict(old_logp=old_logp, advantages=stats.advantages, mask=mask, passed=stats.passed)
        inputs = LossInputs(**fields, expert_logp=expert_logp, is_expert=experts, expert_mask=expert_mask)
        targets = batch["targets"]  # (B, T)
        if provider == "calibrl":
            loss = algorithms.policy_loss(hidden, model.lm_head.weight, None, targets, inputs, LOSS_CONFIG).loss
        else:  # lm_head logits (B, T, V), then the fused loss on logits or the eager one
            loss_of = LOGITS_LOSS.calibrl if provider == "calibrl-logits" else LOGITS_LOSS.eager
            loss = loss_of(dict(inputs._asdict(), logits=model.lm_head(hidden), targets=targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(config_name: str, device: torch.device, out: Path, timestamp=None, providers: Sequence[str] = PROVIDERS):
    """Every provider at every response length of ``config_name``, interleaved; rows to ``out/train.csv``."""
    config = CONFIGS[config_name]
    writer = harness.Writer(out, "train", device, timestamp)
    sizes = dict(B=config.rows, P=config.prompt, D=config.hidden, L=config.layers, V=config.vocab, dtype=config.dtype)
    name = harness.x_name("T", sizes)
    with harness.intra_op_threads(config.threads):
        for response in config.responses:
            tokens = config.rows * (config.prompt + response)
            print(f"{KERNEL}  {name}  T={response} ({tokens} tokens per step)", flush=True)
            steps = {provider: make_step(provider, config, response, device) for provider in providers}
            outcomes = harness.measure(steps, device, config.timing)
            for provider in providers:
                writer.outcome(KERNEL, provider, "full", name, response, outcomes[provider], "tokens/s", tokens)
            del steps
            harness.release(device)
    return writer.csv_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    args = parser.parse_args(argv)
    device = harness.resolve_device(args.device)
    run(args.config, device, harness.results_folder(args.out, device), providers=args.providers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
