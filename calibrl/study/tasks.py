"""The study's task: compositional colour + shape questions on easy-vqa images, with an out-of-domain split.

Every easy-vqa image shows one shape (3 kinds) in one colour (8 kinds): 24 combinations. Six of them
(``HELD_OUT``: two per shape, each colour at most once) never appear in training; their test images form the
out-of-domain (OOD) evaluation, where the right answer is a colour-shape pair the model has never been shown.

- warm start (``warmstart.jsonl``): the even-id training images of the 18 in-domain combinations, every
  easy-vqa question about them plus the compositional question, with ANSWER-ONLY targets
  (``<think></think><answer>red circle</answer>``): language, vision and the answer format, but none of the
  expert traces;
- RL (``rl.jsonl``): the odd-id in-domain training images (disjoint from the warm start), the compositional
  question only, each with an expert trace ``<think>i see a red circle.</think><answer>red circle</answer>``;
- expert traces on the warm start's images (``warmstart_traces.jsonl``): the even-id images' compositional
  question with the expert-trace target; the second study's short primer on them puts the expert's
  reasoning within the policy's reach without showing it any RL image;
- evaluation: the compositional question on the test images, in-domain (``eval_id.jsonl``) and OOD
  (``eval_ood.jsonl``).
The answer space of the compositional question is 24 pairs (chance 1/24), so accuracy is far from saturated.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from ..data import Example
from ..data.easyvqa import COLORS, SHAPES, easyvqa_images
from ..rewards import normalize_answer, strict_answer

HELD_OUT = (
    ("circle", "red"),
    ("circle", "teal"),
    ("rectangle", "blue"),
    ("rectangle", "yellow"),
    ("triangle", "green"),
    ("triangle", "brown"),
)  # (shape, colour) pairs never trained on
QUESTIONS = (
    "what color and shape is the object?",
    "which shape of which color is in the image?",
    "name the color and the shape.",
)  # one phrasing per image, by image id


def answer_only(answer: str) -> str:
    """The warm start's target: the format with an empty reasoning part."""
    return f"<think></think><answer>{answer}</answer>"


def compositional(image) -> Example:
    """The two-attribute question about one image, with its expert trace."""
    answer = f"{image.color} {image.shape}"
    expert = f"<think>i see a {image.color} {image.shape}.</think><answer>{answer}</answer>"
    return Example(image.path, QUESTIONS[image.image_id % len(QUESTIONS)], answer, expert)


def study_splits() -> Dict[str, List[Example]]:
    """The four example lists described in the module docstring."""
    held_out = set(HELD_OUT)
    train = [im for im in easyvqa_images("train") if (im.shape, im.color) not in held_out]
    warm, rl = [im for im in train if im.image_id % 2 == 0], [im for im in train if im.image_id % 2 == 1]
    warm_examples = []
    for image in warm:
        for example in image.examples + (compositional(image),):
            warm_examples.append(Example(example.image, example.question, example.answer, answer_only(example.answer)))
    test = easyvqa_images("test")
    return {
        "warmstart": warm_examples,
        "warmstart_traces": [compositional(im) for im in warm],
        "rl": [compositional(im) for im in rl],
        "eval_id": [compositional(im) for im in test if (im.shape, im.color) not in held_out],
        "eval_ood": [compositional(im) for im in test if (im.shape, im.color) in held_out],
    }


def write_splits(folder: str) -> Dict[str, str]:
    """Writes ``<name>.jsonl`` for each split into ``folder`` (unchanged files are left as they are)."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, examples in study_splits().items():
        path = os.path.join(folder, f"{name}.jsonl")
        text = "".join(
            json.dumps({"image": e.image, "question": e.question, "answer": e.answer, "expert": e.expert}) + "\n"
            for e in examples
        )
        if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        paths[name] = path
    return paths


def attribute_scores(response: str, truth: str) -> Dict[str, float]:
    """Colour and shape scored separately (the trainer's ``--eval-metrics``; logged as eval_color /
    eval_shape and their sampled twins): 1 when the answer (read like the strict reward: the single answer
    block of a well-formed response) names exactly one colour and it is the truth's, likewise the shape.
    The pair itself is the accuracy. On held-out pairs these rank policies even where every pair answer
    is wrong (RL on the 18 trained pairs takes probability away from the 6 never rewarded)."""
    answer = strict_answer(response)
    words = normalize_answer(answer).split() if answer is not None else []
    truth_words = normalize_answer(truth).split()
    scores = {}
    for name, vocabulary in (("color", COLORS), ("shape", SHAPES)):
        named = [w for w in words if w in vocabulary]
        expected = [w for w in truth_words if w in vocabulary]
        scores[name] = float(len(named) == 1 and named == expected)
    return scores
