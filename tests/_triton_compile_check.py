"""Compile every Triton kernel of the library for a GPU target without a GPU (run as a script).

The interpreter accepts programs the GPU compiler rejects (type mismatches across branches or loop
iterations, constexpr misuse, unsupported casts), so CPU-only test runs would not see such errors.
Here each launcher of the library runs on small CPU tensors with ``_launch.launch`` replaced by
a recorder; every recorded launch (the real argument set and the GPU launch configuration of
``triton._launch``) is then compiled by ``triton.compile`` for sm_90 (H100) down to a cubin, with the
16-byte divisibility hints the JIT would give aligned pointers and strides. Prints one line per kernel
(registers / stack frame from cuobjdump when available; more than 8 bytes of stack fails, as spilling) and
"ok" at the end.

Covered: every dtype a launcher takes (bf16, fp16, fp32 with exact fp32 products and fp32 with TF32, as
``torch.backends.cuda.matmul.fp32_precision = "tf32"`` selects), and besides each default launch every
candidate of ``CALIBRL_AUTOTUNE=1`` (``_launch.*_autotune_configs``). Every compiled variant's shared
memory (``metadata.shared``: what the launch asks for, which triton checks only when it loads the kernel
on a GPU) must fit sm_90's per-block limit, ``_launch.SM90_SHARED_MEMORY_BYTES``, and no kernel may
hold an approximate division or square root (div.full / sqrt.approx / rcp.approx: the kernels use the
correctly rounded forms, as torch); the default launches must also compile without register spills.

Must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import subprocess
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from calibrl_kernels import CalibRLConfig  # noqa: E402
from calibrl_kernels.triton import _launch, _loss_terms  # noqa: E402
from calibrl_kernels.triton import group_stats as triton_group_stats  # noqa: E402
from calibrl_kernels.triton import linear as triton_linear  # noqa: E402
from calibrl_kernels.triton import logprobs as triton_logprobs  # noqa: E402
from calibrl_kernels.triton import loss as triton_loss  # noqa: E402

TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = _launch.SM90_SHARED_MEMORY_BYTES
recorded = []  # (kernel, launch arguments, spills matter, role: "default" or "autotune")
check_spills = True  # off for the degenerate sizes, whose speed is irrelevant


def record(kernel, grid, kwargs, fixed, tune_configs, tune_key, allow_autotune=True):
    recorded.append((kernel, {**kwargs, **fixed}, check_spills, "default"))
    if allow_autotune and check_spills:  # candidates once, at the real sizes (the tuner never sees V = 1)
        recorded.extend((kernel, {**kwargs, **config}, False, "autotune") for config in tune_configs)


def signature_of(kernel, args):
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    constexpr_params = {p.name for p in kernel.params if p.is_constexpr}
    for name in names:
        if name in constexpr_params:
            signature[name] = "constexpr"
            constexprs[name] = args[name]
        else:
            signature[name] = argument_type(kernel, name, args[name], (names.index(name),), constexprs, attrs)
    return signature, constexprs, attrs


def argument_type(kernel, name, value, path, constexprs, attrs):
    """The triton type of a runtime argument at ``path`` (its index, then the element's within a tuple argument),
    recording the constants and 16-byte divisibility hints the JIT would give it."""
    if isinstance(value, tuple):
        return tuple(argument_type(kernel, name, item, path + (i,), constexprs, attrs) for i, item in enumerate(value))
    if isinstance(value, torch.Tensor):
        attrs[path] = [["tt.divisibility", 16]]  # a GPU allocation is 16-byte aligned
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int) and value == 1:  # the JIT specialises ints equal to 1 as constants
        constexprs[path if len(path) > 1 else name] = 1  # a tuple's element by its path
        return "constexpr"
    if isinstance(value, int):
        if value % 16 == 0 and value != 0:
            attrs[path] = [["tt.divisibility", 16]]
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"{kernel.__name__}.{name}: cannot type {type(value).__name__}")


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
    """Every launcher, on small CPU tensors, with each kernel variant the library can launch (fp32 twice:
    exact products, then TF32 as torch's fp32_precision selects it); then the degenerate sizes (a single
    token, V = 1, D = 1) that the JIT specialises as constants."""
    global check_spills
    run_launchers_at(2, 3, 4096, 64, 256, full=True)
    with tf32_matmuls():
        assert triton_linear._dot_precision(torch.float32) == "tf32"
        run_linear_launchers(4096, 64, 256, (torch.float32,), CalibRLConfig())
    check_spills = False
    run_launchers_at(1, 1, 1, 1, 1, full=False)


@contextlib.contextmanager
def tf32_matmuls():
    """torch's fp32 matmuls (and so the lm_head kernels' fp32 dots) on TF32 within the block."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(torch.backends, "fp32_precision")
    if new_api:
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    try:
        yield
    finally:
        if new_api:
            matmul.fp32_precision = "none"
        else:
            matmul.allow_tf32 = False


