"""Entry point of the slim trainer: ``python -m calibrl.train``.

The trainer is being built (issue: the slim hybrid-policy RL trainer). Until it lands this module
states what the default run will do and exits with status 2, so nothing pretends to train.
"""

import sys

PLAN = """calibrl.train (not yet implemented)
The default run will: build a tiny Qwen2-VL-architecture model offline, load easy-vqa's shipped
images and questions, warm-start on expert traces, then run CalibRL RL updates on CPU
(n on-policy rollouts + 1 expert per prompt), logging metrics, plots and checkpoints."""


def main() -> int:
    print(PLAN, file=sys.stderr)
    print("error: the trainer is not implemented yet; see the open trainer issue.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
