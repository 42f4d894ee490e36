"""Bring your own data: a JSONL file with one ``{image, question, answer, expert}`` object per line.

- ``image``: path of the image file, absolute or relative to the JSONL file's folder, or null for a
  text-only question;
- ``question``: the prompt text; ``answer``: the ground truth the verifier compares against;
- ``expert``: one correct response in the ``<think>...</think><answer>...</answer>`` format.
Blank lines are skipped. Every problem (invalid UTF-8 or JSON included) raises ``RowError`` naming the
file, the line and the field, or under ``skip_bad`` the row is kept as a skipped row (see ``DataRows``).
"""

from __future__ import annotations

import json
import os
from typing import List

from ..rewards import extract_answer, format_reward, normalize_answer
from . import DataRows, Example, RowError

FIELDS = ("image", "question", "answer", "expert")


def _fail(path: str, line_no: int, message: str) -> None:
    raise RowError(f"{path}:{line_no}: {message}")


def parse_row(row: object, path: str, line_no: int) -> Example:
    """One decoded JSON value -> Example, with errors that name the line and the field."""
    if not isinstance(row, dict):
        _fail(path, line_no, f"expected a JSON object with fields {FIELDS}, got {type(row).__name__}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        _fail(path, line_no, f"missing field(s) {missing}; every row needs {FIELDS}")
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        _fail(path, line_no, f"unknown field(s) {unknown}; allowed: {FIELDS}")
    for field in ("question", "answer", "expert"):
        value = row[field]
        if not isinstance(value, str) or not value.strip():
            _fail(path, line_no, f"field '{field}': expected a non-empty string, got {value!r}")
    image = row["image"]
    if image is not None:
        if not isinstance(image, str) or not image:
            _fail(path, line_no, f"field 'image': expected a file path string or null, got {image!r}")
        image = image if os.path.isabs(image) else os.path.join(os.path.dirname(os.path.abspath(path)), image)
        if not os.path.isfile(image):
            _fail(path, line_no, f"field 'image': file not found: {image}")
    expert = row["expert"]
    if not format_reward(expert):
        _fail(
            path,
            line_no,
            f"field 'expert': expected the format <think>...</think><answer>...</answer>, got {expert[:80]!r}",
        )
    expert_answer = extract_answer(expert)
    if normalize_answer(expert_answer) != normalize_answer(row["answer"]):
        _fail(
            path,
            line_no,
            f"field 'expert': its answer {expert_answer!r} does not match field 'answer' "
            f"{row['answer']!r} (experts must be correct)",
        )
    return Example(image, row["question"], row["answer"], expert, origin=f"{path}:{line_no}")


def parse_line(raw: bytes, path: str, line_no: int) -> Example:
    """One line of the file (bytes) -> Example; RowError naming the line for bad UTF-8, JSON or fields."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_bytes = raw[error.start : error.start + 4]
        _fail(path, line_no, f"invalid UTF-8 at byte {error.start + 1} of the line ({bad_bytes!r})")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        _fail(path, line_no, f"invalid JSON ({error.msg} at column {error.colno})")
    return parse_row(row, path, line_no)


def read_jsonl(path: str, skip_bad: bool = False) -> DataRows:
    """The rows of a JSONL file (blank lines are no rows); RowError on the first bad line unless ``skip_bad``."""
    if not os.path.isfile(path):
        raise RowError(f"JSONL file not found: {path}")
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    rows = DataRows(path, [])
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        rows.rows.append(None)
        try:
            rows.rows[-1] = parse_line(raw, path, line_no)
        except RowError as error:
            rows.reject(len(rows.rows) - 1, str(error), skip_bad)
    if not rows.rows:
        raise RowError(f"{path}: no examples (the file is empty)")
    return rows


def load_jsonl(path: str) -> List[Example]:
    """All examples of a JSONL file; raises RowError (a ValueError) on the first bad line."""
    return read_jsonl(path).good()
