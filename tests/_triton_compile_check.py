"""Compile every Triton kernel of the library for a GPU target without a GPU (run as a script).

The interpreter accepts programs the GPU compiler rejects (type mismatches across branches or loop
iterations, constexpr misuse, unsupported casts), so CPU-only test runs would not see such errors.
Here each launcher of the library runs on small CPU tensors with ``_triton_common.launch`` replaced by
a recorder; every recorded launch (the real argument set and the GPU launch configuration of
``_heuristics``) is then compiled by ``triton.compile`` for sm_90 (H100) down to a cubin, with the
16-byte divisibility hints the JIT would give aligned pointers and strides. Prints one line per kernel
(registers / stack frame from cuobjdump when available; more than 8 bytes of stack fails, as spilling) and
"ok" at the end.

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from calibrl_kernels import CalibRLConfig, _heuristics, _triton_common  # noqa: E402
from calibrl_kernels import calibrl_loss_triton, group_stats, linear_triton, logprob_entropy  # noqa: E402

TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}
TARGET = GPUTarget("cuda", 90, 32)
recorded = []
check_spills = True  # off for the degenerate sizes, whose speed is irrelevant


# CALIBRL_COMPILE_CHECK_AUTOTUNE=1 also compiles every autotune candidate (minutes; by hand).
ALL_CANDIDATES = os.environ.get("CALIBRL_COMPILE_CHECK_AUTOTUNE", "0") == "1"


def record(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune=True):
    recorded.append((kernel, {**kwargs, **fixed}, check_spills and not ALL_CANDIDATES))
    if ALL_CANDIDATES:
        recorded.extend((kernel, {**kwargs, **config}, False) for config in tune_configs)


def signature_of(kernel, args):
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    constexpr_params = {p.name for p in kernel.params if p.is_constexpr}
    for name in names:
        value = args[name]
        if name in constexpr_params:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]  # a GPU allocation is 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:  # the JIT specialises ints equal to 1 as constants
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: cannot type {type(value).__name__}")
    return signature, constexprs, attrs


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return "REG:{} STACK:{} SHARED:{} LOCAL:{}".format(*match.groups()) if match else out.strip()[-200:]


def run_launchers():
    """Every launcher, on small CPU tensors, with each kernel variant the library can launch; then the
    degenerate sizes (a single token, V = 1, D = 1) that the JIT specialises as constants."""
    global check_spills
    run_launchers_at(2, 3, 4096, 64, 256, full=True)
    check_spills = False
    run_launchers_at(1, 1, 1, 1, 1, full=False)


def run_launchers_at(B, T, V, N, D, full):
    targets = torch.randint(0, V, (B * T,))
    for dtype in (torch.bfloat16, torch.float32, torch.float16) if full else (torch.bfloat16,):
        rows = torch.empty(B, T, V, dtype=dtype)
        logprob_entropy.logprob_entropy_forward(rows, targets, 0.7, -100)
        stats = torch.zeros(B * T)
        logprob_entropy.logits_backward(rows, targets, stats, stats, stats, stats, 0.7, -100)
        logprob_entropy.logits_backward(rows, targets, stats, stats, stats, stats, 0.7, -100, scale=torch.ones(()), inplace=True)
        # the fused loss's backward reads its statistics from columns of the (N, TOKEN_OUTPUTS) row table
        columns = torch.zeros(B * T, _triton_common.TOKEN_OUTPUTS).unbind(1)[:4]
        logprob_entropy.logits_backward(rows, targets, *columns, 0.7, -100, scale=torch.ones(()), inplace=True)
    rows = torch.empty(B, T, V, dtype=torch.bfloat16)
    configs = [CalibRLConfig(activation=a) for a in ("leaky_relu", "relu", "tanh", "sigmoid", "huber", "none")]
    configs += [CalibRLConfig.for_algo(m) for m in ("grpo", "luffy", "rlplus")]
    configs += [CalibRLConfig(weight_by_advantage=False, entropy_coef=0.1)]
    configs = configs if full else configs[:1]
    table = torch.zeros(B * T, _triton_common.TOKEN_INPUTS)
    for config in configs:
        calibrl_loss_triton.calibrl_loss_forward(rows, targets, table, config, -100)
    for dtype in (torch.float32, torch.float64) if full else (torch.float32,):
        for norm in (False, True):
            group_stats.group_advantages(torch.rand(N, dtype=dtype), torch.arange(N) // 3, None, norm)
    # lm_head kernels: statistics, both finish variants, logits gradient, both GEMMs (dHidden accumulating
    # over several vocabulary chunks), per dtype
    _heuristics.LINEAR_CHUNK_BYTES = N * 1024 * 4  # <= 1024 columns per chunk: V = 4096 takes several
    for dtype in (torch.bfloat16, torch.float32) if full else (torch.bfloat16,):
        hidden = torch.empty(N, D, dtype=dtype)
        weight = torch.empty(V, D, dtype=dtype)
        bias = torch.empty(V, dtype=dtype)
        flat = torch.randint(0, V, (N,))
        active = torch.ones(N, dtype=torch.int8)
        partial, splits = linear_triton.linear_statistics(hidden, weight, bias, flat, active, 0.7)
        linear_triton.finish_statistics(partial, splits, flat, -100)
        linear_triton.finish_statistics(partial, splits, flat, -100, table=torch.zeros(N, _triton_common.TOKEN_INPUTS), config=configs[0])
        stats = torch.zeros(N)
        linear_triton.linear_gradients(hidden, weight, bias, flat, stats, stats, stats, stats, torch.ones(()), 0.7, -100)
        linear_triton.linear_gradients(hidden, weight, None, flat, stats, stats, stats, stats, None, 1.0, -100)
        columns = torch.zeros(N, _triton_common.TOKEN_OUTPUTS).unbind(1)[:4]  # the loss's row-table columns
        linear_triton.linear_gradients(hidden, weight, bias, flat, *columns, torch.ones(()), 0.7, -100)


def main():
    os.environ["CALIBRL_VALUE_CHECKS"] = "0"  # nothing runs: outputs hold no values to check
    _triton_common.launch = record
    logprob_entropy.launch = record
    calibrl_loss_triton.launch = record
    group_stats.launch = record
    linear_triton.launch = record
    run_launchers()
    seen = set()
    for kernel, args, spills_matter in recorded:
        signature, constexprs, attrs = signature_of(kernel, args)
        key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        options = {"num_warps": args.get("num_warps", 4), "num_stages": args.get("num_stages", 3)}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=TARGET, options=options)
        usage = resource_usage(compiled.asm["cubin"])
        if "tl.dot" in str(kernel.src) or kernel.__name__.startswith(("_linear_stats", "_linear_dlogits", "_matmul")):
            usage += " wgmma" if "wgmma" in compiled.asm["ptx"] else " mma.sync" if "mma.sync" in compiled.asm["ptx"] else " fma-dot"
        print(f"{kernel.__name__} {signature[kernel.arg_names[0]]} {constexprs} {options}: {usage}", flush=True)
        if "no cuobjdump" not in usage and spills_matter:  # a stack frame beyond 8 bytes means real spills
            stack = int(re.search(r"STACK:(\d+)", usage).group(1))
            assert "LOCAL:0" in usage and stack <= 8, f"register spills in {kernel.__name__}: {usage}"
    print(f"compiled {len(seen)} kernel variants")
    print("ok")


if __name__ == "__main__":
    main()
