"""JSONL {image, question, answer, expert} -> the parquet layout verl's RLHFDataset reads.

    python examples/verl/prepare_data.py train.jsonl ~/data/calibrl/train.parquet

Each row becomes: prompt (chat messages with an <image> placeholder), images ([{"image": path}]),
reward_model.ground_truth (the answer), extra_info.expert (the expert completion that the
`calibrl_expert_agent` agent loop emits as the group's expert row), data_source.
"""

import json
import sys

import pandas as pd

INSTRUCTION = "Think inside <think></think>, then give the final answer inside <answer></answer>."


def convert(jsonl_path: str, parquet_path: str, data_source: str = "calibrl") -> int:
    rows = []
    with open(jsonl_path) as f:
        for line_number, line in enumerate(f, 1):
            record = json.loads(line)
            for key in ("image", "question", "answer", "expert"):
                if key not in record:
                    raise ValueError(f"{jsonl_path}:{line_number}: missing field {key!r}")
            rows.append(
                {
                    "data_source": data_source,
                    "prompt": [{"role": "user", "content": f"<image>{record['question']}\n{INSTRUCTION}"}],
                    "images": [{"image": record["image"]}],
                    "reward_model": {"style": "rule", "ground_truth": record["answer"]},
                    "extra_info": {"index": line_number - 1, "expert": record["expert"]},
                }
            )
    pd.DataFrame(rows).to_parquet(parquet_path)
    return len(rows)


if __name__ == "__main__":
    print(f"wrote {convert(sys.argv[1], sys.argv[2])} rows to {sys.argv[2]}")
