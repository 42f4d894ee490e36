"""A verifier with bugs, for the reward-fault test. Call k raises when k % 10 == 3, returns the text "1.1" when 5
(text is never parsed), NaN when 7 and 1e39 (finite in Python, inf in float32) when 9; otherwise it is the real
verifier."""

from calibrl.rewards import score_response

CALLS = [0]  # calls so far (a list so the test can read and reset it)
FAULTS = {3: ValueError, 5: "1.1", 7: float("nan"), 9: 1e39}  # call number % 10 -> what the verifier does


def expected_errors(calls: int) -> int:
    return sum(1 for i in range(1, calls + 1) if i % 10 in FAULTS)


def score(response, truth):
    CALLS[0] += 1
    fault = FAULTS.get(CALLS[0] % 10)
    if fault is ValueError:
        raise ValueError(f"verifier bug on call {CALLS[0]}")
    return score_response(response, truth) if fault is None else fault
