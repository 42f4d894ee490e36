# Sourced by the CI scripts that test in an environment of their own.
# cpu_torch_venv VENV: create the virtual environment VENV with the CPU build of torch 2.13.0 (from the
# local wheel cache where one exists, else PyTorch's CPU index), unless VENV already has a python.
cpu_torch_venv() {
    local venv="$1"
    [ -x "$venv/bin/python" ] && return 0
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==2.13.0" \
        || "$venv/bin/python" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
}
