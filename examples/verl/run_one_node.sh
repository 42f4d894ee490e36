#!/usr/bin/env bash
# CalibRL with verl on one node (Ray is started locally by verl). Needs: pip install 'calibrl[verl]' plus
# verl's rollout engine (e.g. pip install 'verl[vllm]==0.9.1'), GPUs, and data from prepare_data.py.
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct TRAIN=~/data/calibrl/train.parquet VAL=~/data/calibrl/test.parquet \
#   GPUS=8 bash examples/verl/run_one_node.sh [more hydra overrides]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${MODEL:?set MODEL to a local or hub model path}" "${TRAIN:?set TRAIN to a parquet file}" "${VAL:=$TRAIN}"
GPUS="${GPUS:-8}"
# calibrl.yaml's `key: value` lines become hydra overrides `key=value`.
mapfile -t calibrl_overrides < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/:[[:space:]]*/=/' -e 's/[[:space:]]*$//' "$here/calibrl.yaml")
python3 -m verl.trainer.main_ppo \
    "${calibrl_overrides[@]}" \
    data.train_files="$TRAIN" data.val_files="$VAL" \
    data.train_batch_size="${PROMPTS_PER_STEP:-480}" data.max_prompt_length=1024 data.max_response_length=4096 \
    data.image_key=images \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.ppo_mini_batch_size="${MINI_BATCH_PROMPTS:-120}" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.name=vllm \
    reward.custom_reward_function.path="$here/reward.py" \
    trainer.n_gpus_per_node="$GPUS" trainer.nnodes="${NODES:-1}" \
    trainer.project_name=calibrl trainer.experiment_name="${NAME:-calibrl-verl}" \
    "$@"
