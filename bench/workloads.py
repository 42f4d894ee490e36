"""The benchmarked kernels: inputs, the same computation per provider, and each one's floors.

One ``Workload`` per public op. For every provider it builds a zero-argument forward callable
returning a scalar loss (or the op's result where there is no backward); the runner times that call
("forward") or that call plus ``torch.autograd.grad`` of the scalar w.r.t. the differentiable inputs
("full"). Inputs are built once per size, outside every measurement.

The ``eager`` provider is written here plainly (upcast, log_softmax, gather, entropy, then the loss
terms of ``calibrl_kernels.reference.calibrl_loss``, which is itself eager torch); ``compiled`` is
``torch.compile`` of exactly that function. ``liger`` computes Liger-Kernel's nearest loss: its GRPO
(DAPO) loss has the PPO term only, without dual clip, guide term or entropy, so it does slightly less
work than calibrl or eager; its cross-entropy gives -logp without entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import calibrl_kernels as ck
from calibrl_kernels import reference

from .harness import x_name

LOSS_CONFIG = ck.CalibRLConfig()  # CalibRL defaults: PPO dual clip + leaky-ReLU guide against the expert


class Unavailable(Exception):
    """A provider that does not apply to this workload / device (recorded as skipped, with the reason)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Point:
    """One size of one kernel: the swept axis and every dimension."""

    kernel: str
    axis: str  # the swept dimension (the CSV's x)
    dims: Tuple[Tuple[str, int], ...]  # e.g. (("N", 2048), ("D", 512), ("V", 32000))
    dtype: str = "float32"

    @property
    def d(self) -> Dict[str, int]:
        return dict(self.dims)

    @property
    def x(self) -> int:
        return self.d[self.axis]

    @property
    def x_name(self) -> str:
        fixed = {key: value for key, value in self.dims if key != self.axis}
        fixed["dtype"] = self.dtype
        return x_name(self.axis, **fixed)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "axis": self.axis, "dims": [list(item) for item in self.dims], "dtype": self.dtype}

    @staticmethod
    def from_dict(data: dict) -> "Point":
        return Point(data["kernel"], data["axis"], tuple((key, int(value)) for key, value in data["dims"]), data["dtype"])


