"""Checkpoints: one dict per file, written atomically with a checksum, verified on load, the last K kept.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer and
scheduler states, the phase ("sft" or "rl") and step, the data order (sampler state), the RNG
states of every process (torch CPU and CUDA, numpy, python ``random``) and the run's config.
Files are ``<run>/checkpoints/ckpt-<index>.pt`` with a monotonic index (SFT steps, then RL steps),
each with its checksum file ``ckpt-<index>.pt.sha256`` (JSON: file name, index, size in bytes, sha256).

Writing (``save_checkpoint``): the data goes to a temporary file in the same folder, is fsynced and
renamed over the final name, then the folder is fsynced; the checksum file follows the same way. A
checkpoint counts only once its checksum file is in place, and older ones are deleted only after that,
so a process killed at any moment leaves the previous good checkpoints intact. A failed write (a full disk)
raises ``CheckpointError`` saying so, with the free space, and leaves the older checkpoints as they were.

Loading (``load_checkpoint``, ``load_latest``): the size and sha256 are checked against the checksum
file first (and the file name and index it records: a file restored under another name is refused), then
the dict is read with ``torch.load(weights_only=True)``, which admits tensors and plain
containers only and never runs code from the file: a pickle of any other object is refused. Every
value in the dict is therefore a tensor, a number, a string, None or a list / tuple / dict of those
(the numpy RNG state is stored as a tensor and a dict, see ``capture_rng``). ``load_latest`` falls back
from a missing, truncated, modified, renamed or refused checkpoint, or one whose contents the caller's
``check`` rejects (another format), to the previous good one with a warning.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .config import ConfigError

_NAME = re.compile(r"ckpt-(\d+)\.pt$")
CHECKSUM_SUFFIX = ".sha256"
_TEMP = ".tmp-"  # temporary files: <final name>.tmp-<pid>


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: its message names the file and why."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated, unverified or refused) in favour of an older one."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checksum_path(path: str) -> str:
    return path + CHECKSUM_SUFFIX


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint data files of a run (verified or not), oldest first."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(run_dir), "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint file by index, whether it verifies or not (see ``load_latest``)."""
    paths = list_checkpoints(run_dir)
    return paths[-1] if paths else None


# ------------------------------------------------------------------------------------------ writing
def _fsync_dir(folder: str) -> None:
    """Make a rename or creation in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    A reader sees either the old file or the complete new one, also after a crash or SIGKILL.
    """
    tmp = f"{path}{_TEMP}{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through ``atomic_write``."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_leftovers(folder: str) -> None:
    """Temporary files of a writer that was killed, and checksum files whose checkpoint is gone."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _TEMP in name or (name.endswith(CHECKSUM_SUFFIX) and not os.path.exists(path[: -len(CHECKSUM_SUFFIX)])):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def save_checkpoint(run_dir: str, index: int, state: Dict[str, Any], keep: int) -> str:
    """Write checkpoint ``index`` and its checksum atomically, then keep only the newest ``keep`` good ones.

    ``keep`` 0 keeps all. Checkpoints older than the new one that do not verify are deleted too.
    """
    folder = checkpoint_dir(run_dir)
    os.makedirs(folder, exist_ok=True)
    _remove_leftovers(folder)
    path = os.path.join(folder, f"ckpt-{index:07d}.pt")
    if os.path.exists(checksum_path(path)):  # an older checkpoint of this index is replaced: unverified until done
        os.remove(checksum_path(path))
    try:
        atomic_torch_save(state, path)
        record = {
            "file": os.path.basename(path),
            "index": index,
            "bytes": os.path.getsize(path),
            "sha256": file_sha256(path),
        }
        atomic_write(checksum_path(path), lambda handle: handle.write((json.dumps(record) + "\n").encode()))
    except (OSError, RuntimeError) as error:  # torch reports a short write as RuntimeError "unexpected pos"
        for leftover in (checksum_path(path), path):  # this index is unusable; the older ones are untouched
            if os.path.exists(leftover):
                os.remove(leftover)
        raise write_failure(path, error, state_nbytes(state)) from error
    if keep > 0:
        _prune(run_dir, path, keep)
    return path


def write_failure(path: str, error: BaseException, needed: int) -> CheckpointError:
    """The error of a checkpoint write that failed: "no space left on device" when the disk is full."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        "unexpected pos" in str(error) or (free is not None and free < needed)
    )
    where = (
        f"{free / 2**20:.1f} MiB free in {folder}, the checkpoint needs about {needed / 2**20:.1f} MiB"
        if free is not None
        else folder
    )
    what = "no space left on device" if full else f"{type(error).__name__}: {str(error).strip()[:300]}"
    return CheckpointError(f"{what} while writing checkpoint {path} ({where}); the older checkpoints are intact")


