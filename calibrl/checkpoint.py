"""Checkpoints: one dict per file, written atomically, the last K kept.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimizer and
scheduler states, the phase ("sft" or "rl") and step, the data order (sampler state), the RNG
states of every process (torch CPU and CUDA, numpy, python ``random``) and the run's config.
Files are ``<run>/checkpoints/ckpt-<index>.pt`` with a monotonic index (SFT steps, then RL steps).
"""

from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .config import ConfigError

_NAME = re.compile(r"ckpt-(\d+)\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> List[str]:
    """Checkpoint paths of a run, oldest first."""
    paths = [p for p in glob.glob(os.path.join(checkpoint_dir(run_dir), "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    paths = list_checkpoints(run_dir)
    return paths[-1] if paths else None


def resume_path(run_dir: str) -> str:
    """The checkpoint ``--resume RUN_DIR`` continues from (its latest)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)}")
    return path


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(run_dir: str, index: int, state: Dict[str, Any], keep: int) -> str:
    """Write checkpoint ``index`` atomically and delete all but the newest ``keep`` (keep 0: keep all)."""
    os.makedirs(checkpoint_dir(run_dir), exist_ok=True)
    path = os.path.join(checkpoint_dir(run_dir), f"ckpt-{index:07d}.pt")
    atomic_torch_save(state, path)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict (our own file: full unpickling, it holds numpy RNG state)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (every device) of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> Dict[str, Any]:
    """RNG states of this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
