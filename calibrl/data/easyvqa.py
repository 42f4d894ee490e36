"""easy-vqa: 64x64 PNG images of one coloured shape, with shape / colour / yes-no questions.

The package ships its images and questions (4,000 train / 1,000 test images); nothing is
downloaded. Each image shows exactly one shape in one colour; neither is stored directly, so
``image_attributes`` derives both from the image's questions and answers, and ``expert_response``
writes a short correct reasoning trace from them: what the image shows, then (for yes/no
questions) whether the asked-about shape or colour is present, then the answer.
"""

from __future__ import annotations

import functools
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from . import Example

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
_WORD = re.compile(r"[a-z]+")


def _negated(question: str) -> bool:
    """'is there NOT a ...', 'does the image NOT contain ...', 'is NO ... present'."""
    words = set(_WORD.findall(question))
    return "not" in words or "no" in words


def _mentioned(question: str) -> Tuple[Optional[str], Optional[str]]:
    """The (shape, colour) words a question names, None for each it does not name."""
    words = _WORD.findall(question)
    shape = next((w for w in words if w in SHAPES), None)
    color = next((w for w in words if w in COLORS), None)
    return shape, color


def _facts(question: str, answer: str) -> Iterable[Tuple[str, str, bool]]:
    """(kind, value, present) facts one question/answer pair states about its image."""
    shape, color = _mentioned(question)
    if answer in ("yes", "no"):
        present = (answer == "yes") != _negated(question)
        for kind, value in (("shape", shape), ("color", color)):
            if value is not None:
                yield kind, value, present
        return
    if answer in SHAPES:
        yield "shape", answer, True
    elif answer in COLORS:
        yield "color", answer, True
    else:
        raise ValueError(f"easy-vqa: unexpected answer {answer!r} to {question!r}")
    # "what is the blue shape?" -> rectangle also says the colour; "what color is the circle?" the shape
    for kind, value in (("shape", shape), ("color", color)):
        if value is not None:
            yield kind, value, True


def _resolve(image_id: int, kind: str, present: set, absent: set, choices: Tuple[str, ...]) -> str:
    if len(present) > 1 or present & absent:
        raise ValueError(f"easy-vqa image {image_id}: contradictory {kind} facts (present {present}, absent {absent})")
    if present:
        return next(iter(present))
    remaining = [c for c in choices if c not in absent]
    if len(remaining) != 1:
        raise ValueError(f"easy-vqa image {image_id}: {kind} not determined by its questions (candidates {remaining})")
    return remaining[0]


def image_attributes(questions: List[str], answers: List[str], image_ids: List[int]) -> Dict[int, Tuple[str, str]]:
    """{image id: (shape, colour)} derived from every question asked about each image.

    An attribute no question pins down is left out (the image's questions are then skipped).
    """
    facts: Dict[int, Dict[str, Tuple[set, set]]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        entry = facts.setdefault(image_id, {"shape": (set(), set()), "color": (set(), set())})
        for kind, value, present in _facts(question, answer):
            entry[kind][0 if present else 1].add(value)
    out: Dict[int, Tuple[str, str]] = {}
    for image_id, entry in facts.items():
        try:
            shape = _resolve(image_id, "shape", *entry["shape"], SHAPES)
            color = _resolve(image_id, "color", *entry["color"], COLORS)
        except ValueError as error:
            if "not determined" in str(error):
                continue
            raise
        out[image_id] = (shape, color)
    return out


def expert_response(question: str, answer: str, shape: str, color: str) -> str:
    """A short correct trace: what the image shows, the fact the question hinges on, the answer."""
    seen = f"i see a {color} {shape}."
    if answer in ("yes", "no"):
        asked_shape, asked_color = _mentioned(question)
        asked = " ".join(w for w in (asked_color, asked_shape or "shape") if w)
        present = (asked_shape in (None, shape)) and (asked_color in (None, color))
        seen += f" a {asked} is {'present' if present else 'absent'}."
    return f"<think>{seen}</think><answer>{answer}</answer>"


def load_easyvqa(split: str) -> List[Example]:
    """The easy-vqa questions of ``split`` ("train" or "test"), each with its image path and expert.

    Questions about the ~10% of images whose colour or shape no question pins down are left out.
    """
    return list(_load_easyvqa(split))


@functools.lru_cache(maxsize=2)
def _split(split: str):
    """(questions, answers, image ids, image paths, {image id: (shape, colour)}) of an easy-vqa split."""
    import easy_vqa

    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    return questions, answers, image_ids, paths, image_attributes(questions, answers, image_ids)


def _examples(split: str) -> Iterable[Tuple[int, Example]]:
    """(image id, Example) of every question of ``split`` about an image with known attributes, in file order."""
    questions, answers, image_ids, paths, attributes = _split(split)
    for number, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if image_id in attributes:
            shape, color = attributes[image_id]
            yield (
                image_id,
                Example(
                    paths[image_id],
                    question,
                    answer,
                    expert_response(question, answer, shape, color),
                    origin=f"easy-vqa {split} question {number}",
                ),
            )


@functools.lru_cache(maxsize=2)
def _load_easyvqa(split: str) -> Tuple[Example, ...]:
    return tuple(example for _, example in _examples(split))


class Image(NamedTuple):
    """One easy-vqa image: its id, file, the shape and colour it shows, and its questions as Examples."""

    image_id: int
    path: str
    shape: str
    color: str
    examples: Tuple[Example, ...]


@functools.lru_cache(maxsize=2)
def easyvqa_images(split: str) -> Tuple[Image, ...]:
    """The images of ``split`` ("train" or "test") whose shape and colour are determined, in id order."""
    _, _, _, paths, attributes = _split(split)
    per_image: Dict[int, List[Example]] = {}
    for image_id, example in _examples(split):
        per_image.setdefault(image_id, []).append(example)
    return tuple(Image(i, paths[i], *attributes[i], tuple(per_image[i])) for i in sorted(per_image))
