"""Training data: examples, dataset loading and the resumable prompt order.

An ``Example`` is one question about one image with its ground-truth answer and one expert
trajectory (a short correct ``<think>...</think><answer>...</answer>`` response). Sources:
``easy-vqa`` (the package's real images and questions, see ``easyvqa.py``) or a JSONL file of
``{image, question, answer, expert}`` rows (see ``jsonl.py``).

Rows are checked where they enter: the JSONL reader checks each line (UTF-8, JSON, fields, image file),
and the trainer checks each row against the policy before training (``Policy.check_example``: the image
decodes and the image processor accepts it, no special token of the tokenizer in the text). A bad row
stops the start-up with a message naming its file:line, or, with ``skip_bad_rows``, is skipped and
reported: it keeps its position in ``DataRows.rows`` (as None) so that the prompt order, which is over
positions, stays the same when a corrected file is used to resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Set

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    image: Optional[str]  # path of the image file (None for a text-only question)
    question: str  # the user's question
    answer: str  # ground truth, compared after rewards.normalize_answer
    expert: str  # one correct expert response: <think>...</think><answer>...</answer>
    origin: str = dataclasses.field(default="", compare=False)  # "file:line" or "easy-vqa <split> question <i>"


class RowError(ValueError):
    """A data row that cannot be used; the message starts with the row's file:line."""


def row_digest(example: Example) -> int:
    """A 63-bit digest of a row's content (the image by file name, so a moved data folder keeps it)."""
    image = os.path.basename(example.image) if example.image else None
    text = json.dumps([image, example.question, example.answer, example.expert])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


@dataclasses.dataclass
class DataRows:
    """The rows of one data source in source order; a row skipped as bad is None in ``rows``."""

    source: str
    rows: List[Optional[Example]]
    bad: Dict[int, str] = dataclasses.field(default_factory=dict)  # position -> "file:line: why", skipped rows

    def good(self) -> List[Example]:
        return [row for row in self.rows if row is not None]

    def skipped(self) -> Set[int]:
        return {position for position, row in enumerate(self.rows) if row is None}

    def reject(self, position: int, why: str, skip: bool) -> None:
        """Skip row ``position`` (``skip``) or raise RowError saying why and what to do."""
        if not skip:
            raise RowError(
                f"{why}; fix the row (--resume accepts a corrected file) or skip bad rows with --skip-bad-rows"
            )
        self.rows[position] = None
        self.bad[position] = why

    def check(self, check_row: Callable[[Example], None], skip: bool) -> None:
        """Run ``check_row`` (raising ValueError / OSError) on every row; a failing row is rejected."""
        for position, row in enumerate(self.rows):
            if row is None:
                continue
            try:
                check_row(row)
            except (ValueError, OSError) as error:
                self.reject(position, f"{row.origin}: {error}", skip)

    def digests(self) -> List[int]:
        """One ``row_digest`` per position (0 for a skipped row): what a resumed run compares."""
        return [row_digest(row) if row is not None else 0 for row in self.rows]


def load_rows(source: str, split: str, limit: int = 0, skip_bad: bool = False) -> DataRows:
    """The rows of ``source`` ("easy-vqa" or a JSONL path); ``split`` picks easy-vqa's train/test.

    ``limit`` > 0 keeps the first ``limit`` rows (in the source's order). A bad JSONL line raises RowError
    naming file:line, or with ``skip_bad`` is kept as a skipped row.
    """
    if limit < 0:
        raise ValueError(f"limit: expected an integer >= 0, got {limit}")
    if source == "easy-vqa":
        from .easyvqa import load_easyvqa

        rows = DataRows(source, list(load_easyvqa(split)))
    else:
        from .jsonl import read_jsonl

        rows = read_jsonl(source, skip_bad)
    if limit:
        rows.rows = rows.rows[:limit]
        rows.bad = {position: why for position, why in rows.bad.items() if position < limit}
    return rows


def load_examples(source: str, split: str, limit: int = 0) -> List[Example]:
    """The examples of ``load_rows`` (raising RowError at the first bad row)."""
    return load_rows(source, split, limit).good()


def load_eval_rows(data: str, eval_data: Optional[str], limit: int = 0, skip_bad: bool = False) -> DataRows:
    """Held-out rows: ``eval_data`` (JSONL) when given, else easy-vqa's test split for easy-vqa data,
    else none. ``limit`` > 0 keeps the first ``limit``."""
    if eval_data:
        return load_rows(eval_data, "test", limit, skip_bad)
    if data == "easy-vqa":
        return load_rows("easy-vqa", "test", limit, skip_bad)
    return DataRows("", [])


def load_eval_examples(data: str, eval_data: Optional[str], limit: int = 0) -> List[Example]:
    return load_eval_rows(data, eval_data, limit).good()


def changed_rows(saved: Iterable[int], current: Iterable[int]) -> List[int]:
    """Positions whose digests differ between a run's saved data and the data now (same length)."""
    return [position for position, (old, new) in enumerate(zip(saved, current)) if old != new]


class PromptSampler:
    """Endless shuffled order over ``num_examples`` indices, one fresh permutation per epoch.

    The order depends only on (seed, epoch), so the state to checkpoint is two integers and a
    resumed run draws exactly the prompts an uninterrupted run would have drawn. Indices in ``skipped``
    (bad rows) are passed over where they come up, so the other rows keep their places in the order.
    """

    def __init__(self, num_examples: int, seed: int, skipped: Iterable[int] = ()):
        if num_examples <= 0:
            raise ValueError(f"num_examples: expected at least one example, got {num_examples}")
        self.skipped = frozenset(skipped)
        if len(self.skipped) >= num_examples:
            raise ValueError(f"num_examples: every one of the {num_examples} rows is skipped as bad")
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def next_indices(self, count: int) -> List[int]:
        """The next ``count`` example indices (crossing into a new epoch when one runs out)."""
        out: List[int] = []
        while len(out) < count:
            if self.position == self.num_examples:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.num_examples - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take] if int(i) not in self.skipped)
            self.position += take
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"num_examples": self.num_examples, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["num_examples"] != self.num_examples:
            raise ValueError(
                f"sampler state: saved for {state['num_examples']} examples, this dataset has {self.num_examples}"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
