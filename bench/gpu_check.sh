#!/usr/bin/env bash
# The GPU check for a time-limited job on an H100 / H200: ordered steps, each under its own limit cut to the time
# left, within GPU_CHECK_BUDGET seconds; results published to $OUT after every step (docs/benchmarks.md, "GPU check").
#
#   bash bench/gpu_check.sh [--dry-run | --plan]   # --dry-run: anywhere, tiny on CPU; --plan: the plan and limits
#
# Environment: PYTHON (python3); RESULTS (bench/results/<gpu-name>/); OUT; GPU_CHECK_BUDGET (360); step limits
# ENV_TIMEOUT, KERNEL_TIMEOUT, TEST_TIMEOUT, TRAIN_TIMEOUT, TRAINER_TIMEOUT, REPORT_TIMEOUT; GPU_CHECK_MAX_FILES (7)
# files of GPU_CHECK_MAX_FILE_MB (15) MiB published; TEST_WORKERS (8, pytest-xdist); wheels in .whl/ are installed
# with pip --no-index --no-deps into GPU_CHECK_SITE (/tmp/site). Exit 0: every step passed or was skipped for a
# missing package; 1: one did not; 2: bad usage.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO="$(pwd)"
MODE=run
for arg in "$@"; do
    case "$arg" in
        --dry-run) MODE=dry ;;
        --plan) MODE=plan ;;
        -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (expected --dry-run, --plan or --help)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-360}"
RESERVE=10       # seconds kept for the last publish
KILL_AFTER=5     # a step ignoring SIGTERM at its limit is killed this much later (counted in its limit)
MIN_SWEEPS=30    # the sweeps run only with this much time left
STEP_NAMES=(environment kernels tests train trainer report sweeps)
declare -A LIMIT=([environment]="${ENV_TIMEOUT:-20}" [kernels]="${KERNEL_TIMEOUT:-140}"
    [tests]="${TEST_TIMEOUT:-110}" [train]="${TRAIN_TIMEOUT:-35}" [trainer]="${TRAINER_TIMEOUT:-30}"
    [report]="${REPORT_TIMEOUT:-15}" [sweeps]=rest)
# The Triton test files: every kernel against its reference, natively compiled on CUDA.
GPU_TESTS=(tests/kernels/test_{logprobs,loss,linear,group_stats,triton_launch}.py
           tests/kernels/test_compile.py::test_triton_operators_compile_natively_on_cuda)
# What is published to $OUT, in this order, up to the file-count cap.
PUBLISHED=(gpu_check.log steps.log kernels.csv train.csv pytest.xml tables.md results.tar.gz)
MAX_FILES="${GPU_CHECK_MAX_FILES:-7}"
MAX_FILE_BYTES=$((${GPU_CHECK_MAX_FILE_MB:-15} * 1024 * 1024))

print_plan() {
    local total=0 name
    echo "gpu_check plan (budget ${BUDGET}s, ${RESERVE}s kept for the last publish; each limit is cut to the time left):"
    for name in "${STEP_NAMES[@]}"; do
        echo "  ${name}: limit ${LIMIT[$name]}$([ "${LIMIT[$name]}" = rest ] || echo s)"
        [ "${LIMIT[$name]}" = rest ] || total=$((total + LIMIT[$name]))
    done
    echo "  step limits add up to ${total}s; results published to \$OUT after every step: ${PUBLISHED[*]}"
}
[ "$MODE" = plan ] && { print_plan; exit 0; }

SITE=""
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    SITE="${GPU_CHECK_SITE:-/tmp/site}"
    echo "gpu_check: installing wheels from .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl || { echo "gpu_check: wheel installation failed; going on without them" >&2; SITE=""; }
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$MODE" = dry ]; then  # GPU_ONLY: a dry run shows the GPU-only steps instead of running them
    DEVICE=cpu KERNELS=(--suite tiny --ops group_advantages) TRAIN_CONFIG=tiny GPU_ONLY=show
    RESULTS="${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}"
else
    DEVICE=cuda KERNELS=(--suite gpu-targets) TRAIN_CONFIG=gpu GPU_ONLY=step
    unset TRITON_INTERPRET  # the kernels run natively; conftest leaves the interpreter off on CUDA
    RESULTS="${RESULTS:-$("$PYTHON" -c 'import torch, bench.harness as h; print(h.results_folder(None, torch.device("cuda")))' 2>/dev/null)}"
    [ -n "$RESULTS" ] || { echo "gpu_check: no CUDA device visible to $PYTHON; use --dry-run off a GPU" >&2; exit 2; }
fi
LOG="$RESULTS/gpu_check.log" STEPS_LOG="$RESULTS/steps.log" FAILED=() DEADLINE=$((SECONDS + BUDGET - RESERVE))
mkdir -p "$RESULTS" && : >"$LOG" && : >"$STEPS_LOG"

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# publish: copy the results so far to $OUT, at most MAX_FILES files of MAX_FILE_BYTES each (a longer file keeps its
# end; the tarball of the results folder leaves out checkpoints and is dropped when too big).
publish() {
    [ -n "${OUT:-}" ] || return 0
    local file count=0 && mkdir -p "$OUT"
    for file in "${PUBLISHED[@]}"; do
        if [ "$count" -ge "$MAX_FILES" ]; then
            rm -f "$OUT/$file"  # over the file-count cap: one published earlier gives way
        elif [ "$file" = results.tar.gz ]; then
            tar -czf "$OUT/$file" --exclude=checkpoints --exclude='*.pt' --exclude='*.safetensors' \
                -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null
            [ "$(stat -c %s "$OUT/$file" 2>/dev/null || echo 0)" -le "$MAX_FILE_BYTES" ] ||
                { rm -f "$OUT/$file"; echo "[gpu_check] $file over $MAX_FILE_BYTES bytes: not published" >>"$LOG"; }
        elif [ -f "$RESULTS/$file" ]; then
            tail -c "$MAX_FILE_BYTES" "$RESULTS/$file" >"$OUT/$file"
        fi
        [ -f "$OUT/$file" ] && count=$((count + 1))
    done
    echo "[gpu_check +${SECONDS}s] published $(ls "$OUT" | tr '\n' ' ')to $OUT" >>"$LOG"
    [ -f "$OUT/gpu_check.log" ] && tail -c "$MAX_FILE_BYTES" "$LOG" >"$OUT/gpu_check.log"
}

