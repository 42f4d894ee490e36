"""Data: easy-vqa attributes and expert traces, the JSONL loader's errors, the resumable prompt order."""

import json

import pytest
from PIL import Image

from calibrl.data import PromptSampler, load_examples
from calibrl.data.easyvqa import expert_response, image_attributes, load_easyvqa
from calibrl.data.jsonl import load_jsonl
from calibrl.rewards import score_response


def test_image_attributes_from_questions():
    questions = ["what is the blue shape?", "is there not a red shape?", "does the image contain a circle?",
                 "what color is the shape?", "is there a triangle?", "is no green shape present?"]
    answers = ["rectangle", "yes", "no", "teal", "no", "yes"]
    ids = [0, 0, 0, 1, 1, 1]
    attrs = image_attributes(questions, answers, ids)
    assert attrs[0] == ("rectangle", "blue")
    # image 1: colour teal given; shape: no triangle, and no other shape fact -> undetermined -> dropped
    assert 1 not in attrs


def test_image_attributes_reject_contradictions():
    with pytest.raises(ValueError, match="contradictory"):
        image_attributes(["what shape is in the image?", "is there a circle?", "what color is the shape?"],
                         ["triangle", "yes", "red"], [3, 3, 3])


@pytest.mark.parametrize("question, answer, expected", [
    ("what shape is in the image?", "circle", "<think>i see a red circle.</think><answer>circle</answer>"),
    ("is there not a blue shape?", "yes", "<think>i see a red circle. a blue shape is absent.</think><answer>yes</answer>"),
    ("does the image contain a red circle?", "yes", "<think>i see a red circle. a red circle is present.</think><answer>yes</answer>"),
    ("is no circle present?", "no", "<think>i see a red circle. a circle is present.</think><answer>no</answer>"),
])
def test_expert_response(question, answer, expected):
    assert expert_response(question, answer, "circle", "red") == expected


def test_easyvqa_examples_have_correct_experts():
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install easy-vqa)")
    examples = load_easyvqa("test")
    assert len(examples) > 8000  # ~11% of questions are about images whose colour no question pins down
    for example in examples[:: len(examples) // 200]:
        assert score_response(example.expert, example.answer).reward == pytest.approx(1.1)
        assert example.image.endswith(".png")
    # yes/no experts state presence consistently with the answer and the question's negation
    for example in examples[:500]:
        if example.answer in ("yes", "no"):
            negated = " not " in example.question or example.question.startswith("is no ")
            assert ("is present" in example.expert) == ((example.answer == "yes") != negated)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def image_file(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    return "red.png"


GOOD = {"image": "red.png", "question": "what color?", "answer": "red", "expert": "<think>red</think><answer>red</answer>"}


def test_jsonl_loads_rows_relative_to_the_file(tmp_path, image_file):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {**GOOD, "image": None}])
    examples = load_jsonl(path)
    assert len(examples) == 2
    assert examples[0].image == str(tmp_path / "red.png") and examples[1].image is None
    assert load_examples(path, "train", limit=1) == examples[:1]


@pytest.mark.parametrize("row, message", [
    ("{not json", r"d\.jsonl:2: invalid JSON"),
    ([1, 2], r":2: expected a JSON object"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, r":2: missing field\(s\) \['answer'\]"),
    ({**GOOD, "extra": 1}, r":2: unknown field\(s\) \['extra'\]"),
    ({**GOOD, "question": ""}, r":2: field 'question': expected a non-empty string"),
    ({**GOOD, "answer": 3}, r":2: field 'answer': expected a non-empty string"),
    ({**GOOD, "image": "missing.png"}, r":2: field 'image': file not found"),
    ({**GOOD, "image": 7}, r":2: field 'image': expected a file path string or null"),
    ({**GOOD, "expert": "red"}, r":2: field 'expert': expected the format"),
    ({**GOOD, "expert": "<think>x</think><answer>blue</answer>"}, r":2: field 'expert': its answer 'blue' does not match"),
])
def test_jsonl_errors_name_line_and_field(tmp_path, image_file, row, message):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_jsonl(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(str(tmp_path / "empty.jsonl"))


def test_prompt_sampler_epochs_and_resume():
    sampler = PromptSampler(5, seed=3)
    first = sampler.next_indices(4)
    state = sampler.state_dict()
    rest = sampler.next_indices(7)  # crosses into epochs 1 and 2
    assert sorted(first + rest[:1]) == list(range(5))  # epoch 0 is a permutation
    assert sorted(rest[1:6]) == list(range(5))  # so is epoch 1
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_indices(7) == rest
    assert PromptSampler(5, seed=4).next_indices(5) != PromptSampler(5, seed=3).next_indices(5)
    with pytest.raises(ValueError, match="saved for 5 examples"):
        PromptSampler(6, seed=3).load_state_dict(state)
