"""Training data: examples, dataset loading and the resumable prompt order.

An ``Example`` is one question about one image with its ground-truth answer and one expert
trajectory (a short correct ``<think>...</think><answer>...</answer>`` response). Sources:
``easy-vqa`` (the package's real images and questions, see ``easyvqa.py``) or a JSONL file of
``{image, question, answer, expert}`` rows (see ``jsonl.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    image: Optional[str]  # path of the image file (None for a text-only question)
    question: str  # the user's question
    answer: str  # ground truth, compared after rewards.normalize_answer
    expert: str  # one correct expert response: <think>...</think><answer>...</answer>


def load_examples(source: str, split: str, limit: int = 0) -> List[Example]:
    """Examples of ``source`` ("easy-vqa" or a JSONL path); ``split`` picks easy-vqa's train/test.

    ``limit`` > 0 keeps the first ``limit`` examples (in the source's order).
    """
    if source == "easy-vqa":
        from .easyvqa import load_easyvqa

        examples = load_easyvqa(split)
    else:
        from .jsonl import load_jsonl

        examples = load_jsonl(source)
    if limit < 0:
        raise ValueError(f"limit: expected an integer >= 0, got {limit}")
    return examples[:limit] if limit else examples


def load_eval_examples(data: str, eval_data: Optional[str], limit: int = 0) -> List[Example]:
    """Held-out examples: ``eval_data`` (JSONL) when given, else easy-vqa's test split for easy-vqa data,
    else none. ``limit`` > 0 keeps the first ``limit``."""
    if eval_data:
        return load_examples(eval_data, "test", limit)
    if data == "easy-vqa":
        return load_examples("easy-vqa", "test", limit)
    return []


class PromptSampler:
    """Endless shuffled order over ``num_examples`` indices, one fresh permutation per epoch.

    The order depends only on (seed, epoch), so the state to checkpoint is two integers and a
    resumed run draws exactly the prompts an uninterrupted run would have drawn.
    """

    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError(f"num_examples: expected at least one example, got {num_examples}")
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
            out.extend(int(i) for i in self._order[self.position:self.position + take])
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
