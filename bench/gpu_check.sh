#!/usr/bin/env bash
# One command for a GPU machine (H100 / H200), made for a time-limited GPU job (a batch allocation, a CI runner):
# the run ends within GPU_CHECK_BUDGET seconds (default 360), the most valuable steps first, and after every step
# (passed, failed or stopped at its limit) its results are published to the output folder $OUT (when set), so a
# job cut short keeps every finished step. Published: at most 7 files of GPU_CHECK_MAX_FILE_MB (15) MiB each.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   bash bench/gpu_check.sh --dry-run    # anywhere: the plan, then the python steps in a tiny CPU configuration
#   bash bench/gpu_check.sh --plan       # the plan and its limits only
#
# Steps, in order (limit in seconds, each cut to the time left; override with ENV_TIMEOUT, KERNEL_TIMEOUT,
# TEST_TIMEOUT, TRAIN_TIMEOUT, TRAINER_TIMEOUT, REPORT_TIMEOUT; limits add up to 350 s, 10 s stay for the last publish):
#   environment  20   versions, GPU, the backends that run
#   kernels     140   python -m bench --suite gpu-targets: Qwen shapes (N 16384, D 4096, V 151936, bf16), every provider
#   tests       110   the Triton test files natively on CUDA (no interpreter), pytest-xdist when installed
#   train        35   python -m bench.bench_train --config gpu (one RL update step, our loss vs eager)
#   trainer      30   python -m calibrl.train --quick --device cuda (needs easy-vqa; in a scratch folder)
#   report       15   python -m bench.table: tables.md and the plots
#   sweeps      rest  python -m bench --suite gpu-sweeps: the N / D / V sweeps, only with 30 s or more left
#
# Results in bench/results/<gpu-name>/ (CSV, PNG, tables.md, pytest.xml, a log per step, trainer_quick/ metrics
# without checkpoints); published after every step: gpu_check.log, steps.log (every step's output), kernels.csv,
# train.csv, pytest.xml, tables.md, results.tar.gz (the results folder; never a checkpoint; logs keep their end).
#
# Packages the GPU machine may lack (liger-kernel, easy-vqa) can come as wheels in .whl/ (ignored by git), installed
# with `pip install --no-index --no-deps --target /tmp/site` onto PYTHONPATH, never over torch / triton:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl liger-kernel==0.8.5 easy-vqa==1.0
#
# Environment: PYTHON (python3), RESULTS (results folder), TEST_WORKERS (8). Exit status: 0 when every step passed
# (or was skipped for a missing package), 1 when any failed, timed out or had no time left, 2 for a usage error.

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO="$(pwd)"

DRY_RUN=0
PLAN_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --plan) PLAN_ONLY=1 ;;
        -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (expected --dry-run, --plan or --help)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-360}"
RESERVE=10       # seconds kept for the last publish
KILL_AFTER=5     # a step ignoring SIGTERM at its limit is killed this much later (counted in its limit)
MIN_SWEEPS=30    # the sweeps run only with this much time left
STEP_NAMES=(environment kernels tests train trainer report sweeps)
declare -A LIMIT=(
    [environment]="${ENV_TIMEOUT:-20}" [kernels]="${KERNEL_TIMEOUT:-140}" [tests]="${TEST_TIMEOUT:-110}"
    [train]="${TRAIN_TIMEOUT:-35}" [trainer]="${TRAINER_TIMEOUT:-30}" [report]="${REPORT_TIMEOUT:-15}" [sweeps]=rest
)
# The Triton test files: every kernel against its reference, natively compiled on CUDA.
GPU_TESTS=(tests/kernels/test_logprobs.py tests/kernels/test_loss.py tests/kernels/test_linear.py
           tests/kernels/test_group_stats.py tests/kernels/test_triton_launch.py
           tests/kernels/test_compile.py::test_triton_operators_compile_natively_on_cuda)
# What is published to $OUT after every step (with results.tar.gz: 7 files).
PUBLISHED=(gpu_check.log steps.log kernels.csv train.csv pytest.xml tables.md)
MAX_FILE_BYTES=$((${GPU_CHECK_MAX_FILE_MB:-15} * 1024 * 1024))

