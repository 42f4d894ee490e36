#!/usr/bin/env bash
# The verl integration's tests in their own virtual environment (verl 0.9.1 pins transformers <5.11,
# which the main environment does not satisfy). Creates the environment when missing, installs this
# package with the `verl` and `test` extras, and runs only tests/test_integration_verl.py.
#   bash .ci/verl_env.sh            # venv in $CALIBRL_VERL_VENV or .venv-verl
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=.ci/cpu_torch_venv.sh
. .ci/cpu_torch_venv.sh
venv="${CALIBRL_VERL_VENV:-.venv-verl}"
cpu_torch_venv "$venv"
# verl and what its v1 trainer imports (the `verl-core` extra minus GPU-only and media packages)
"$venv/bin/python" -m pip install -q -e ".[verl,test]"
echo "verl-env: $("$venv/bin/python" -c 'import verl, transformers, torch; print("verl", verl.__version__, "transformers", transformers.__version__, "torch", torch.__version__)')"
"$venv/bin/python" -m pytest -q tests/test_integration_verl.py -p no:cacheprovider