# step NAME COMMAND...: one step under its limit (cut to the time left), its output to the terminal, NAME.log and
# steps.log; then publish. show NAME COMMAND...: a step that the dry run prints instead of running.
step() {
    local name="$1" limit="${LIMIT[$1]}" left=$((DEADLINE - SECONDS - KILL_AFTER)) started=$SECONDS rc=1 && shift
    { [ "$limit" = rest ] || [ "$limit" -gt "$left" ]; } && limit=$left
    if [ "$limit" -lt 1 ]; then
        log "step $name: NO TIME LEFT (budget ${BUDGET}s)"
    else
        log "step $name (limit ${limit}s): $*"
        echo "===== step $name (limit ${limit}s): $*" >>"$STEPS_LOG"
        timeout --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log" | tee -a "$STEPS_LOG"
        rc=${PIPESTATUS[0]}
        case "$rc" in
            0) log "step $name: ok ($((SECONDS - started))s)" ;;
            124|137) log "step $name: TIMED OUT after $((SECONDS - started))s" ;;
            *) log "step $name: FAILED with status $rc ($((SECONDS - started))s)" ;;
        esac
    fi
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    publish
}
show() { log "step $1 (dry run, not run; limit ${LIMIT[$1]}): ${*:2}"; }

print_plan | tee -a "$LOG"
log "repository $REPO; results $RESULTS; mode $MODE; python $PYTHON; PYTHONPATH $PYTHONPATH; OUT ${OUT:-unset}"
[ "$MODE" = run ] && command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
publish

step environment "$PYTHON" -c '
import importlib.metadata as metadata, os, platform, torch
import calibrl_kernels as ck
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print("gpu", i, p.name, p.total_memory // 2**20, "MiB | sm", f"{p.major}{p.minor} |", p.multi_processor_count,
          "SMs | shared memory per block (opt-in)", getattr(p, "shared_memory_per_block_optin", "?"))
for name in ("triton", "transformers", "liger-kernel", "easy-vqa", "tokenizers", "pytest-xdist"):
    try: print(name, metadata.version(name))
    except metadata.PackageNotFoundError: print(name, "not installed")
print("calibrl_kernels", ck.__version__, ck.__file__)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for impl in ("triton" if device.type == "cuda" else "cpp", "torch"):  # each backend forced on a tiny input
    os.environ["CALIBRL_IMPL"] = impl
    try:
        ck.token_logprobs(torch.randn(4, 11, device=device), torch.zeros(4, dtype=torch.long, device=device))
        print("backend", impl, "on", device, "runs")
    except Exception as error:
        print("backend", impl, "on", device, "cannot run:", " ".join(str(error).split())[:300])
'

BENCH=("$PYTHON" -m bench --device "$DEVICE" --out "$RESULTS" --no-train --no-plot --no-table)
step kernels "${BENCH[@]}" "${KERNELS[@]}"
PARALLEL=()  # pytest-xdist, where installed, spreads the GPU tests over a few workers
[ "$MODE" = run ] && "$PYTHON" -c 'import xdist' 2>/dev/null && PARALLEL=(-n "${TEST_WORKERS:-8}")
$GPU_ONLY tests "$PYTHON" -m pytest -v -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
    --junitxml="$RESULTS/pytest.xml" "${GPU_TESTS[@]}"
step train "$PYTHON" -m bench.bench_train --config "$TRAIN_CONFIG" --device "$DEVICE" --out "$RESULTS"
if "$PYTHON" -c 'import easy_vqa, tokenizers' 2>/dev/null; then
    # the real trainer end to end in a scratch folder: its metrics and plots are copied over, never a checkpoint
    SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_trainer.XXXXXX")"
    step trainer "$PYTHON" -m calibrl.train --quick --device "$DEVICE" --out "$SCRATCH" --no-progress
    mkdir -p "$RESULTS/trainer_quick" && cp "$SCRATCH"/*.{jsonl,json,png,yaml} "$RESULTS/trainer_quick/" 2>/dev/null
    rm -rf "$SCRATCH"
else
    log "step trainer: skipped (easy-vqa or tokenizers not importable; bring easy-vqa as a wheel in .whl/)"
fi
step report "$PYTHON" -m bench.table "$RESULTS" --plots --out "$RESULTS/tables.md"
if [ "$MODE" = dry ] || [ $((DEADLINE - SECONDS - KILL_AFTER)) -ge "$MIN_SWEEPS" ]; then
    $GPU_ONLY sweeps "${BENCH[@]}" --suite gpu-sweeps
else
    log "step sweeps: skipped (under ${MIN_SWEEPS}s left)"
fi

[ "${#FAILED[@]}" -gt 0 ] && log "done: FAILED steps: ${FAILED[*]} (results in $RESULTS)" ||
    log "done: every step passed (results in $RESULTS)"
publish
exit $((${#FAILED[@]} > 0))
