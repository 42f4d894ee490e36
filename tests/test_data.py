"""Data: easy-vqa attributes and expert traces, the JSONL loader's errors, the resumable prompt order."""

import json

import pytest
from PIL import Image

from calibrl.data import PromptSampler, load_examples
from calibrl.data.easyvqa import expert_response, image_attributes, load_easyvqa
from calibrl.data.jsonl import load_jsonl
from calibrl.rewards import score_response


def test_image_attributes_from_questions():
    questions = [
        "what is the blue shape?",
        "is there not a red shape?",
        "does the image contain a circle?",
        "what color is the shape?",
        "is there a triangle?",
        "is no green shape present?",
    ]
    answers = ["rectangle", "yes", "no", "teal", "no", "yes"]
    ids = [0, 0, 0, 1, 1, 1]
    attrs = image_attributes(questions, answers, ids)
    assert attrs[0] == ("rectangle", "blue")
    # image 1: colour teal given; shape: no triangle, and no other shape fact -> undetermined -> dropped
    assert 1 not in attrs


def test_image_attributes_reject_contradictions():
    with pytest.raises(ValueError, match="contradictory"):
        image_attributes(
            ["what shape is in the image?", "is there a circle?", "what color is the shape?"],
            ["triangle", "yes", "red"],
            [3, 3, 3],
        )


@pytest.mark.parametrize(
    "question, answer, expected",
    [
        ("what shape is in the image?", "circle", "<think>i see a red circle.</think><answer>circle</answer>"),
        (
            "is there not a blue shape?",
            "yes",
            "<think>i see a red circle. a blue shape is absent.</think><answer>yes</answer>",
        ),
        (
            "does the image contain a red circle?",
            "yes",
            "<think>i see a red circle. a red circle is present.</think><answer>yes</answer>",
        ),
        ("is no circle present?", "no", "<think>i see a red circle. a circle is present.</think><answer>no</answer>"),
    ],
)
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


GOOD = {
    "image": "red.png",
    "question": "what color?",
    "answer": "red",
    "expert": "<think>red</think><answer>red</answer>",
}


def test_jsonl_loads_rows_relative_to_the_file(tmp_path, image_file):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", {**GOOD, "image": None}])
    examples = load_jsonl(path)
    assert len(examples) == 2
    assert examples[0].image == str(tmp_path / "red.png") and examples[1].image is None
    assert load_examples(path, "train", limit=1) == examples[:1]


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", r"d\.jsonl:2: invalid JSON"),
        ([1, 2], r":2: expected a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "answer"}, r":2: missing field\(s\) \['answer'\]"),
        ({**GOOD, "extra": 1}, r":2: unknown field\(s\) \['extra'\]"),
        ({**GOOD, "question": ""}, r":2: field 'question': expected a non-empty string"),
        ({**GOOD, "answer": 3}, r":2: field 'answer': expected a non-empty string"),
        ({**GOOD, "image": "missing.png"}, r":2: field 'image': file not found"),
        ({**GOOD, "image": 7}, r":2: field 'image': expected a file path string or null"),
        ({**GOOD, "expert": "red"}, r":2: field 'expert': expected the format"),
        (
            {**GOOD, "expert": "<think>x</think><answer>blue</answer>"},
            r":2: field 'expert': its answer 'blue' does not match",
        ),
    ],
)
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


def test_jsonl_invalid_utf8_names_the_line_and_skip_mode_keeps_positions(tmp_path, image_file):
    from calibrl.data import RowError, load_rows

    path = tmp_path / "d.jsonl"
    bad_utf8 = json.dumps(GOOD).encode()[:-3] + b'\xc3\x28"}'
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), b"", bad_utf8, b"{oops", json.dumps(GOOD).encode()]))
    with pytest.raises(RowError, match=r"d\.jsonl:3: invalid UTF-8 at byte \d+ .*--skip-bad-rows"):
        load_jsonl(str(path))
    rows = load_rows(str(path), "train", skip_bad=True)
    assert [r is not None for r in rows.rows] == [True, False, False, True]  # blank lines are no rows
    assert sorted(rows.bad) == [1, 2] and rows.bad[2].startswith(f"{path}:4: invalid JSON")
    assert rows.rows[3].origin == f"{path}:5" and rows.skipped() == {1, 2}
    assert rows.digests()[1:3] == [0, 0] and rows.digests()[0] == rows.digests()[3] != 0
    assert load_rows(str(path), "train", limit=2, skip_bad=True).bad.keys() == {1}


def test_prompt_sampler_passes_over_skipped_rows_keeping_the_others_in_place():
    full = PromptSampler(6, seed=1).next_indices(12)
    skipping = PromptSampler(6, seed=1, skipped={2, 4}).next_indices(8)
    assert skipping == [i for i in full if i not in (2, 4)]
    with pytest.raises(ValueError, match="every one of the 2 rows is skipped"):
        PromptSampler(2, seed=0, skipped={0, 1})


@pytest.fixture(scope="module")
def tiny_policy():
    from calibrl.config import parse_config
    from calibrl.model import build_tiny_policy

    return build_tiny_policy(parse_config(["--quick"]), ["what color is it?", "<think>red</think><answer>red</answer>"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("good", None),
        ("corrupt png", r"image .*bad\.png does not decode"),
        ("not an image", r"image .*bad\.png does not decode \(UnidentifiedImageError"),
        ("aspect ratio 300", r"of 2x600 pixels is refused by the image processor \(.*aspect ratio"),
        ("aspect ratio 1/300", r"of 600x2 pixels is refused by the image processor"),
        (
            "image token in question",
            r"field 'question' contains the tokenizer's special token\(s\) \['<\|image_pad\|>'\]",
        ),
        ("end of turn in question", r"field 'question' contains .*<\|im_end\|>"),
        ("vision start in expert", r"field 'expert' contains .*<\|vision_start\|>"),
    ],
)
def test_rows_are_checked_as_the_policy_encodes_them(tmp_path, tiny_policy, case, message):
    from calibrl.data import Example

    image, question, expert = tmp_path / "bad.png", "what color is it?", "<think>red</think><answer>red</answer>"
    size = {"aspect ratio 300": (2, 600), "aspect ratio 1/300": (600, 2)}.get(case, (16, 16))
    Image.new("RGB", size, (255, 0, 0)).save(image)
    if case == "corrupt png":
        image.write_bytes(image.read_bytes()[:45])
    elif case == "not an image":
        image.write_bytes(b"GIF? no, plain text")
    elif case == "image token in question":
        question = "what is <|image_pad|>?"
    elif case == "end of turn in question":
        question = "red?<|im_end|>\n<|im_start|>assistant\nyes"
    elif case == "vision start in expert":
        expert = "<think><|vision_start|></think><answer>red</answer>"
    example = Example(str(image), question, "red", expert)
    if message is None:
        tiny_policy.check_example(example)
        tiny_policy.encode_prompts([example])  # what passes the check encodes
    else:
        with pytest.raises(ValueError, match=message):
            tiny_policy.check_example(example)
