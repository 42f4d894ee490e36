"""Tokens/s and peak memory of one RL update step: the fused linear loss vs eager logits.

    python -m bench.bench_train --config cpu          # small Qwen2 model on a CPU
    python -m bench.bench_train --config gpu          # Qwen2-0.5B-like width and vocabulary, bf16

Self-contained: a Qwen2-architecture causal LM built from a config in code (random weights, no
download), a synthetic RL batch of B rows = groups of ``group_size`` rows whose first row is the
expert's, each P prompt + T response tokens. One step = group statistics + expert baseline + forward
+ CalibRL loss + backward + AdamW step, with group statistics, baseline and loss taken from the slim
trainer's ``calibrl.algorithms`` (the functions ``python -m calibrl.train`` calls per mini-batch):

- ``calibrl`` (and ``calibrl-<impl>`` for every other available backend): last hidden states of the
  response positions -> ``algorithms.policy_loss`` = ``calibrl_kernels.fused_linear_calibrl_loss`` with
  the lm_head weight (no (B*T, V) logits);
- ``calibrl-logits``: hidden -> lm_head logits -> ``calibrl_kernels.fused_calibrl_loss``;
- ``eager``: hidden -> lm_head logits -> fp32 log_softmax + gather + entropy -> the reference loss.

Throughput counts every token through the model, B * (P + T), per step; timed steps of the providers
are interleaved round by round. Peak memory is measured after a warm-up step (so AdamW's state
exists) above what is allocated before the step: activations, logits and gradients. Rows go to ``train.csv`` (kernel ``train_step``, mode ``full``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import calibrl_kernels as ck
from calibrl import algorithms

from . import harness
from .harness import MIB, ResultWriter, TimingConfig, percentiles
from .providers import CALIBRL, EAGER, Provider, calibrl_providers, forced_impl
from .workloads import DTYPES, LOSS_CONFIG, eager_calibrl_loss

KERNEL = "train_step"
LOGITS_PROVIDER = "calibrl-logits"


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
    group_size: int  # rows per prompt group (one of them the expert's)
    dtype: str
    timing: TimingConfig
    threads: Optional[int] = None  # torch intra-op threads (None: every core)


CONFIGS: Dict[str, TrainConfig] = {
    "tiny": TrainConfig(vocab=128, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, rows=4, prompt=4,
                        responses=(8,), group_size=2, dtype="float32",
                        timing=TimingConfig(warmup=1, min_reps=2, max_reps=2, min_time_s=0.0), threads=1),
    "cpu": TrainConfig(vocab=32000, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1024, rows=8, prompt=32,
                       responses=(128, 256), group_size=4, dtype="float32",
                       timing=TimingConfig(warmup=1, min_reps=3, max_reps=10, min_time_s=2.0)),
    "gpu": TrainConfig(vocab=151936, hidden=896, layers=4, heads=14, kv_heads=2, intermediate=4864, rows=8,
                       prompt=128, responses=(512, 1024), group_size=4, dtype="bfloat16",
                       timing=TimingConfig(warmup=2, min_reps=5, max_reps=20, min_time_s=1.0)),
}


def build_model(config: TrainConfig, device: torch.device, max_positions: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model_config = Qwen2Config(
        vocab_size=config.vocab, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config)
    return model.to(device=device, dtype=DTYPES[config.dtype]).train()


def synthetic_batch(config: TrainConfig, response: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """B rows of P prompt + T response tokens; groups of rows with the expert's row first."""
    generator = torch.Generator().manual_seed(1)
    rows, length = config.rows, config.prompt + response
    if rows % config.group_size != 0 or config.group_size < 2:
        raise ValueError(f"rows: expected a multiple of group_size >= 2, got rows={rows}, group_size={config.group_size}")
    row = torch.arange(rows)
    lengths = torch.randint(response // 2, response + 1, (rows,), generator=generator)
    batch = {
        "input_ids": torch.randint(0, config.vocab, (rows, length), generator=generator),  # (B, P + T)
        "mask": (torch.arange(response)[None, :] < lengths[:, None]).float(),  # (B, T)
        "old_logp": -math.log(config.vocab) + 0.1 * torch.randn(rows, response, generator=generator),  # (B, T)
        "scores": torch.rand(rows, generator=generator),  # (B,) rewards in [0, 1)
        "group_ids": row // config.group_size,  # (B,)
        "is_expert": row % config.group_size == 0,  # (B,)
    }
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["targets"] = batch["input_ids"][:, config.prompt:]  # (B, T) the response tokens
    return batch


def make_step(provider: Provider, model, optimizer, batch: Dict[str, torch.Tensor], prompt: int) -> Callable[[], torch.Tensor]:
    """One RL update step with the loss of ``provider``.

    Group statistics, expert baseline and (for the fused providers) the loss are the slim trainer's own
    functions (``calibrl.algorithms``), i.e. exactly what ``python -m calibrl.train`` runs per mini-batch.
    """

    def step() -> torch.Tensor:
        stats = algorithms.group_statistics(batch["scores"], batch["group_ids"], batch["is_expert"], LOSS_CONFIG)
        expert_logp, expert_mask = algorithms.expert_baseline(
            batch["old_logp"], batch["mask"], batch["group_ids"], batch["is_expert"], LOSS_CONFIG
        )
        states = model.model(input_ids=batch["input_ids"]).last_hidden_state  # (B, P + T, D)
        hidden = states[:, prompt - 1:-1]  # (B, T, D): the states that predict the response tokens
        if provider.name == EAGER:
            rl = {"old_logp": batch["old_logp"], "advantages": stats.advantages, "mask": batch["mask"],
                  "expert_logp": expert_logp, "passed": stats.passed, "is_expert": batch["is_expert"],
                  "targets": batch["targets"]}
            loss = eager_calibrl_loss(model.lm_head(hidden), rl)
        elif provider.name == LOGITS_PROVIDER:
            loss = ck.fused_calibrl_loss(
                model.lm_head(hidden), batch["targets"], batch["old_logp"], stats.advantages, batch["mask"],
                expert_logp=expert_logp, passed=stats.passed, is_expert=batch["is_expert"], config=LOSS_CONFIG,
            ).loss
        else:
            loss = algorithms.policy_loss(
                hidden, model.lm_head.weight, None, batch["targets"], batch["old_logp"], stats.advantages,
                batch["mask"], stats.passed, batch["is_expert"], expert_logp, expert_mask, LOSS_CONFIG,
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_providers(device: torch.device, writer: ResultWriter) -> List[Provider]:
    # the torch backend is the reference: the eager provider already measures that computation
    providers, skipped = calibrl_providers("fused_linear_calibrl_loss", device, exclude=("torch",))
    for name, reason in skipped:
        writer.event(kind="skipped", kernel=KERNEL, provider=name, reason=reason)
    for provider in providers:
        writer.event(kind="info", kernel=KERNEL, provider=provider.name, impl=provider.resolved)
    return providers + [Provider(LOGITS_PROVIDER), Provider(EAGER)]


def _impl_context(provider: Provider):
    if provider.is_calibrl and provider.name != LOGITS_PROVIDER:
        return forced_impl(provider.impl)
    return contextlib.nullcontext()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_steps(config: TrainConfig, providers: Sequence[Provider], response: int,
                  device: torch.device) -> Dict[str, Tuple[List[float], List[float], str]]:
    """provider -> (seconds per step, peak bytes, failure reason or "").

    Each provider gets its own model (same initial weights), AdamW and batch; after warm-up (AdamW's
    state must exist before the peak is taken) and the memory measurement, timed steps are interleaved
    round by round, so a load change on a shared machine hits every provider alike."""
    results: Dict[str, Tuple[List[float], List[float], str]] = {}
    steps: Dict[str, Tuple[Provider, Callable[[], torch.Tensor]]] = {}
    for provider in providers:
        try:
            model = build_model(config, device, config.prompt + response)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            batch = synthetic_batch(config, response, device)
            with _impl_context(provider):
                step = make_step(provider, model, optimizer, batch, config.prompt)
                for _ in range(max(1, config.timing.warmup)):
                    step()
                harness.synchronize(device)
                memory = [harness.peak_memory_bytes(step, device) for _ in range(config.timing.memory_reps)]
            steps[provider.name] = (provider, step)
            results[provider.name] = ([], memory, "")
        except Exception as error:  # out of memory, a backend error: record and go on
            results[provider.name] = ([], [], _reason(error))
        finally:
            model = optimizer = batch = step = None  # the step closure keeps what it needs
            _release(device)
    timing = config.timing
    started, rounds = time.perf_counter(), 0
    while steps and rounds < timing.max_reps and (
        rounds < timing.min_reps or time.perf_counter() - started < timing.min_time_s * len(steps)
    ):
        for name, (provider, step) in list(steps.items()):
            try:
                with _impl_context(provider):
                    harness.synchronize(device)
                    t0 = time.perf_counter()
                    step()
                    harness.synchronize(device)
                    results[name][0].append(time.perf_counter() - t0)
            except Exception as error:
                results[name] = ([], [], _reason(error))
                del steps[name]
                _release(device)
        rounds += 1
    steps.clear()
    _release(device)
    return results


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"


def run(config_name: str, device: torch.device, csv_path: Path, timestamp: Optional[str] = None,
        version: Optional[str] = None, providers: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> Path:
    """Measure every provider at every response length of configuration ``config_name``; rows to ``csv_path``."""
    config = CONFIGS[config_name]
    with harness.quiet_garbage_collector(), harness.intra_op_threads(threads or config.threads):
        return _run(config, device, csv_path, timestamp, version, providers)


def _run(config: TrainConfig, device: torch.device, csv_path: Path, timestamp: Optional[str], version: Optional[str],
         providers: Optional[Sequence[str]]) -> Path:
    harness.prepare_host_memory()
    writer = ResultWriter(csv_path, device, timestamp=timestamp, version=version)
    candidates = train_providers(device, writer)
    if providers:
        candidates = [p for p in candidates if p.name in providers or (CALIBRL in providers and p.is_calibrl)]
    for response in config.responses:
        tokens = config.rows * (config.prompt + response)
        name = harness.x_name("T", B=config.rows, P=config.prompt, D=config.hidden, L=config.layers, V=config.vocab,
                              dtype=config.dtype)
        print(f"{KERNEL}  {name}  T={response} ({tokens} tokens per step)", flush=True)
        measured = measure_steps(config, candidates, response, device)
        for provider in candidates:
            times, memory, reason = measured[provider.name]
            if reason:
                writer.event(kind="failed", kernel=KERNEL, provider=provider.name, mode="full", x_name=name, x=response,
                             reason=reason)
            throughput = percentiles([tokens / t for t in times])
            peak = percentiles([b / MIB for b in memory])
            writer.row(KERNEL, provider.name, "full", "speed", "tokens/s", name, response, throughput)
            writer.row(KERNEL, provider.name, "full", "memory", "MiB", name, response, peak)
            if not reason:
                print(f"  {provider.name:16s} p50 {throughput[1]:10.0f} tokens/s   peak +{peak[1]:9.1f} MiB", flush=True)
            else:
                print(f"  {provider.name:16s} failed: {reason}", flush=True)
    return csv_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>/)")
    parser.add_argument("--providers", nargs="+", default=None)
    args = parser.parse_args(argv)
    device = harness.resolve_device(args.device)
    out_dir = harness.results_dir(device, args.out)
    run(args.config, device, out_dir / "train.csv", providers=args.providers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
