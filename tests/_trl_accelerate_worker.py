"""CalibRLTrainer on a scripted generation batch, for tests/test_integration_trl.py's multi-process check.

``python _trl_accelerate_worker.py OUT PER_DEVICE_ROWS`` trains 2 steps of calibrl mode (loss_type='dapo') with
SGD on a tiny model built in code; completions come from a rollout_func that is a function of (prompt, index
in the group) only, so one process with 16 rows and two processes with 8 rows each see the same global batch.
Process 0 writes OUT/log_history.json and OUT/params.pt.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main(out: str, per_device_rows: int) -> None:
    from _tiny_models import char_tokenizer
    from test_integration_trl import make_args, scripted_trainer, text_dataset

    from calibrl.integrations.trl import CalibRLTrainer

    tokenizer = char_tokenizer()
    dataset = text_dataset(expert=["ok " + a for a in ("2", "4", "4", "3")], n=4)
    args = make_args(
        out,
        per_device_train_batch_size=per_device_rows,
        num_generations=4,
        optim="sgd",
        learning_rate=0.5,
        loss_type="dapo",
        mask_truncated_completions=True,
        calibrl_guide_coef=0.5,
    )
    trainer = scripted_trainer(CalibRLTrainer, args, tokenizer, dataset)
    trainer.train()
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out, "log_history.json"), "w") as handle:
            json.dump({"num_processes": trainer.accelerator.num_processes, "log": trainer.state.log_history}, handle)
        torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, os.path.join(out, "params.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
