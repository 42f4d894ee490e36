"""docs/method.md's formulas written a second time, in plain Python floats, one token at a time.

Deliberately naive (loops, the math module, no torch) so that it shares no code with
calibrl_kernels.reference: tests compare the two to 1e-10 in float64.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

from calibrl_kernels import CalibRLConfig


def group_stats(
    scores: Sequence[float],
    group_ids: Sequence[int],
    is_expert: Sequence[bool],
    norm_by_std: bool = False,
    eps: float = 1e-6,
    pass_threshold: float = 0.1,
) -> Dict:
    rows_of: Dict[int, List[int]] = {}
    for i, g in enumerate(group_ids):
        rows_of.setdefault(g, []).append(i)
    advantages = [0.0] * len(scores)
    mean, std, pass_rate, count = {}, {}, {}, {}
    for g, rows in rows_of.items():
        on = [i for i in rows if not is_expert[i]]
        values = [scores[i] for i in on]
        if len(values) == 1:
            mu, sigma = 0.0, 1.0
        else:
            mu = sum(values) / len(values)
            sigma = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
        mean[g], std[g], count[g] = mu, sigma, len(values)
        pass_rate[g] = sum(1 for i in on if scores[i] > pass_threshold) / len(values)
        for i in rows:
            advantages[i] = (scores[i] - mu) / (sigma + eps) if norm_by_std else scores[i] - mu
    passed = [s > pass_threshold for s in scores]
    return dict(advantages=advantages, passed=passed, mean=mean, std=std, pass_rate=pass_rate, count=count)


def activation(z: float, cfg: CalibRLConfig) -> float:
    if cfg.activation == "leaky_relu":
        return z if z > 0 else cfg.negative_slope * z
    if cfg.activation == "relu":
        return max(z, 0.0)
    if cfg.activation == "tanh":
        return math.tanh(z)
    if cfg.activation == "sigmoid":
        return 1.0 / (1.0 + math.exp(-z))
    if cfg.activation == "huber":
        d = cfg.huber_delta
        return 0.5 * z * z if abs(z) <= d else d * (abs(z) - 0.5 * d)
    raise ValueError(cfg.activation)


def ppo_term(lp: float, old: float, a: float, cfg: CalibRLConfig) -> float:
    rho = math.exp(max(-20.0, min(20.0, lp - old)))
    l1 = -a * rho
    l2 = -a * min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
    lc = max(l1, l2)
    return min(lc, -cfg.dual_clip_c * a) if a < 0 and cfg.dual_clip_c is not None else lc


def aggregate(values: List[List[float]], mask: List[List[float]], cfg: CalibRLConfig) -> float:
    mode = cfg.loss_agg_mode
    if mode == "token-mean":
        num = sum(v * m for vr, mr in zip(values, mask) for v, m in zip(vr, mr))
        den = sum(m for mr in mask for m in mr)
        return num / (den + 1e-8)
    row_sums, row_lens = [], []
    for vr, mr in zip(values, mask):
        row_sums.append(sum(v * m for v, m in zip(vr, mr)))
        row_lens.append(sum(mr))
    rows = [i for i, n in enumerate(row_lens) if n > 0]
    if not rows:
        return 0.0
    if mode == "seq-mean-token-mean":
        return sum(row_sums[i] / (row_lens[i] + 1e-8) for i in rows) / len(rows)
    total = sum(row_sums[i] for i in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return total
    horizon = cfg.loss_scale_factor if cfg.loss_scale_factor is not None else len(mask[0])
    return total / horizon


def loss(
    lp, old, adv, mask, cfg: CalibRLConfig, *, b=None, passed=None, is_expert=None, entropy=None, expert_mask=None
) -> Dict[str, float]:
    """All LossOutput fields; lp/old/mask/b/entropy/expert_mask are lists of rows; adv per row."""
    B, T = len(lp), len(lp[0])
    is_expert = is_expert or [False] * B
    keeps_expert = cfg.mode in ("luffy", "rlplus")
    pg, guide, loss_mask, guide_mask, on_mask = [], [], [], [], []
    for i in range(B):
        pg_row, guide_row = [], []
        for t in range(T):
            a = adv[i]
            if is_expert[i] and cfg.mode == "luffy":
                p = math.exp(lp[i][t])
                pg_row.append(-a * p / (p + 0.1))
            elif is_expert[i] and cfg.mode == "rlplus":
                p, p_old = math.exp(lp[i][t]), math.exp(old[i][t])
                pg_row.append(-a * 2 * p / (1.5 * p_old + 0.5) * max(1 - p, 0.0) ** 0.5)
            else:
                pg_row.append(ppo_term(lp[i][t], old[i][t], a, cfg))
            if cfg.mode == "calibrl" and cfg.activation != "none":
                s = 1.0 if passed[i] else -1.0
                z = -s * (lp[i][t] - b[i][t])
                w = abs(a) if cfg.weight_by_advantage else 1.0
                guide_row.append(w * activation(z, cfg))
            else:
                guide_row.append(0.0)
        pg.append(pg_row)
        guide.append(guide_row)
        on_row = [0.0 if is_expert[i] else m for m in mask[i]]
        on_mask.append(on_row)
        loss_mask.append(list(mask[i]) if keeps_expert else on_row)
        if cfg.mask_beyond_expert and expert_mask is not None:
            guide_mask.append([m * (1.0 if e else 0.0) for m, e in zip(on_row, expert_mask[i])])
        else:
            guide_mask.append(on_row)
    pg_loss = aggregate(pg, loss_mask, cfg)
    guide_loss = aggregate(guide, guide_mask, cfg) if cfg.mode == "calibrl" and cfg.activation != "none" else 0.0
    total = pg_loss + cfg.guide_coef * guide_loss
    if entropy is not None:
        total -= cfg.entropy_coef * aggregate(entropy, loss_mask, cfg)
        num = sum(h * m for hr, mr in zip(entropy, on_mask) for h, m in zip(hr, mr))
        ent_metric = num / (sum(m for mr in on_mask for m in mr) + 1e-8)
    else:
        ent_metric = float("nan")

    def metric_mean(flag) -> float:
        num = den = 0.0
        for i in range(B):
            for t in range(T):
                num += flag(i, t) * mask[i][t]
                den += mask[i][t]
        return num / (den + 1e-8)

    def clip_flags(i, t):
        a = adv[i]
        rho = math.exp(max(-20.0, min(20.0, lp[i][t] - old[i][t])))
        l1, l2 = -a * rho, -a * min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
        lc = max(l1, l2)
        return float(l2 > l1), float(cfg.dual_clip_c is not None and lc > -cfg.dual_clip_c * a and a < 0)

    return dict(
        loss=total,
        pg_loss=pg_loss,
        guide_loss=guide_loss,
        entropy=ent_metric,
        clipfrac=metric_mean(lambda i, t: clip_flags(i, t)[0]),
        clipfrac_lower=metric_mean(lambda i, t: clip_flags(i, t)[1]),
        ppo_kl=metric_mean(lambda i, t: old[i][t] - lp[i][t]),
    )


def token_logprob(logits: Sequence[float], target: int, temperature: float = 1.0):
    z = [x / temperature for x in logits]
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    p = [math.exp(x - lse) for x in z]
    return z[target] - lse, lse - sum(pj * zj for pj, zj in zip(p, z))


def position_baseline(old: List[List[float]], mask: List[List[float]], group_ids, is_expert) -> List[List[float]]:
    expert_of = {g: i for i, g in enumerate(group_ids) if is_expert[i]}
    out = []
    for i, g in enumerate(group_ids):
        e = expert_of[g]
        out.append([old[e][t] if mask[e][t] else 0.0 for t in range(len(old[e]))])
    return out


def sequence_mean_baseline(old, mask, group_ids, is_expert):
    expert_of = {g: i for i, g in enumerate(group_ids) if is_expert[i]}
    out = []
    for i, g in enumerate(group_ids):
        e = expert_of[g]
        vals = [old[e][t] for t in range(len(old[e])) if mask[e][t]]
        mean = sum(vals) / max(len(vals), 1)
        out.append([mean] * len(old[e]))
    return out
