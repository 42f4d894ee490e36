#!/usr/bin/env bash
# CalibRL with verl on several nodes (one Ray cluster). calibrl must be pip-installed on every node: verl
# loads its `verl.plugins` entry point in every Ray process, which registers the CalibRL loss, advantage
# estimator, agent loop and trainer mode.
#   head node:     bash examples/verl/run_multi_node.sh head
#   other nodes:   HEAD=<head-ip> bash examples/verl/run_multi_node.sh worker
#   then, on head: NODES=4 GPUS=8 MODEL=... TRAIN=... bash examples/verl/run_multi_node.sh train [hydra overrides]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
role="${1:?usage: run_multi_node.sh head|worker|train [hydra overrides]}"; shift || true
PORT="${RAY_PORT:-6379}"
case "$role" in
    head)   ray start --head --port="$PORT" --num-gpus="${GPUS:-8}" ;;
    worker) ray start --address="${HEAD:?set HEAD to the head node address}:$PORT" --num-gpus="${GPUS:-8}" ;;
    train)
        # verl's main_ppo joins the running cluster (RAY_ADDRESS) instead of starting a local one.
        : "${NODES:?set NODES to the number of nodes}"
        RAY_ADDRESS="${RAY_ADDRESS:-auto}" NODES="$NODES" bash "$here/run_one_node.sh" "$@" ;;
    *) echo "unknown role $role (head|worker|train)" >&2; exit 2 ;;
esac
