"""token_logprobs: log p(target) and the entropy of (N, V) logits, summed to a scalar:
``python -m bench.bench_token_logprobs --suite cpu``."""

import torch

import calibrl_kernels as ck

from .bench_fused_calibrl_loss import logits_op
from .runner import Unavailable, eager_logprobs_entropy, main


def build(dims, dtype, device):
    logits = torch.randn(dims["N"], dims["V"], device=device, dtype=dtype).mul_(2.0)
    return {"logits": logits.requires_grad_(True), "targets": torch.randint(0, dims["V"], (dims["N"],), device=device)}


def calibrl(x):
    logp, entropy = ck.token_logprobs(x["logits"], x["targets"], return_entropy=True)
    return logp.sum() + entropy.sum()


def eager(x):
    logp, entropy = eager_logprobs_entropy(x["logits"], x["targets"])
    return logp.sum() + entropy.sum()


def liger(x, device):
    """Liger's cross-entropy: -log p, without the entropy."""
    if device.type != "cuda":
        raise Unavailable("Liger's cross-entropy is a Triton kernel for CUDA tensors")
    from liger_kernel.transformers import LigerCrossEntropyLoss

    logits = x["logits"].detach().clone().requires_grad_(True)  # Liger writes its gradient into its input
    loss_fn = LigerCrossEntropyLoss(reduction="none")
    return (lambda: -loss_fn(logits, x["targets"]).sum()), [logits]


OP = logits_op("token_logprobs", build, calibrl, eager, liger, compiled_targets=False)

if __name__ == "__main__":
    raise SystemExit(main(only="token_logprobs"))
