#!/usr/bin/env bash
# The Triton kernels under triton 3.6, the release on the GPU machines (torch 2.11 there), in their own
# virtual environment: the interpreter tests on CPU (with the newest NumPy, which triton 3.6's interpreter
# needs calibrl_kernels.triton._interpreter_compat for) and the sm_90 compile check with triton 3.6's own
# compiler, so that no Triton API newer than 3.6 slips into the kernels.
#   bash .ci/triton36_env.sh        # venv in $CALIBRL_TRITON36_VENV or .venv-triton36
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=.ci/cpu_torch_venv.sh
. .ci/cpu_torch_venv.sh
venv="${CALIBRL_TRITON36_VENV:-.venv-triton36}"
cpu_torch_venv "$venv"
"$venv/bin/python" -m pip install -q "triton==3.6.0" "numpy>=2.4" "pytest>=7" "hypothesis>=6" ninja
"$venv/bin/python" -m pip install -q --no-deps -e .
echo "triton36-env: $("$venv/bin/python" -c 'import numpy, torch, triton; print("triton", triton.__version__, "numpy", numpy.__version__, "torch", torch.__version__)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/kernels/test_logprobs.py tests/kernels/test_loss.py \
    tests/kernels/test_linear.py tests/kernels/test_group_stats.py tests/kernels/test_triton_compile.py tests/kernels/test_triton_launch.py \
    tests/kernels/test_interpreter_compat.py
