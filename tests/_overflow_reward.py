"""A verifier whose rewards are finite float32 numbers (3e38) that overflow once summed: the group mean
becomes inf, the advantages NaN and the loss NaN. ``POISON[0] = False`` turns it into the real verifier."""

from calibrl.rewards import score_response

POISON = [True]


def score(response, truth):
    return 3e38 if POISON[0] else score_response(response, truth)