def split_tokens(num_tokens: int, max_tokens_per_row: int, rows_wanted: int = 8) -> Tuple[int, int]:
    """N tokens as B rows of T tokens: about ``rows_wanted`` rows (two groups of four), T at most the cap."""
    tokens_per_row = min(max_tokens_per_row, max(1, num_tokens // rows_wanted))
    if num_tokens < 2 or num_tokens % tokens_per_row != 0 or num_tokens // tokens_per_row < 2:
        raise ValueError(
            f"N: expected a multiple of T = {tokens_per_row} with at least 2 rows (max T = {max_tokens_per_row}), got {num_tokens}"
        )
    return num_tokens // tokens_per_row, tokens_per_row


def group_size_for(rows: int, preferred: int = 4) -> int:
    size = min(preferred, rows)
    while rows % size != 0:
        size -= 1
    if size < 2:
        raise ValueError(f"B: expected rows that split into groups of >= 2 (one expert, one on-policy), got {rows}")
    return size


def rl_batch(rows: int, tokens_per_row: int, vocab: int, device: torch.device, group_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """A synthetic RL batch: groups of rows, the first row of each group the expert's demonstration."""
    size = group_size or group_size_for(rows)
    row = torch.arange(rows, device=device)
    group_ids = row // size  # (B,)
    is_expert = row % size == 0  # (B,)
    lengths = torch.randint(max(1, tokens_per_row // 2), tokens_per_row + 1, (rows,), device=device)
    mask = (torch.arange(tokens_per_row, device=device)[None, :] < lengths[:, None]).float()  # (B, T)
    scores = torch.rand(rows, device=device)  # (B,) rewards in [0, 1): every on-policy row gets an advantage
    old_logp = -math.log(vocab) + 0.1 * torch.randn(rows, tokens_per_row, device=device)  # (B, T)
    stats = ck.group_advantages(scores, group_ids, is_expert=is_expert)
    return {
        "targets": torch.randint(0, vocab, (rows, tokens_per_row), device=device),  # (B, T)
        "old_logp": old_logp,
        "advantages": stats.advantages,  # (B,)
        "mask": mask,
        "expert_logp": ck.expert_baseline(old_logp, mask, group_ids, is_expert),  # (B, T)
        "passed": stats.passed,  # (B,)
        "is_expert": is_expert,
    }


RL_FIELDS = ("old_logp", "advantages", "mask", "expert_logp", "passed", "is_expert")


# --------------------------------------------------------------------------------------------
# Eager twins (also what torch.compile compiles)
# --------------------------------------------------------------------------------------------
def eager_logprobs_entropy(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log_softmax + gather + entropy in fp32, as an eager trainer writes it."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def eager_calibrl_loss(logits: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    logp, entropy = eager_logprobs_entropy(logits, inputs["targets"])
    out = reference.calibrl_loss(
        logp, inputs["old_logp"], inputs["advantages"], inputs["mask"], expert_logp=inputs["expert_logp"],
        passed=inputs["passed"], is_expert=inputs["is_expert"], entropy=entropy, config=LOSS_CONFIG,
    )
    return out.loss


def eager_token_logprobs(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    logp, entropy = eager_logprobs_entropy(inputs["logits"], inputs["targets"])
    return logp.sum() + entropy.sum()


def eager_fused_calibrl_loss(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    return eager_calibrl_loss(inputs["logits"], inputs)


def eager_fused_linear_calibrl_loss(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    logits = inputs["hidden"] @ inputs["weight"].t()  # (B, T, V) in the input dtype, like an eager lm_head
    return eager_calibrl_loss(logits, inputs)


def eager_group_advantages(inputs: Dict[str, torch.Tensor]):
    return reference.group_advantages(inputs["scores"], inputs["group_ids"], inputs["is_expert"])


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------
@dataclass
class Rates:
    """The machine floors measured in the same run."""

    gemm_flops: Dict[str, float] = field(default_factory=dict)  # dtype name -> FLOP/s of a square torch.mm
    copy_bytes_per_s: float = math.nan  # bytes moved (read + write) per second by a device copy


class Workload:
    name: str = ""
    op: str = ""  # the calibrl_kernels._dispatch op name
    differentiable: bool = True
    floor_kind = "copy"  # the machine rate its roofline divides by: "gemm" (FLOP/s) or "copy" (bytes/s)
    max_tokens_per_row = 512

    # ---- inputs
    def build(self, point: Point, device: torch.device) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def grad_inputs(self, inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return [tensor for tensor in inputs.values() if tensor.requires_grad]

    # ---- providers: zero-argument forward callables
    def calibrl(self, inputs: Dict[str, torch.Tensor]) -> Callable[[], object]:
        raise NotImplementedError

    eager_function: Callable = None  # type: ignore[assignment]

    def eager(self, inputs: Dict[str, torch.Tensor]) -> Callable[[], object]:
        fn = type(self).eager_function
        return lambda: fn(inputs)

    def compiled(self, inputs: Dict[str, torch.Tensor]) -> Callable[[], object]:
        compiled_fn = torch.compile(type(self).eager_function, dynamic=False)
        return lambda: compiled_fn(inputs)

    def liger(self, inputs: Dict[str, torch.Tensor], device: torch.device) -> Tuple[Callable[[], object], List[torch.Tensor]]:
        """Liger's forward callable and the tensors its full mode differentiates (it may use copies)."""
        raise Unavailable("Liger-Kernel has no counterpart of this op")

    # ---- floors and estimates (bytes, seconds)
    def roofline_seconds(self, point: Point, mode: str, rates: Rates) -> float:
        raise NotImplementedError

    def gradient_bytes(self, point: Point) -> float:
        """Bytes of the gradients the full mode must return (the memory floor of a full call)."""
        return 0.0

    def materialized_bytes(self, point: Point, mode: str) -> float:
        """Rough peak of a provider that materialises fp32 (N, V) logits (eager, compiled, the torch reference)."""
        return 0.0

    def liger_bytes(self, point: Point, mode: str) -> float:
        return 0.0


def _element_size(point: Point) -> int:
    return torch.empty((), dtype=point.torch_dtype).element_size()


def _logits_materialized(tokens: int, vocab: int, mode: str) -> float:
    # fp32 upcast, log_softmax, its exp for the entropy (forward); their gradients (full)
    return tokens * vocab * 4.0 * (3 if mode == "forward" else 5)


class LogitsWorkload(Workload):
    """Ops on (N, V) logits: bandwidth-bound, floor = bytes that must move over the copy bandwidth."""

    def roofline_seconds(self, point, mode, rates):
        # forward: one read of the logits; full: that, plus one read and one write for the gradient
        bytes_moved = point.d["N"] * point.d["V"] * _element_size(point) * (1 if mode == "forward" else 3)
        return bytes_moved / rates.copy_bytes_per_s

    def gradient_bytes(self, point):
        return float(point.d["N"] * point.d["V"] * _element_size(point))

    def materialized_bytes(self, point, mode):
        return _logits_materialized(point.d["N"], point.d["V"], mode)


class TokenLogprobs(LogitsWorkload):
    name = op = "token_logprobs"
    eager_function = staticmethod(eager_token_logprobs)

    def build(self, point, device):
        n, v = point.d["N"], point.d["V"]
        logits = torch.randn(n, v, device=device, dtype=point.torch_dtype).mul_(2.0).requires_grad_(True)
        return {"logits": logits, "targets": torch.randint(0, v, (n,), device=device)}

    def calibrl(self, inputs):
        def forward():
            logp, entropy = ck.token_logprobs(inputs["logits"], inputs["targets"], return_entropy=True)
            return logp.sum() + entropy.sum()
        return forward

    def liger(self, inputs, device):
        if device.type != "cuda":
            raise Unavailable("Liger's cross-entropy is a Triton kernel for CUDA tensors")
        from liger_kernel.transformers import LigerCrossEntropyLoss

        # Liger writes the gradient into its input during the forward: give it its own copy.
        logits = inputs["logits"].detach().clone().requires_grad_(True)
        loss_fn = LigerCrossEntropyLoss(reduction="none")
        return (lambda: -loss_fn(logits, inputs["targets"]).sum()), [logits]  # -logp summed; no entropy


class FusedCalibrlLoss(LogitsWorkload):
    name = op = "fused_calibrl_loss"
    eager_function = staticmethod(eager_fused_calibrl_loss)

    def build(self, point, device):
        rows, tokens = split_tokens(point.d["N"], self.max_tokens_per_row)
        batch = rl_batch(rows, tokens, point.d["V"], device)
        logits = torch.randn(rows, tokens, point.d["V"], device=device, dtype=point.torch_dtype).mul_(2.0)
        batch["logits"] = logits.requires_grad_(True)  # (B, T, V)
        return batch

    def calibrl(self, inputs):
        rl = {key: inputs[key] for key in RL_FIELDS if key not in ("old_logp", "advantages", "mask")}
        return lambda: ck.fused_calibrl_loss(
            inputs["logits"], inputs["targets"], inputs["old_logp"], inputs["advantages"], inputs["mask"],
            config=LOSS_CONFIG, **rl,
        ).loss

    def liger(self, inputs, device):
        if device.type != "cuda":
            raise Unavailable("Liger's GRPO loss on logits is a Triton kernel for CUDA tensors")
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        # Liger's kernel takes (B, T + 1, V) logits (it drops the last position): its own copy.
        logits = inputs["logits"].detach()
        extended = torch.cat([logits, logits[:, -1:]], dim=1).requires_grad_(True)

        def forward():
            loss, _metrics = triton_grpo_loss(
                extended, inputs["old_logp"], None, inputs["targets"], inputs["advantages"], inputs["mask"],
                temperature=1.0, beta=0.0, eps_low=LOSS_CONFIG.clip_low, eps_high=LOSS_CONFIG.clip_high,
                inplace=False, loss_type="dapo", reduce=True,
            )
            return loss
        return forward, [extended]


class FusedLinearCalibrlLoss(Workload):
    name = op = "fused_linear_calibrl_loss"
    floor_kind = "gemm"
    eager_function = staticmethod(eager_fused_linear_calibrl_loss)
    liger_compiled: Optional[bool] = None  # None: Liger's torch.compile of its loss math on CUDA only

    def build(self, point, device):
        rows, tokens = split_tokens(point.d["N"], self.max_tokens_per_row)
        d, v = point.d["D"], point.d["V"]
        batch = rl_batch(rows, tokens, v, device)
        batch["hidden"] = torch.randn(rows, tokens, d, device=device, dtype=point.torch_dtype).requires_grad_(True)  # (B, T, D)
        weight = torch.randn(v, d, device=device, dtype=point.torch_dtype).div_(math.sqrt(d))
        batch["weight"] = weight.requires_grad_(True)  # (V, D)
        return batch

    def calibrl(self, inputs):
        rl = {key: inputs[key] for key in RL_FIELDS if key not in ("old_logp", "advantages", "mask")}
        return lambda: ck.fused_linear_calibrl_loss(
            inputs["hidden"], inputs["weight"], inputs["targets"], inputs["old_logp"], inputs["advantages"],
            inputs["mask"], config=LOSS_CONFIG, **rl,
        ).loss

    def liger(self, inputs, device):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        compiled = device.type == "cuda" if self.liger_compiled is None else self.liger_compiled
        loss_fn = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=compiled, use_ref_model=False, loss_type="dapo",
            epsilon_low=LOSS_CONFIG.clip_low, epsilon_high=LOSS_CONFIG.clip_high, temperature=1.0,
        )

        def forward():
            loss, _metrics = loss_fn(
                inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"], inputs["advantages"],
                old_per_token_logps=inputs["old_logp"],
            )
            return loss
        return forward, self.grad_inputs(inputs)

    def roofline_seconds(self, point, mode, rates):
        n, d, v = point.d["N"], point.d["D"], point.d["V"]
        flops = (2 if mode == "forward" else 6) * n * d * v
        return flops / rates.gemm_flops[point.dtype]

    def gradient_bytes(self, point):
        n, d, v = point.d["N"], point.d["D"], point.d["V"]
        return float((n * d + v * d) * _element_size(point))

    def weight_gradient_bytes(self, point):
        return float(point.d["V"] * point.d["D"] * _element_size(point))

    def materialized_bytes(self, point, mode):
        n, v = point.d["N"], point.d["V"]
        return _logits_materialized(n, v, mode) + n * v * _element_size(point)

    def liger_bytes(self, point, mode):
        _rows, tokens = split_tokens(point.d["N"], self.max_tokens_per_row)
        # one row of logits per chunk, a few fp32 temporaries of it, and dWeight in fp32
        return tokens * point.d["V"] * 4.0 * 4 + point.d["V"] * point.d["D"] * 4.0


class GroupAdvantages(Workload):
    name = op = "group_advantages"
    differentiable = False
    eager_function = staticmethod(eager_group_advantages)

    def build(self, point, device):
        rows, size = point.d["B"], point.d["G"]
        row = torch.arange(rows, device=device)
        return {
            "scores": torch.rand(rows, device=device),  # (B,)
            "group_ids": (row // size) * 7919 + 3,  # (B,) arbitrary int64 ids
            "is_expert": row % size == 0,  # (B,)
        }

    def calibrl(self, inputs):
        return lambda: ck.group_advantages(inputs["scores"], inputs["group_ids"], is_expert=inputs["is_expert"])

    def roofline_seconds(self, point, mode, rates):
        # read scores (4 B), ids (8 B), flags (1 B); write advantages, weights (4 B each), passed (1 B)
        return point.d["B"] * 22.0 / rates.copy_bytes_per_s


WORKLOADS: Dict[str, Workload] = {
    workload.name: workload
    for workload in (TokenLogprobs(), FusedCalibrlLoss(), FusedLinearCalibrlLoss(), GroupAdvantages())
}