print_plan() {
    local total=0 name
    echo "gpu_check plan (budget ${BUDGET}s, ${RESERVE}s kept for the last publish; each limit is cut to the time left):"
    for name in "${STEP_NAMES[@]}"; do
        echo "  ${name}: limit ${LIMIT[$name]}$([ "${LIMIT[$name]}" = rest ] || echo s)"
        [ "${LIMIT[$name]}" = rest ] || total=$((total + LIMIT[$name]))
    done
    echo "  step limits add up to ${total}s; results published to \$OUT after every step: ${PUBLISHED[*]} results.tar.gz"
}

if [ "$PLAN_ONLY" = 1 ]; then
    print_plan
    exit 0
fi

# Packages brought along as wheels: installed into /tmp/site, never over the machine's torch / triton.
SITE=""
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE="${GPU_CHECK_SITE:-/tmp/site}"
    echo "gpu_check: installing wheels from .whl/ into $SITE"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$REPO"/.whl/*.whl; then
        echo "gpu_check: wheel installation failed; going on without them" >&2
        SITE=""
    fi
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    KERNEL_SUITE=tiny
    TRAIN_CONFIG=tiny
    RESULTS="${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}"
else
    DEVICE=cuda
    KERNEL_SUITE=gpu-targets
    TRAIN_CONFIG=gpu
    if [ -z "${RESULTS:-}" ]; then
        GPU_NAME="$("$PYTHON" -c 'import torch; from bench.harness import device_name; print(device_name(torch.device("cuda")))' 2>/dev/null)"
        if [ -z "$GPU_NAME" ]; then
            echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is false); use --dry-run off a GPU" >&2
            exit 2
        fi
        RESULTS="$REPO/bench/results/$GPU_NAME"
    fi
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
STEPS_LOG="$RESULTS/steps.log"
: >"$LOG"
: >"$STEPS_LOG"
FAILED=()
DEADLINE=$((SECONDS + BUDGET - RESERVE))

log() {
    echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"
}

# publish: copy the results so far to $OUT (the folder the job keeps). Logs
# longer than MAX_FILE_BYTES keep their end; the tarball leaves out checkpoints and is dropped if too big.
publish() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    local file size
    for file in "${PUBLISHED[@]}"; do
        [ -f "$RESULTS/$file" ] || continue
        size=$(stat -c %s "$RESULTS/$file")
        if [ "$size" -gt "$MAX_FILE_BYTES" ]; then
            tail -c "$MAX_FILE_BYTES" "$RESULTS/$file" >"$OUT/$file"
        else
            cp "$RESULTS/$file" "$OUT/$file"
        fi
    done
    tar -czf "$OUT/results.tar.gz" --exclude='checkpoints' --exclude='*.pt' --exclude='*.safetensors' \
        -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
    if [ -f "$OUT/results.tar.gz" ] && [ "$(stat -c %s "$OUT/results.tar.gz")" -gt "$MAX_FILE_BYTES" ]; then
        rm -f "$OUT/results.tar.gz"
        echo "[gpu_check] results.tar.gz over $MAX_FILE_BYTES bytes: not published" >>"$LOG"
    fi
    echo "[gpu_check +${SECONDS}s] published $(ls "$OUT" | tr '\n' ' ')to $OUT" >>"$LOG"
    [ -f "$RESULTS/gpu_check.log" ] && cp "$RESULTS/gpu_check.log" "$OUT/gpu_check.log"
}

# step NAME COMMAND...: run one step under its limit (cut to the time left), its output to the terminal,
# NAME.log and steps.log; then publish.
step() {
    local name="$1"
    shift
    local limit="${LIMIT[$name]}" left=$((DEADLINE - SECONDS - KILL_AFTER))
    if [ "$limit" = rest ] || [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    if [ "$limit" -lt 1 ]; then
        log "step $name: NO TIME LEFT (budget ${BUDGET}s)"
        FAILED+=("$name")
        publish
        return
    fi
    log "step $name (limit ${limit}s): $*"
    echo "===== step $name (limit ${limit}s): $*" >>"$STEPS_LOG"
    local started=$SECONDS
    timeout --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | tee -a "$STEPS_LOG"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - started))
    if [ "$rc" -eq 0 ]; then
        log "step $name: ok (${took}s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        log "step $name: TIMED OUT after ${took}s"
        FAILED+=("$name")
    else
        log "step $name: FAILED with status $rc (${took}s)"
        FAILED+=("$name")
    fi
    publish
}

# show NAME COMMAND...: a step that the dry run prints instead of running.
show() {
    local name="$1"
    shift
    log "step $name (dry run, not run; limit ${LIMIT[$name]}): $*"
}

