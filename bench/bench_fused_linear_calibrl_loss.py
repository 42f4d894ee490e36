"""fused_linear_calibrl_loss: lm_head GEMM + log-probs + entropy + CalibRL loss without (N, V) logits:
``python -m bench.bench_fused_linear_calibrl_loss --suite cpu``."""

import math

import torch

import calibrl_kernels as ck

from .harness import Timing
from .runner import LOSS_CONFIG, Op, Sweep, eager_calibrl_loss, main, rl_batch, rl_loss


def build(dims, dtype, device):
    batch = rl_batch(dims["N"], dims["V"], device)
    rows, tokens = batch["targets"].shape
    batch["hidden"] = torch.randn(rows, tokens, dims["D"], device=device, dtype=dtype).requires_grad_(True)  # (B, T, D)
    weight = torch.randn(dims["V"], dims["D"], device=device, dtype=dtype).div_(math.sqrt(dims["D"]))
    batch["weight"] = weight.requires_grad_(True)  # (V, D)
    return batch


def calibrl(x):
    return rl_loss(ck.fused_linear_calibrl_loss, x, x["hidden"], x["weight"], x["targets"])


def eager(x):
    return eager_calibrl_loss(x["hidden"] @ x["weight"].t(), x)  # (B, T, V) logits in the input dtype


def liger(x, device):
    """LigerFusedLinearGRPOLoss (DAPO, beta 0): the PPO term only, without dual clip, guide or entropy."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    clip = dict(epsilon_low=LOSS_CONFIG.clip_low, epsilon_high=LOSS_CONFIG.clip_high)
    options = dict(beta=0.0, use_ref_model=False, loss_type="dapo", temperature=1.0, **clip)
    loss_fn = LigerFusedLinearGRPOLoss(compiled=device.type == "cuda", **options)
    args = (x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"])
    return (lambda: loss_fn(*args, old_per_token_logps=x["old_logp"])[0]), [x["hidden"], x["weight"]]


_QWEN_HEAD = {"D": 896, "V": 151936}
_FIVE = Timing(warmup=1, min_rounds=5, max_rounds=15, min_time_s=2.0)
_TWO = Timing(warmup=1, min_rounds=2, max_rounds=2, min_time_s=0.0)
_GPU = {"dtype": "bfloat16", "compiled": False}
OP = Op(
    name="fused_linear_calibrl_loss",
    build=build,
    calibrl=calibrl,
    eager=eager,
    floor="gemm",
    liger=liger,
    work=lambda d, size, mode: (2 if mode == "forward" else 6) * d["N"] * d["D"] * d["V"],
    grad_bytes=lambda d, size: (d["N"] + d["V"]) * d["D"] * size,
    eager_bytes=lambda d, mode: d["N"] * d["V"] * 4.0 * (4 if mode == "forward" else 6),
    sweeps={
        "tiny": [Sweep("N", (8, 16), {"D": 16, "V": 96})],
        "cpu": [
            Sweep("N", (2048,), {"D": 512, "V": 32000}, timing=_FIVE),
            Sweep("N", (1024,), _QWEN_HEAD, modes=("full",), timing=_TWO),
            Sweep("N", (8192,), _QWEN_HEAD, modes=("full",), compiled=False, timing=_TWO),
            Sweep("N", (512, 1024), {"D": 512, "V": 32000}, compiled=False),
        ],
        # our op compiled inside a step (compiled-calibrl) against it eager and against the eager loss compiled
        "cpu-compile": [
            Sweep("N", (2048,), {"D": 512, "V": 32000}, timing=_FIVE),
            Sweep("N", (1024,), _QWEN_HEAD, modes=("full",), timing=_FIVE),
        ],
        "cpu-vocab": [
            Sweep("V", (8000, 32000, 64000), {"N": 1024, "D": 896}, modes=("full",), timing=_FIVE),
            Sweep("V", (151936, 256000), {"N": 1024, "D": 896}, modes=("full",)),
        ],
        "gpu-targets": [Sweep("N", (16384,), {"D": 4096, "V": 151936}, dtype="bfloat16")],
        "gpu-sweeps": [
            Sweep("N", (2048, 4096, 8192), {"D": 4096, "V": 151936}, **_GPU),
            Sweep("D", (1024, 2048), {"N": 16384, "V": 151936}, **_GPU),
            Sweep("V", (32000, 65536), {"N": 16384, "D": 4096}, **_GPU),
        ],
    },
)

if __name__ == "__main__":
    raise SystemExit(main(only="fused_linear_calibrl_loss"))
