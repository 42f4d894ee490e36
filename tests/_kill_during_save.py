"""``python tests/_kill_during_save.py STAGE N TRAIN_FLAGS...``: calibrl.train that SIGKILLs itself during its
N-th checkpoint save, at STAGE:

- ``data-half``: half of the checkpoint's bytes are in the temporary file (fsynced), not renamed yet;
- ``before-checksum``: the checkpoint file is in place, its checksum file not written yet;
- ``before-prune``: checkpoint and checksum are written, the old checkpoints not pruned yet.
"""

import io
import os
import signal
import sys

from calibrl import checkpoint
from calibrl.train import main

STAGE, NTH, ARGV = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
saves = [0]
original_save, original_write, original_prune = checkpoint.save_checkpoint, checkpoint.atomic_write, checkpoint._prune


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save(run_dir, index, state, keep):
    saves[0] += 1
    return original_save(run_dir, index, state, keep)


def write(path, writer):
    if saves[0] == NTH and STAGE == "data-half" and path.endswith(".pt"):

        def half(handle):
            buffer = io.BytesIO()
            writer(buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            die()

        return original_write(path, half)
    if saves[0] == NTH and STAGE == "before-checksum" and path.endswith(checkpoint.CHECKSUM_SUFFIX):
        die()
    return original_write(path, writer)


def prune(run_dir, newest, keep):
    if saves[0] == NTH and STAGE == "before-prune":
        die()
    return original_prune(run_dir, newest, keep)


checkpoint.save_checkpoint, checkpoint.atomic_write, checkpoint._prune = save, write, prune
sys.exit(main(ARGV))
