#!/usr/bin/env bash
# CalibRL with verl on one node (Ray is started locally by verl). Needs: pip install 'calibrl[verl]' plus
# verl's rollout engine (e.g. pip install 'verl[vllm]==0.9.1'), GPUs, and data from prepare_data.py.
#   MODEL=Qwen/Qwen2.5-VL-7B-Instruct TRAIN=~/data/calibrl/train.parquet VAL=~/data/calibrl/test.parquet \
#   GPUS=8 bash examples/verl/run_one_node.sh [more hydra overrides]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${MODEL:?set MODEL to a local or hub model path}" "${TRAIN:?set TRAIN to a parquet file}" "${VAL:=$TRAIN}"
GPUS="${GPUS:-8}"
# One TransferQueue storage unit per free Ray CPU, at most verl's default 8 (each unit and the TQ controller
# hold one Ray CPU; more units than CPUs would wait forever, which calibrl.integrations.verl.main refuses).
CPUS="${CPUS:-$(nproc)}"
TQ_UNITS="${TQ_UNITS:-$(( CPUS > 9 ? 8 : (CPUS > 2 ? CPUS - 1 : 1) ))}"
# calibrl.yaml's `key: value` lines become hydra overrides `key=value`.
mapfile -t calibrl_overrides < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/:[[:space:]]*/=/' -e 's/[[:space:]]*$//' "$here/calibrl.yaml")
# verl's main_ppo behind CalibRL's start-up checks (unsupported settings refused before Ray starts)
python3 -m calibrl.integrations.verl.main \
    "${calibrl_overrides[@]}" \
    ray_kwargs.ray_init.num_cpus="$(( CPUS > TQ_UNITS + 1 ? CPUS : TQ_UNITS + 1 ))" \
    transfer_queue.backend.SimpleStorage.num_data_storage_units="$TQ_UNITS" \
    data.train_files="$TRAIN" data.val_files="$VAL" \
    data.train_batch_size="${PROMPTS_PER_STEP:-480}" data.max_prompt_length=1024 data.max_response_length=4096 \
    data.image_key=images \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.ppo_mini_batch_size="${MINI_BATCH_PROMPTS:-120}" \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.name="${ROLLOUT:-vllm}" trainer.device="${DEVICE:-cuda}" \
    reward.custom_reward_function.path="$here/reward.py" \
    trainer.n_gpus_per_node="$GPUS" trainer.nnodes="${NODES:-1}" \
    trainer.project_name=calibrl trainer.experiment_name="${NAME:-calibrl-verl}" \
    "$@"