def run_launchers_at(B, T, V, N, D, full):
    targets = torch.randint(0, V, (B * T,))
    for dtype in (torch.bfloat16, torch.float32, torch.float16) if full else (torch.bfloat16,):
        rows = torch.empty(B, T, V, dtype=dtype)
        triton_logprobs.logprob_entropy_forward(rows, targets, 0.7, -100)
        stats = torch.zeros(B * T)
        triton_logprobs.logits_backward(rows, targets, stats, stats, stats, stats, 0.7, -100)
        triton_logprobs.logits_backward(
            rows, targets, stats, stats, stats, stats, 0.7, -100, scale=torch.ones(()), inplace=True
        )
        # the fused loss's backward reads its statistics from columns of the (N, TOKEN_OUTPUTS) row table
        columns = torch.zeros(B * T, _loss_terms.TOKEN_OUTPUTS).unbind(1)[:4]
        triton_logprobs.logits_backward(rows, targets, *columns, 0.7, -100, scale=torch.ones(()), inplace=True)
    rows = torch.empty(B, T, V, dtype=torch.bfloat16)
    configs = [CalibRLConfig(activation=a) for a in ("leaky_relu", "relu", "tanh", "sigmoid", "huber", "none")]
    configs += [CalibRLConfig.for_algo(m) for m in ("grpo", "luffy", "rlplus")]
    configs += [CalibRLConfig(weight_by_advantage=False, entropy_coef=0.1)]
    configs = configs if full else configs[:1]
    table = torch.zeros(B * T, _loss_terms.TOKEN_INPUTS)
    for config in configs:
        triton_loss.calibrl_loss_forward(rows, targets, table, config, -100)
    for dtype in (torch.float32, torch.float64) if full else (torch.float32,):
        for norm in (False, True):
            triton_group_stats.group_advantages(
                torch.rand(N, dtype=dtype), torch.arange(N) // 3, None, norm, 1e-6, 0.1, None
            )
    run_linear_launchers(
        V, N, D, (torch.bfloat16, torch.float16, torch.float32) if full else (torch.bfloat16,), configs[0]
    )


def run_linear_launchers(V, N, D, dtypes, config):
    """lm_head kernels: statistics, both finish variants, logits gradient, both GEMMs (dHidden accumulating
    over several vocabulary chunks), per dtype."""
    _launch.LINEAR_CHUNK_BYTES = N * 1024 * 4  # <= 1024 columns per chunk: V = 4096 takes several
    for dtype in dtypes:
        hidden = torch.empty(N, D, dtype=dtype)
        weight = torch.empty(V, D, dtype=dtype)
        bias = torch.empty(V, dtype=dtype)
        flat = torch.randint(0, V, (N,))
        active = torch.ones(N, dtype=torch.int8)
        partial, splits = triton_linear.linear_statistics(hidden, weight, bias, flat, active, 0.7)
        triton_linear.finish_statistics(partial, splits, flat, -100)
        triton_linear.finish_statistics(
            partial, splits, flat, -100, table=torch.zeros(N, _loss_terms.TOKEN_INPUTS), config=config
        )
        stats = torch.zeros(N)
        triton_linear.linear_gradients(
            hidden, weight, bias, flat, stats, stats, stats, stats, torch.ones(()), 0.7, -100
        )
        triton_linear.linear_gradients(hidden, weight, None, flat, stats, stats, stats, stats, None, 1.0, -100)
        columns = torch.zeros(N, _loss_terms.TOKEN_OUTPUTS).unbind(1)[:4]  # the loss's row-table columns
        triton_linear.linear_gradients(hidden, weight, bias, flat, *columns, torch.ones(()), 0.7, -100)


# The launch keywords an autotune candidate varies (with num_warps / num_stages); a candidate is compiled
# once per kernel, pointer dtypes and these, with the other constexprs of its first launch (a mode or a
# bias switch changes neither the tiles nor their shared memory).
TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_V", "INPUT_PRECISION")
DOT_KERNELS = ("_linear_stats_kernel", "_linear_dlogits_kernel", "_matmul_kernel")


