"""The study's runs: one warm start per seed, then every algorithm and ablation from it.

A ``Run`` is a name, the section it belongs to (main comparison, activation / slope / baseline ablation),
the label it gets in tables and plots, and the ``python -m calibrl.train`` flags that make it. Runs of
one seed share that seed's warm start (``init_from``), so within a seed every algorithm starts from the
same weights and draws the same prompts in the same order.

Two configurations (``STUDIES``):
- ``v1``: the first study, as it was run (authors' reward parsing, one evaluation sample, lr 5e-5,
  60 RL steps, 3 seeds for everything); its command and results stay reproducible;
- ``v2``: the second study: strict reward format, k = 8 evaluation samples (pass@8, distinct answers),
  per-attribute OOD scores, guide-regime diagnostics, a short primer on expert traces of the warm start's
  images after the answer-only warm start (``primer_steps``), one learning rate for every algorithm, and
  more seeds for the main comparison (``FIVE_SEED_KEYS``) than for the rest.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

MAIN_ALGOS = ("calibrl", "grpo", "sft+grpo", "luffy", "rlplus", "dapo")
# v2's main comparison adds the guide switched off (calibrl's loss without its guide term)
NO_GUIDE = ("none", "main", "none (no guide)", ("--algo", "calibrl", "--activation", "none"))
FIVE_SEED_KEYS = ("calibrl", "grpo", "sft-grpo", "none")  # v2: these take every seed, the rest the first 3
OTHER_SEEDS = 3
# Activation ablation of the guide term (docs/method.md: the paper's Table of average accuracy); leaky_relu 0.5 is
# the calibrl run itself.
ACTIVATIONS = ("relu", "tanh", "sigmoid", "huber", "none")
# Slope ablation of leaky_relu's negative side; 0.5 is the calibrl run and 0 is exactly relu (max(z, 0)), so
# those two rows reuse the calibrl and relu runs instead of recomputing identical losses.
SLOPES = (0.25, 1.0)
SLOPE_ALIASES = {0.0: "act-relu", 0.5: "calibrl"}
BASELINE_VARIANTS = (
    ("baseline-seqmean", "sequence-mean baseline", ("--baseline", "sequence-mean")),
    ("mask-beyond-expert", "mask beyond expert length", ("--mask-beyond-expert",)),
)
SECTIONS = ("main", "activation", "slope", "baseline")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long each run trains and how it is evaluated (the full study and ``--quick`` differ only here)."""

    warm_start_steps: int  # answer-only supervised steps of the shared warm start
    rl_steps: int  # RL steps of every run
    extra_sft_steps: int  # sft+grpo: supervised steps on the expert traces before GRPO
    eval_every: int  # held-out evaluation every K RL steps (and at step 0)
    eval_examples: int  # questions per evaluation split (in-domain and OOD)
    max_new_tokens: int  # longest sampled response
    quick: bool = False  # pass --quick to calibrl.train (the tiny test-sized model)
    only: Optional[Tuple[str, ...]] = None  # run only these configurations (run names without the seed)
    version: str = "v1"  # which study (see the module docstring)
    primer_steps: int = 0  # v2: supervised steps on the warm start images' expert traces after the warm start
    train_flags: Tuple[str, ...] = ()  # further calibrl.train flags of every run (reward format, evaluation)
    rl_flags: Tuple[str, ...] = ()  # further flags of every RL run (learning rate and schedule)
    other_seeds: Optional[int] = None  # configurations outside FIVE_SEED_KEYS run on the first N seeds (None: all)


FULL = Budget(
    warm_start_steps=300, rl_steps=60, extra_sft_steps=100, eval_every=10, eval_examples=192, max_new_tokens=20
)
# the --quick budget of every study: a few steps of each stage on the trainer's --quick model
QUICK_STEPS = dict(
    warm_start_steps=3, rl_steps=2, extra_sft_steps=2, eval_every=1, eval_examples=8, max_new_tokens=8, quick=True
)
# one configuration of each section and of each kind of reference row
QUICK = Budget(**QUICK_STEPS, only=("calibrl", "grpo", "sft-grpo", "act-relu", "slope-0.25", "baseline-seqmean"))
# v1 as it was run: the authors' reward parsing and one evaluation sample (defaults of calibrl.train then)
V1_FLAGS = ("--reward-format", "authors", "--eval-samples", "1", "--diagnostics-every", "0")
FULL = dataclasses.replace(FULL, train_flags=V1_FLAGS)
QUICK = dataclasses.replace(QUICK, train_flags=V1_FLAGS)
V2_FLAGS = (
    "--reward-format",
    "strict",
    "--eval-samples",
    "8",
    "--diagnostics-every",
    "5",
    "--eval-metrics",
    "calibrl.study.tasks:attribute_scores",
)
# v2's regime, chosen from the probe recorded in docs/study/v2_probe.md (GRPO's behaviour only for the lr):
# a 60-step primer crosses the guide's bend on about 40% of guided tokens; lr 5e-4 (10 warm-up steps, then
# constant) took GRPO's per-response entropy to 24% of its first 10 steps' value within 100 steps. The warm
# start, the sft+grpo stage and the response length are v1's.
FULL_V2 = dataclasses.replace(
    FULL,
    rl_steps=100,
    eval_every=20,
    eval_examples=96,
    version="v2",
    primer_steps=60,
    train_flags=V2_FLAGS,
    rl_flags=("--lr", "5e-4", "--warmup-steps", "10"),
    other_seeds=OTHER_SEEDS,
)
QUICK_V2 = dataclasses.replace(FULL_V2, **QUICK_STEPS, primer_steps=2, only=("calibrl", "grpo"))
STUDIES = {"v1": (FULL, QUICK), "v2": (FULL_V2, QUICK_V2)}  # (full, --quick) budget of each configuration


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # folder name under the study folder, e.g. "calibrl-seed0"
    section: str  # one of SECTIONS, or "warmstart"
    label: str  # the row / line label shared by the seeds of one configuration
    seed: int
    flags: Tuple[str, ...]  # calibrl.train flags (without --out)
    depends_on: Optional[str] = None  # the warm start's name, for RL runs


