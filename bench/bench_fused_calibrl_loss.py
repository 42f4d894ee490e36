"""fused_calibrl_loss: log-probs + entropy + CalibRL loss from (B, T, V) logits in one pass:
``python -m bench.bench_fused_calibrl_loss --suite cpu``."""

import torch

import calibrl_kernels as ck

from .harness import Timing
from .runner import LOSS_CONFIG, Op, Sweep, Unavailable, eager_calibrl_loss, main, rl_batch, rl_loss


def build(dims, dtype, device):
    batch = rl_batch(dims["N"], dims["V"], device)
    logits = torch.randn(*batch["targets"].shape, dims["V"], device=device, dtype=dtype).mul_(2.0)
    batch["logits"] = logits.requires_grad_(True)  # (B, T, V)
    return batch


def calibrl(x):
    return rl_loss(ck.fused_calibrl_loss, x, x["logits"], x["targets"])


def liger(x, device):
    """Liger's Triton GRPO loss on logits (DAPO, the PPO term only)."""
    if device.type != "cuda":
        raise Unavailable("Liger's GRPO loss on logits is a Triton kernel for CUDA tensors")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    logits = x["logits"].detach()  # Liger drops the last position of (B, T + 1, V) logits: its own copy
    extended = torch.cat([logits, logits[:, -1:]], dim=1).requires_grad_(True)
    args = (extended, x["old_logp"], None, x["targets"], x["advantages"], x["mask"])
    clip = dict(eps_low=LOSS_CONFIG.clip_low, eps_high=LOSS_CONFIG.clip_high)
    options = dict(temperature=1.0, beta=0.0, inplace=False, loss_type="dapo", reduce=True, **clip)
    return (lambda: triton_grpo_loss(*args, **options)[0]), [extended]


def logits_op(name, build, calibrl, eager, liger, compiled_targets=True):
    """The roofline, memory floor and sizes shared by the ops on (N, V) logits."""
    return Op(
        name=name,
        build=build,
        calibrl=calibrl,
        eager=eager,
        floor="copy",
        liger=liger,
        work=lambda d, size, mode: d["N"] * d["V"] * size * (1 if mode == "forward" else 3),  # logits (+ grad) bytes
        grad_bytes=lambda d, size: d["N"] * d["V"] * size,
        eager_bytes=lambda d, mode: d["N"] * d["V"] * 4.0 * (3 if mode == "forward" else 5),
        sweeps={
            "tiny": [Sweep("N", (8, 16), {"V": 96})],
            "cpu": [
                Sweep("N", (2048,), {"V": 32000}, timing=Timing(1, 5, 15, 2.0)),
                Sweep("N", (512, 1024), {"V": 32000}, compiled=False),
            ],
            "gpu-targets": [Sweep("N", (16384,), {"V": 151936}, dtype="bfloat16", compiled=compiled_targets)],
            "gpu-sweeps": [Sweep("N", (2048, 4096, 8192), {"V": 151936}, dtype="bfloat16", compiled=False)],
        },
    )


OP = logits_op("fused_calibrl_loss", build, calibrl, lambda x: eager_calibrl_loss(x["logits"], x), liger)

if __name__ == "__main__":
    raise SystemExit(main(only="fused_calibrl_loss"))