def iter_tensors(value: Any, name: str = "state") -> Iterator[Tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in a nested dict / list / tuple."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_tensors(item, f"{name}.{key}")
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from iter_tensors(item, f"{name}[{position}]")


def state_nbytes(state: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for _, tensor in iter_tensors(state))


def _prune(run_dir: str, newest: str, keep: int) -> None:
    """Delete every checkpoint older than ``newest`` except the newest ``keep - 1`` that verify."""
    older = [p for p in list_checkpoints(run_dir) if _index(p) < _index(newest)]
    kept = 1
    for path in reversed(older):
        if kept < keep and verify_checkpoint(path) is None:
            kept += 1
            continue
        for victim in (checksum_path(path), path):  # checksum first: never a checksum without its data
            try:
                os.remove(victim)
            except FileNotFoundError:
                pass


def _index(path: str) -> Optional[int]:
    match = _NAME.search(path)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------ loading
def verify_checkpoint(path: str) -> Optional[str]:
    """None when ``path`` matches its checksum file, else why not (missing, truncated, modified, ...)."""
    if not os.path.exists(path):
        return "the file is missing"
    try:
        with open(checksum_path(path), encoding="utf-8") as handle:
            record = json.load(handle)
        expected_size, expected_sha = int(record["bytes"]), str(record["sha256"])
        named, index = record.get("file"), record.get("index")  # absent in the oldest checksum files
    except FileNotFoundError:
        return f"no checksum file {os.path.basename(checksum_path(path))} (its write never finished)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable checksum file {os.path.basename(checksum_path(path))} ({error})"
    if (named is not None and named != os.path.basename(path)) or (index is not None and index != _index(path)):
        return (
            f"its checksum file was written for {named} (index {index}), not this file: a checkpoint restored "
            "or copied under another name is never trusted"
        )
    size = os.path.getsize(path)
    if size != expected_size:
        return f"truncated or extended: {size} bytes, the checksum file records {expected_size}"
    if file_sha256(path) != expected_sha:
        return "sha256 differs from the checksum file (the file was modified or is corrupt)"
    return None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The verified checkpoint dict (tensors and plain containers only); CheckpointError when unusable."""
    reason = verify_checkpoint(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path}: {reason}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses any global it does not allow: nothing is executed
        raise CheckpointError(
            f"checkpoint {path}: refused by torch.load(weights_only=True), it holds more than "
            f"tensors and plain containers ({_short(error)})"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(state).__name__}")
    return state


def _short(error: Exception) -> str:
    """The informative line of a torch.load error (weights_only's names the refused global)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next(
        (line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line), lines[-1] if lines else ""
    )
    return f"{type(error).__name__}: {detail[:300]}"


def load_latest(
    run_dir: str, check: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None
) -> Tuple[str, Dict[str, Any]]:
    """(path, state) of the newest checkpoint that verifies, loads and passes ``check`` (None, or why the
    contents are unusable, e.g. another format); each newer one skipped with a warning.

    ConfigError (reported as a usage error of ``--resume``) when there is none.
    """
    paths = list_checkpoints(run_dir)
    if not paths:
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)}")
    reasons = []
    for position in range(len(paths) - 1, -1, -1):
        try:
            state = load_checkpoint(paths[position])
            problem = check(state) if check is not None else None
            if problem is not None:
                raise CheckpointError(f"checkpoint {paths[position]}: {problem}")
            return paths[position], state
        except CheckpointError as error:
            reasons.append(str(error))
            fallback = (
                f"falling back to {os.path.basename(paths[position - 1])}" if position else "no older checkpoint left"
            )
            warnings.warn(f"{error}; {fallback}", CheckpointWarning, stacklevel=2)
    raise ConfigError(f"--resume: no usable checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(reasons))


# ------------------------------------------------------------------------------ the trainer's format
FORMAT_VERSION = 1  # of the trainer's checkpoint dict (its "format_version"; absent in the first checkpoints)
TRAINER_STATE = {
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "phase": str,
    "step": int,
    "sampler": dict,
    "rng": list,
    "world_size": int,
    "config": dict,
}  # required keys and their types


def trainer_state_problem(state: Dict[str, Any]) -> Optional[str]:
    """None when ``state`` has the trainer's keys with their types, else what is wrong (the checkpoint is then
    skipped like a corrupt one); a newer format version with keys this version does not know warns naming them."""
    missing = [key for key in TRAINER_STATE if key not in state]
    wrong = [
        f"{key} is a {type(state[key]).__name__}, expected {kind.__name__}"
        for key, kind in TRAINER_STATE.items()
        if key in state and not isinstance(state[key], kind)
    ]
    if missing or wrong:
        return (
            "not a trainer checkpoint of a format this version reads ("
            + "; ".join(([f"missing key(s) {missing}"] if missing else []) + wrong)
            + ")"
        )
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        extra = sorted(set(state) - set(TRAINER_STATE) - {"format_version"})
        warnings.warn(
            f"checkpoint format version {version} is newer than this version's {FORMAT_VERSION}: read "
            f"as version {FORMAT_VERSION}" + (f", ignoring key(s) {extra}" if extra else ""),
            CheckpointWarning,
            stacklevel=2,
        )
    return None


# ---------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (every device) of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> Dict[str, Any]:
    """RNG states of this process, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),  # (version, tuple of ints, gauss_next float or None)
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