def distinct_variants():
    """{key: [kernel, signature, constexprs, attrs, options, spills matter, roles]}, one per compilation."""
    variants = {}
    for kernel, args, spills_matter, role in recorded:
        signature, constexprs, attrs = signature_of(kernel, args)
        options = {"num_warps": args.get("num_warps", 4), "num_stages": args.get("num_stages", 3)}
        pointers = tuple(sorted((k, v) for k, v in signature.items() if isinstance(v, tuple) or v.startswith("*")))
        full = (
            kernel.__name__,
            tuple(sorted(signature.items())),
            tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
        )
        tuned = (kernel.__name__, pointers, tuple((k, str(constexprs.get(k))) for k in TUNED))
        key = (full if role == "default" else tuned) + (tuple(sorted(options.items())),)
        if role == "autotune" and full + key[-1:] in variants:
            key = full + key[-1:]  # the default launch is this candidate too
        entry = variants.setdefault(key, [kernel, signature, constexprs, attrs, options, False, set()])
        entry[5] = entry[5] or spills_matter
        entry[6].add(role)
    return list(variants.values())


def compile_variant(index):
    """(dynamic shared bytes, resource usage, dot instruction) of variant ``index`` (in a worker process)."""
    kernel, signature, constexprs, attrs, options = VARIANTS[index][:5]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options=options)
    ptx = compiled.asm["ptx"]
    dot = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma-dot"
    approximate = sorted(set(APPROXIMATE_DIVISION.findall(ptx)))
    return compiled.metadata.shared, resource_usage(compiled.asm["cubin"]), dot, approximate


# PTX of a division / square root / reciprocal that is not correctly rounded. The kernels divide and take
# roots with div_rn / sqrt_rn (``triton._softmax``), as torch does; only tl.exp is the fast ex2.approx.
APPROXIMATE_DIVISION = re.compile(r"\b((?:div\.(?:full|approx)|sqrt\.approx|rcp\.approx)\.[a-z0-9.]+)")


VARIANTS = []


def main():
    os.environ["CALIBRL_VALUE_CHECKS"] = "0"  # nothing runs: outputs hold no values to check
    _launch.launch = record
    triton_logprobs.launch = record
    triton_loss.launch = record
    triton_group_stats.launch = record
    triton_linear.launch = record
    run_launchers()
    VARIANTS.extend(distinct_variants())
    # compilations are independent: one worker per core (forked: the workers share VARIANTS)
    with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(compile_variant, range(len(VARIANTS)), chunksize=1)
    largest = {}
    for (kernel, signature, constexprs, _, options, spills_matter, roles), (shared, usage, dot, approximate) in zip(
        VARIANTS, results
    ):
        where = "/".join(sorted(roles))
        dtype = signature[kernel.arg_names[0]]
        while isinstance(dtype, tuple):  # a tuple argument (lm_head, logits): its first element, the pointer
            dtype = dtype[0]
        line = f"{kernel.__name__} [{where}] {dtype} {constexprs} {options}: {usage} dynamic-shared:{shared}"
        print(line + (f" {dot}" if kernel.__name__ in DOT_KERNELS else ""), flush=True)
        assert shared <= SHARED_LIMIT, (
            f"{kernel.__name__} ({where}) {constexprs} {options} asks for {shared} bytes of shared memory, over "
            f"sm_90's {SHARED_LIMIT}: it would fail to load on an H100/H200"
        )
        assert not approximate, f"{line}: approximate {approximate} where the kernels promise torch's rounding"
        if kernel.__name__ in DOT_KERNELS:  # the estimate the heuristics prune candidates with is not low
            element_bytes = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype.lstrip("*")]
            estimate = _launch.dot_shared_memory(
                constexprs["BLOCK_M"],
                constexprs["BLOCK_N"],
                constexprs["BLOCK_K"],
                options["num_stages"],
                element_bytes,
            )
            assert shared <= estimate, f"{line}: more shared memory than _launch.dot_shared_memory ({estimate})"
        largest[kernel.__name__, dtype] = max(largest.get((kernel.__name__, dtype), 0), shared)
        if "no cuobjdump" not in usage and spills_matter:  # a stack frame beyond 8 bytes means real spills
            stack = int(re.search(r"STACK:(\d+)", usage).group(1))
            assert "LOCAL:0" in usage and stack <= 8, f"register spills in {kernel.__name__}: {usage}"
    for (name, dtype), shared in sorted(largest.items()):
        print(f"largest shared memory of {name} {dtype}: {shared} bytes (limit {SHARED_LIMIT})")
    candidates = sum("autotune" in v[6] for v in VARIANTS)
    print(f"compiled {len(VARIANTS)} kernel variants ({candidates} autotune candidates)")
    print("ok")


if __name__ == "__main__":
    main()
