"""Tokens/s and peak memory of one RL update step: the fused linear loss against eager logits.

    python -m bench.bench_train --config cpu          # small Qwen2 model on a CPU
    python -m bench.bench_train --config gpu          # Qwen2-0.5B-like width and vocabulary, bf16

A Qwen2-architecture causal LM built in code (random weights, no download) and a synthetic batch of
B rows (groups whose first row is the expert's) of P prompt + T response tokens. One step = the slim
trainer's group statistics, expert baseline and loss (``calibrl.algorithms``) + forward + backward +
AdamW. Providers: ``calibrl`` (hidden states -> ``algorithms.policy_loss``, the fused lm_head loss),
``calibrl-logits`` (lm_head logits -> ``fused_calibrl_loss``) and ``eager`` (logits -> fp32
log_softmax -> the reference loss). Tokens/s counts B * (P + T) per step; rows go to ``train.csv``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

import calibrl_kernels as ck
from calibrl import algorithms
from calibrl_kernels.config import LossInputs

from .harness import Timing, Writer, device_name, measure, release, resolve_device, x_name
from .runner import DTYPES, LOSS_CONFIG, eager_calibrl_loss

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

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=config.vocab,
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            use_cache=False,
        )
    )
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


def make_step(provider: str, model, optimizer, batch: Dict[str, torch.Tensor], prompt: int):
    """One RL update step with the loss of ``provider``; returns the loss."""

    def step() -> torch.Tensor:
        stats = algorithms.group_statistics(batch["scores"], batch["group_ids"], batch["is_expert"], LOSS_CONFIG)
        expert_logp, expert_mask = algorithms.expert_baseline(
            batch["old_logp"], batch["mask"], batch["group_ids"], batch["is_expert"], LOSS_CONFIG
        )
        states = model.model(input_ids=batch["input_ids"]).last_hidden_state  # (B, P + T, D)
        hidden = states[:, prompt - 1 : -1]  # (B, T, D): the states that predict the response tokens
        rl = dict(expert_logp=expert_logp, passed=stats.passed, is_expert=batch["is_expert"])
        if provider == "eager":
            loss = eager_calibrl_loss(
                model.lm_head(hidden),
                dict(
                    rl,
                    targets=batch["targets"],
                    old_logp=batch["old_logp"],
                    advantages=stats.advantages,
                    mask=batch["mask"],
                ),
            )
        elif provider == "calibrl-logits":
            loss = ck.fused_calibrl_loss(
                model.lm_head(hidden),
                batch["targets"],
                batch["old_logp"],
                stats.advantages,
                batch["mask"],
                config=LOSS_CONFIG,
                **rl,
            ).loss
        else:
            loss = algorithms.policy_loss(
                hidden,
                model.lm_head.weight,
                None,
                batch["targets"],
                LossInputs(
                    batch["old_logp"],
                    stats.advantages,
                    batch["mask"],
                    expert_logp,
                    stats.passed,
                    batch["is_expert"],
                    expert_mask,
                ),
                LOSS_CONFIG,
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def run(
    config_name: str,
    device: torch.device,
    out: Path,
    timestamp: Optional[str] = None,
    providers: Sequence[str] = PROVIDERS,
) -> Path:
    """Every provider at every response length of ``config_name``, interleaved; rows to ``out/train.csv``."""
    config = CONFIGS[config_name]
    writer = Writer(out, "train", device, timestamp)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or previous_threads)
    try:
        for response in config.responses:
            tokens = config.rows * (config.prompt + response)
            name = x_name(
                "T",
                dict(
                    B=config.rows, P=config.prompt, D=config.hidden, L=config.layers, V=config.vocab, dtype=config.dtype
                ),
            )
            print(f"{KERNEL}  {name}  T={response} ({tokens} tokens per step)", flush=True)
            steps = {}
            for provider in providers:  # each its own model (same initial weights), AdamW and batch
                model = build_model(config, device, config.prompt + response)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                steps[provider] = make_step(
                    provider, model, optimizer, synthetic_batch(config, response, device), config.prompt
                )
            outcomes = measure(steps, device, config.timing)
            for provider in providers:
                writer.outcome(KERNEL, provider, "full", name, response, outcomes[provider], "tokens/s", tokens)
            del steps, model, optimizer
            release(device)
    finally:
        torch.set_num_threads(previous_threads)
    return writer.csv_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / device_name(device)
    run(args.config, device, out, providers=args.providers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
