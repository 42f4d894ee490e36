"""Runs the study's runs in parallel processes, resumably, with a progress bar over runs.

Each run is ``python -m calibrl.train ... --out STUDY/NAME`` in its own process (stdout and stderr to
``STUDY/NAME/train.log``). A run that exited 0 gets ``STUDY/NAME/study_done.json`` and is skipped next
time; a run that was stopped after its first checkpoint is continued with ``--resume``; a run folder
without a checkpoint is started afresh. RL runs wait for their seed's warm start. Every folder is kept.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

from .. import checkpoint
from .grid import Run

DONE_FILE = "study_done.json"
FAILED_FILE = "study_failed.json"  # the last attempt's error (removed when the run finishes)


def is_done(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, DONE_FILE))


def failure_message(run_dir: str) -> Optional[str]:
    """The error of the run's last failed attempt, or None."""
    path = os.path.join(run_dir, FAILED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["error"]


def _record_failure(run: Run, run_dir: str, error: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, FAILED_FILE), "w", encoding="utf-8") as handle:
        json.dump({"name": run.name, "error": error}, handle, indent=2)


def _command(run: Run, run_dir: str) -> List[str]:
    base = [sys.executable, "-m", "calibrl.train", *run.flags]
    if checkpoint.list_checkpoints(run_dir):  # stopped part-way: continue where it left off
        return base + ["--resume", run_dir]
    return base + ["--out", run_dir]


def _execute(run: Run, run_dir: str) -> float:
    """Runs one ``calibrl.train`` process to the end; returns its wall time (RuntimeError when it fails)."""
    os.makedirs(run_dir, exist_ok=True)
    command = _command(run, run_dir)
    started = time.time()
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    elapsed = time.time() - started
    if code != 0:
        raise RuntimeError(f"{run.name}: calibrl.train exited with status {code}; see {run_dir}/train.log")
    with open(os.path.join(run_dir, DONE_FILE), "w", encoding="utf-8") as handle:
        json.dump({"name": run.name, "wall_s": elapsed, "command": command}, handle, indent=2)
    if os.path.isfile(os.path.join(run_dir, FAILED_FILE)):
        os.remove(os.path.join(run_dir, FAILED_FILE))
    return elapsed


def run_all(runs: Sequence[Run], study_dir: str, jobs: int, progress: bool = True) -> Dict[str, str]:
    """Runs every unfinished run, ``jobs`` at a time; returns {name: "done" | "skipped" | error message}."""
    from tqdm import tqdm

    status: Dict[str, str] = {}
    finished = {run.name: threading.Event() for run in runs}
    pending = []
    for run in runs:
        if is_done(os.path.join(study_dir, run.name)):
            status[run.name] = "skipped"
            finished[run.name].set()
        else:
            pending.append(run)
    bar = tqdm(
        total=len(runs),
        initial=len(runs) - len(pending),
        desc="study runs",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )
    lock = threading.Lock()

    def work(run: Run) -> None:
        try:
            if run.depends_on is not None:
                finished[run.depends_on].wait()
                if status.get(run.depends_on) not in ("done", "skipped"):
                    raise RuntimeError(f"{run.name}: {run.depends_on}, which it starts from, failed")
            _execute(run, os.path.join(study_dir, run.name))
            result = "done"
        except Exception as error:  # reported (and kept for the report), and the other runs go on
            result = str(error)
            _record_failure(run, os.path.join(study_dir, run.name), result)
        with lock:
            status[run.name] = result
            bar.update(1)
            bar.set_postfix_str(f"last: {run.name} ({'ok' if result == 'done' else 'FAILED'})")
        finished[run.name].set()

    # warm starts come first in ``runs`` and the pool takes work in order, so a waiting RL run never blocks
    # the warm start it waits for
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(work, pending))
    bar.close()
    return status
