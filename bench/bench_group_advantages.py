"""group_advantages: per-group reward statistics (forward only; no gradient):
``python -m bench.bench_group_advantages --suite cpu``."""

import torch

import calibrl_kernels as ck
from calibrl_kernels import reference

from .runner import Op, Sweep, main


def build(dims, dtype, device):
    row = torch.arange(dims["B"], device=device)  # (B,)
    ids = (row // dims["G"]) * 7919 + 3  # arbitrary int64 ids
    return {"scores": torch.rand(dims["B"], device=device), "group_ids": ids, "is_expert": row % dims["G"] == 0}


OP = Op(
    name="group_advantages",
    build=build,
    differentiable=False,  # forward mode only
    floor="copy",
    calibrl=lambda x: ck.group_advantages(x["scores"], x["group_ids"], is_expert=x["is_expert"]).advantages,
    eager=lambda x: reference.group_advantages(x["scores"], x["group_ids"], x["is_expert"]).advantages,
    work=lambda d, size, mode: 22.0 * d["B"],  # bytes per row: scores, ids, flags read; advantages, weights written
    sweeps={
        "tiny": [Sweep("B", (8, 64), {"G": 4})],
        "cpu": [Sweep("B", (16384,), {"G": 8}), Sweep("B", (1024, 262144), {"G": 8}, compiled=False)],
        "gpu-sweeps": [Sweep("B", (4096, 65536, 1048576), {"G": 8}, compiled=False)],
    },
)

if __name__ == "__main__":
    raise SystemExit(main(only="group_advantages"))
