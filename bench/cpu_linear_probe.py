"""Quick side-by-side probe of the fused lm_head + CalibRL loss on CPU (forward + backward).

Not the benchmark harness (that is bench/'s CSV tooling): a small tool for the CPU path's targets.
All timings are taken in one process, providers interleaved round by round, the median per provider:

  floor       6 N D V / (fp32 rate of a 2048^3 torch.mm measured in the same run)
  gemm_only   our chunk loop with the row math switched off: the three GEMMs as our layout runs them
              (non-GEMM share: 1 - gemm_only / cpp, and, less sensitive to load, the time outside the
              GEMM calls timed inside cpp's own runs)
  cpp         fused_linear_calibrl_loss, C++ row math (calibrl config)
  torch       fused_linear_calibrl_loss, torch row math
  eager       logits = h @ W^T, log_softmax, gather, the same loss (reference.calibrl_loss), backward
  compiled    torch.compile of eager's forward (the warm-up step compiles it), then backward
  liger       Liger-Kernel LigerFusedLinearGRPOLoss(compiled=False, loss_type="dapo", beta=0)

Memory (--memory): every provider runs once in a fresh subprocess (glibc told to return freed memory
at once); extra peak = VmHWM during the step - RSS before it (inputs allocated, one warm-up step done
where cheap) - the bytes of the input gradients.

  PYTHONPATH=. python bench/cpu_linear_probe.py                      # N 2048, D 512, V 32000, 2 threads
  PYTHONPATH=. python bench/cpu_linear_probe.py --memory
  PYTHONPATH=. python bench/cpu_linear_probe.py --n 8192 --d 896 --v 151936 --providers cpp --memory
  PYTHONPATH=. python bench/cpu_linear_probe.py --n 8192 --d 896 --v 151936 --providers cpp --rounds 1 \
      --warmup 0 --share-rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from calibrl_kernels import CalibRLConfig, chunked, reference
from calibrl_kernels.config import LossInputs
from calibrl_kernels.cpu import _rows as cpp_rows

PROVIDERS = ("gemm_only", "cpp", "torch", "eager", "compiled", "liger")


class _NoRowMath:
    """Row math that does nothing: the loop then times the GEMMs alone (results are garbage)."""

    name = "none"
    buffers_per_chunk = 1

    def loss(self, *args):
        pass


def make_inputs(n: int, d: int, v: int, seed: int = 0, rows: int = 2):
    """`rows` sequences of n / rows tokens (Liger chunks by sequence: 2 x 1024 keeps its chunks large)."""
    g = torch.Generator().manual_seed(seed)
    B = rows if n % rows == 0 else 1
    T = n // B
    hidden = (torch.randn(B, T, d, generator=g) * 0.5).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_(True)
    targets = torch.randint(0, v, (B, T), generator=g)
    old_logp = -torch.rand(B, T, generator=g) * 5 - 8
    advantages = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    expert_logp = -torch.rand(B, T, generator=g) * 5 - 8
    passed = advantages > 0
    return dict(hidden=hidden, weight=weight, targets=targets, old_logp=old_logp, advantages=advantages, mask=mask,
                expert_logp=expert_logp, passed=passed)


def step_fn(provider: str, x: dict, chunk_bytes=None):
    """A closure running one forward + backward of the provider."""
    config = CalibRLConfig()
    h, w, t = x["hidden"], x["weight"], x["targets"]
    inputs = LossInputs(x["old_logp"], x["advantages"], x["mask"], expert_logp=x["expert_logp"], passed=x["passed"])
    if provider in ("cpp", "torch", "gemm_only"):
        math = {"cpp": lambda: cpp_rows.row_math(), "torch": lambda: chunked.TORCH_ROW_MATH,
                "gemm_only": lambda: _NoRowMath()}[provider]()
        assert math is not None, "the C++ extension did not build"

        def run():
            out = chunked.fused_linear_calibrl_loss(h, w, t, inputs, config, row_math=math, chunk_bytes=chunk_bytes)
            out.loss.backward()
        return run
    if provider in ("eager", "compiled"):
        def eager_loss(h, w):
            logits = h @ w.t()
            logp = torch.log_softmax(logits.float(), -1).gather(-1, t[..., None]).squeeze(-1)
            return reference.calibrl_loss(logp, x["old_logp"], x["advantages"], x["mask"], expert_logp=x["expert_logp"],
                                          passed=x["passed"], config=config).loss

        loss_fn = eager_loss if provider == "eager" else torch.compile(eager_loss, dynamic=False)

        def run():
            loss_fn(h, w).backward()
        return run
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=False, loss_type="dapo")

        def run():
            loss = module(h, w, t, x["mask"], x["advantages"], old_per_token_logps=x["old_logp"])
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
        return run
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def square_gemm_rate(size: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.mm(a, b, out=c)
    best = min(_time(lambda: torch.mm(a, b, out=c)) for _ in range(reps))
    return 2 * size**3 / best


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _clear_grads(x):
    x["hidden"].grad = None
    x["weight"].grad = None


def timings(args) -> None:
    x = make_inputs(args.n, args.d, args.v)
    runs = {p: step_fn(p, x, args.chunk_bytes) for p in args.providers}
    for fn in runs.values() if args.warmup else ():  # warm-up (and the C++ build)
        _clear_grads(x)
        fn()
    times = {p: [] for p in runs}
    rates = []
    for _ in range(args.rounds):
        rates.append(square_gemm_rate())
        for p, fn in runs.items():
            _clear_grads(x)
            times[p].append(_time(fn))
    work = 6 * args.n * args.d * args.v
    print(f"N={args.n} D={args.d} V={args.v} threads={torch.get_num_threads()} rounds={args.rounds} "
          f"chunk_bytes={chunked.chunk_budget(args.chunk_bytes)}")
    # Two estimates: medians (typical under load) and minima (least disturbed by other processes).
    for label, pick in (("median", statistics.median), ("min", min)):
        rate = max(rates) if label == "min" else statistics.median(rates)
        floor = work / rate
        t = {p: pick(v) for p, v in times.items()}
        print(f"[{label}] square GEMM {rate / 1e9:.1f} GFLOP/s -> floor {floor:.3f} s")
        for p in runs:
            print(f"  {p:10s} {t[p]:.3f} s = {t[p] / floor:.2f} x floor")
        if "cpp" in t:
            for other in ("eager", "compiled", "liger", "torch"):
                if other in t:
                    print(f"  cpp vs {other}: {t[other] / t['cpp']:.2f}x faster")
            if "gemm_only" in t:
                print(f"  non-GEMM share of cpp (cpp vs gemm_only runs): {1 - t['gemm_only'] / t['cpp']:.1%}")
    if "cpp" in runs:
        shares = gemm_share(x, args.chunk_bytes, args.share_rounds)
        print(f"non-GEMM share of cpp timed inside its own runs: median {statistics.median(shares):.1%} "
              f"(runs: {', '.join(f'{s:.1%}' for s in shares)})")


def gemm_share(x: dict, chunk_bytes, rounds: int = 3) -> list:
    """Per run of the cpp provider: the fraction of its step spent outside the three GEMM calls, timed
    inside the same run (robust to load changing between runs, unlike gemm_only vs cpp)."""
    spent = {"gemm": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent["gemm"] += time.perf_counter() - start
        return wrapper

    originals = (chunked._Operands.logits_into, chunked._Gradients.add_chunk)
    chunked._Operands.logits_into = timed(originals[0])
    chunked._Gradients.add_chunk = timed(originals[1])
    try:
        run = step_fn("cpp", x, chunk_bytes)
        shares = []
        for _ in range(rounds):
            _clear_grads(x)
            spent["gemm"] = 0.0
            total = _time(run)
            shares.append(1 - spent["gemm"] / total)
        return shares
    finally:
        chunked._Operands.logits_into, chunked._Gradients.add_chunk = originals


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(args) -> None:
    x = make_inputs(args.n, args.d, args.v)
    fn = step_fn(args.providers[0], x, args.chunk_bytes)
    if args.n * args.v <= 2048 * 32000:  # warm-up (allocator, MKL buffers) where it is cheap
        _clear_grads(x)
        fn()
    _clear_grads(x)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (x["hidden"], x["weight"]) if t.grad is not None)
    print(json.dumps(dict(provider=args.providers[0], extra_mib=(peak - before) / 1024 - grads / 2**20,
                          grads_mib=grads / 2**20, seconds=seconds)))


def memory(args) -> None:
    for p in args.providers:
        cmd = [sys.executable, __file__, "--memory-child", "--n", str(args.n), "--d", str(args.d), "--v", str(args.v),
               "--threads", str(args.threads), "--providers", p]
        if args.chunk_bytes:
            cmd += ["--chunk-bytes", str(args.chunk_bytes)]
        # glibc returns freed memory to the OS at once, so that RSS before the step holds no reusable garbage.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"  {p}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {p:10s} extra peak {r['extra_mib']:8.1f} MiB above inputs + their gradients "
              f"({r['grads_mib']:.0f} MiB), step {r['seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1, help="0 skips the warm-up step (large shapes)")
    parser.add_argument("--share-rounds", type=int, default=3, help="instrumented cpp runs for the non-GEMM share")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--memory", action="store_true", help="peak memory per provider (subprocesses)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
    elif args.memory:
        memory(args)
    else:
        timings(args)


if __name__ == "__main__":
    main()