print_plan | tee -a "$LOG"
log "repository $REPO; results $RESULTS; dry run $DRY_RUN; python $PYTHON; PYTHONPATH $PYTHONPATH; OUT ${OUT:-unset}"
if [ "$DRY_RUN" = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
fi
publish

step environment "$PYTHON" -c '
import importlib.metadata as metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print("gpu", i, p.name, p.total_memory // 2**20, "MiB", "| sm", f"{p.major}{p.minor}", "|", p.multi_processor_count,
          "SMs | shared memory per block (opt-in)", getattr(p, "shared_memory_per_block_optin", "?"))
for name in ("triton", "numpy", "transformers", "liger-kernel", "easy-vqa", "tokenizers", "pytest", "pytest-xdist"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
import os, calibrl_kernels as ck
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("calibrl_kernels", ck.__version__, ck.__file__)
# the backends for this device, each forced through CALIBRL_IMPL on a tiny input (cpp is built on first use)
for impl in ("triton" if device.type == "cuda" else "cpp", "torch"):
    os.environ["CALIBRL_IMPL"] = impl
    try:
        ck.token_logprobs(torch.randn(4, 11, device=device), torch.zeros(4, dtype=torch.long, device=device))
        print("backend", impl, "on", device, "runs")
    except Exception as error:
        print("backend", impl, "on", device, "cannot run:", " ".join(str(error).split())[:300])
'

if [ "$DRY_RUN" = 0 ]; then
    unset TRITON_INTERPRET  # the kernels run natively; conftest leaves the interpreter off on CUDA
    step kernels "$PYTHON" -m bench --suite "$KERNEL_SUITE" --device "$DEVICE" --out "$RESULTS" \
        --no-train --no-plot --no-table
    PARALLEL=()  # pytest-xdist (on that machine's image) spreads the tests over a few workers
    if "$PYTHON" -c 'import xdist' 2>/dev/null; then PARALLEL=(-n "${TEST_WORKERS:-8}"); fi
    step tests "$PYTHON" -m pytest -v -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
        --junitxml="$RESULTS/pytest.xml" "${GPU_TESTS[@]}"
else
    step kernels "$PYTHON" -m bench --suite "$KERNEL_SUITE" --device "$DEVICE" --out "$RESULTS" \
        --no-train --no-plot --no-table --ops group_advantages
    show tests "$PYTHON" -m pytest -v -p no:cacheprovider --junitxml="$RESULTS/pytest.xml" "${GPU_TESTS[@]}"
fi
step train "$PYTHON" -m bench.bench_train --config "$TRAIN_CONFIG" --device "$DEVICE" --out "$RESULTS"
if "$PYTHON" -c 'import easy_vqa, tokenizers' 2>/dev/null; then
    # the real trainer end to end on this device (bf16 autocast, flash-attn when installed, SDPA otherwise), in
    # a scratch folder: its checkpoints never enter the results; its metrics and plots are copied over
    SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_trainer.XXXXXX")"
    step trainer "$PYTHON" -m calibrl.train --quick --device "$DEVICE" --out "$SCRATCH" --no-progress
    mkdir -p "$RESULTS/trainer_quick"
    find "$SCRATCH" -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.json' -o -name '*.png' -o -name '*.yaml' \) \
        -exec cp {} "$RESULTS/trainer_quick/" \;
    rm -rf "$SCRATCH"
else
    log "step trainer: skipped (easy-vqa or tokenizers not importable; bring easy-vqa as a wheel in .whl/)"
fi
step report "$PYTHON" -m bench.table "$RESULTS" --plots --out "$RESULTS/tables.md"
if [ "$DRY_RUN" = 0 ]; then
    if [ $((DEADLINE - SECONDS - KILL_AFTER)) -ge "$MIN_SWEEPS" ]; then
        step sweeps "$PYTHON" -m bench --suite gpu-sweeps --device "$DEVICE" --out "$RESULTS" \
            --no-train --no-plot --no-table
    else
        log "step sweeps: skipped (under ${MIN_SWEEPS}s left)"
    fi
else
    show sweeps "$PYTHON" -m bench --suite gpu-sweeps --device "$DEVICE" --out "$RESULTS" --no-train --no-plot --no-table
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
    log "done: FAILED steps: ${FAILED[*]} (results in $RESULTS)"
    publish
    exit 1
fi
log "done: every step passed (results in $RESULTS)"
publish
exit 0
