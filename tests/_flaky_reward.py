"""A verifier with bugs, for the reward-fault test: it raises on every 10th call (the 3rd, 13th, ...) and
returns NaN on every 10th call after that (the 7th, 17th, ...); otherwise it is the real verifier."""

from calibrl.rewards import score_response

CALLS = [0]  # calls so far (a list so the test can read and reset it)


def expected_errors(calls: int) -> int:
    return sum(1 for i in range(1, calls + 1) if i % 10 in (3, 7))


def score(response, truth):
    CALLS[0] += 1
    if CALLS[0] % 10 == 3:
        raise ValueError(f"verifier bug on call {CALLS[0]}")
    if CALLS[0] % 10 == 7:
        return float("nan")
    return score_response(response, truth)