def warm_start_name(seed: int) -> str:
    return f"warmstart-seed{seed}"


def primer_name(seed: int) -> str:
    return f"primer-seed{seed}"


def _rl_configs(sections: Sequence[str], version: str = "v1") -> List[Tuple[str, str, str, Tuple[str, ...]]]:
    """(key, section, label, flags) of every RL configuration in ``sections``."""
    configs = []
    if "main" in sections:
        configs += [(algo.replace("+", "-"), "main", algo, ("--algo", algo)) for algo in MAIN_ALGOS]
        if version == "v2":  # the guide switched off belongs to the main comparison
            configs.insert(3, NO_GUIDE)
    if "activation" in sections:
        activations = [a for a in ACTIVATIONS if version == "v1" or a != "none"]
        configs += [(f"act-{a}", "activation", a, ("--algo", "calibrl", "--activation", a)) for a in activations]
    if "slope" in sections:
        configs += [
            (f"slope-{s:g}", "slope", f"slope {s:g}", ("--algo", "calibrl", "--negative-slope", str(s))) for s in SLOPES
        ]
    if "baseline" in sections:
        configs += [(key, "baseline", label, ("--algo", "calibrl") + flags) for key, label, flags in BASELINE_VARIANTS]
    return configs


def study_runs(
    data: Dict[str, str], study_dir: str, seeds: Sequence[int], budget: Budget, sections: Sequence[str] = SECTIONS
) -> List[Run]:
    """Every run of the study: the warm starts first, then the RL runs seed by seed."""
    common = (
        "--eval-data",
        data["eval_id"],
        "--ood-eval-data",
        data["eval_ood"],
        "--eval-examples",
        str(budget.eval_examples),
        "--max-new-tokens",
        str(budget.max_new_tokens),
        "--no-progress",
        "--no-tensorboard",
        "--keep-checkpoints",
        "1",
        "--save-every",
        "1000000",
    )
    common += budget.train_flags
    if budget.quick:
        common = ("--quick",) + common
    runs = [
        Run(
            warm_start_name(s),
            "warmstart",
            "warm start",
            s,
            common
            + (
                "--seed",
                str(s),
                "--data",
                data["warmstart"],
                "--sft-steps",
                str(budget.warm_start_steps),
                "--max-steps",
                "0",
            ),
        )
        for s in seeds
    ]
    start_of = warm_start_name
    if budget.primer_steps:  # the expert traces of the warm start's images, after the answer-only warm start
        runs += [
            Run(
                primer_name(s),
                "warmstart",
                "primer",
                s,
                common
                + (
                    "--seed",
                    str(s),
                    "--data",
                    data["warmstart_traces"],
                    "--sft-steps",
                    str(budget.primer_steps),
                    "--max-steps",
                    "0",
                    "--init-from",
                    os.path.join(study_dir, warm_start_name(s)),
                ),
                warm_start_name(s),
            )
            for s in seeds
        ]
        start_of = primer_name
    for position, seed in enumerate(seeds):
        init = os.path.join(study_dir, start_of(seed))
        rl = (
            common
            + (
                "--seed",
                str(seed),
                "--data",
                data["rl"],
                "--init-from",
                init,
                "--sft-steps",
                "0",
                "--extra-sft-steps",
                str(budget.extra_sft_steps),
                "--max-steps",
                str(budget.rl_steps),
                "--eval-every",
                str(budget.eval_every),
            )
            + budget.rl_flags
        )
        for key, section, label, flags in _rl_configs(sections, budget.version):
            if budget.only is not None and key not in budget.only:
                continue
            if budget.other_seeds is not None and key not in FIVE_SEED_KEYS and position >= budget.other_seeds:
                continue
            runs.append(Run(f"{key}-seed{seed}", section, label, seed, rl + flags, start_of(seed)))
    return runs
