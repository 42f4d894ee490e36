#!/usr/bin/env bash
# One command for a GPU machine (H100 / H200): the test suite natively on CUDA (no Triton interpreter),
# the kernel benchmarks at Qwen-scale shapes in bf16, the train-step benchmark, a short run of the trainer
# (`python -m calibrl.train --quick --device cuda`), plots and the README table, all written to one folder.
# Ends within 10 minutes: every step has its own time limit.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from anywhere in the repository
#   bash bench/gpu_check.sh --dry-run    # anywhere: prints the steps, runs the python entry points in
#                                        # a tiny CPU configuration (pytest only printed)
#
# Results: bench/results/<gpu-name>/ (kernels.csv, train.csv, *.png, readme_table.md, one log per step,
# gpu_check.log). When $OUT is set (the device tool), the CSVs, the table, the log and a tarball of the
# whole folder are also copied there (that tool brings back at most 8 files).
# Missing Python packages (liger-kernel and easy-vqa there) come as wheels in .whl/ at the repository root, installed
# with `pip install --no-index --no-deps --target /tmp/site` and put on PYTHONPATH; without .whl/ the
# script runs with what is installed: the benchmarks record Liger as skipped, the trainer step and the
# trainer tests are skipped without easy-vqa, the TRL tests without trl (trl + datasets pull in pyarrow and
# more; bring them too to run those tests there).
# Prepare the wheels on a machine with internet, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       liger-kernel==0.8.5 easy-vqa==1.0
#
# Environment: PYTHON (default python3), RESULTS (results folder), and per-step limits in seconds:
# TEST_TIMEOUT (180), KERNEL_TIMEOUT (180), TRAIN_TIMEOUT (70), TRAINER_TIMEOUT (45), PLOT_TIMEOUT (40;
# plots + table); with the 30 s environment step at most 9.1 minutes in all. TEST_WORKERS (4): pytest-xdist workers.
# Exit status: 0 when every step passed, 1 when any failed or timed out (the later steps still run).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO="$(pwd)"

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
KERNEL_TIMEOUT="${KERNEL_TIMEOUT:-180}"
TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-70}"
TRAINER_TIMEOUT="${TRAINER_TIMEOUT:-45}"
PLOT_TIMEOUT="${PLOT_TIMEOUT:-40}"
export PYTHONUNBUFFERED=1

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

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    SUITE=tiny
    TRAIN_CONFIG=tiny
    TARGETS=gpu
    RESULTS="${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}"
else
    DEVICE=cuda
    SUITE=gpu
    TRAIN_CONFIG=gpu
    TARGETS=gpu
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
: >"$LOG"
FAILED=()

log() {
    echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"
}

# step NAME TIMEOUT_S COMMAND...: run one step under a time limit, its output to the terminal and NAME.log.
step() {
    local name="$1" limit="$2"
    shift 2
    log "step $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - started))
    if [ "$rc" -eq 0 ]; then
        log "step $name: ok (${took}s)"
    else
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            log "step $name: TIMED OUT after ${took}s"
        else
            log "step $name: FAILED with status $rc (${took}s)"
        fi
        FAILED+=("$name")
    fi
}

# show NAME COMMAND...: a step that the dry run prints instead of running.
show() {
    local name="$1"
    shift
    log "step $name (dry run, not run): $*"
}

log "repository $REPO; results $RESULTS; dry run $DRY_RUN; python $PYTHON; PYTHONPATH $PYTHONPATH"
step environment 30 "$PYTHON" -c '
import importlib.metadata as metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**20, "MiB")
for name in ("triton", "transformers", "liger-kernel", "matplotlib", "pytest", "pytest-benchmark"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
import calibrl_kernels, calibrl_kernels._dispatch as dispatch
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("calibrl_kernels", calibrl_kernels.__version__, calibrl_kernels.__file__)
for impl in dispatch.IMPLS:
    print("backend", impl, "on", device, dispatch.availability(impl, device))
'
if [ "$DRY_RUN" = 0 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | tee -a "$LOG"
    unset TRITON_INTERPRET  # the kernels run natively; conftest leaves the interpreter off on CUDA
    # pytest-xdist (on that machine's image) spreads the suite over a few workers when it is there
    PARALLEL=()
    if "$PYTHON" -c 'import xdist' 2>/dev/null; then PARALLEL=(-n "${TEST_WORKERS:-4}"); fi
    step tests "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} --junitxml="$RESULTS/pytest.xml" tests
    step kernels "$KERNEL_TIMEOUT" "$PYTHON" -m bench.run --suite "$SUITE" --device "$DEVICE" --out "$RESULTS" \
        --no-train --no-plot --no-table
else
    show tests "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$RESULTS/pytest.xml" tests
    step kernels "$KERNEL_TIMEOUT" "$PYTHON" -m bench.run --suite "$SUITE" --device "$DEVICE" --out "$RESULTS" \
        --no-train --no-plot --no-table --kernels group_advantages
fi
step train "$TRAIN_TIMEOUT" "$PYTHON" -m bench.bench_train --config "$TRAIN_CONFIG" --device "$DEVICE" --out "$RESULTS"
if "$PYTHON" -c 'import easy_vqa, tokenizers' 2>/dev/null; then
    # the real trainer end to end on this device (bf16 autocast, flash-attn when installed, SDPA otherwise)
    step trainer "$TRAINER_TIMEOUT" "$PYTHON" -m calibrl.train --quick --device "$DEVICE" \
        --out "$RESULTS/trainer_quick" --no-progress
else
    log "step trainer: skipped (easy-vqa or tokenizers not importable; bring easy-vqa as a wheel in .whl/)"
fi
step report "$PLOT_TIMEOUT" "$PYTHON" -m bench.readme_table "$RESULTS" --targets "$TARGETS" --plots \
    --out "$RESULTS/readme_table.md"

if [ -n "${OUT:-}" ] && [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$OUT"
    for file in kernels.csv train.csv readme_table.md gpu_check.log; do
        [ -f "$RESULTS/$file" ] && cp "$RESULTS/$file" "$OUT/"
    done
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    log "copied the CSVs, the table, the log and results.tar.gz to $OUT"
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
    log "done: FAILED steps: ${FAILED[*]} (results in $RESULTS)"
    exit 1
fi
log "done: every step passed (results in $RESULTS)"
exit 0
