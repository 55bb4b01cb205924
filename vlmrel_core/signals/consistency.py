"""Self-consistency: how often K sampled answers agree with each other.

Why: in the paper it is the strongest black-box signal (AUROC ~0.78-0.81, pooled R_pb 0.43) but it costs K
generations per question, so the product must report it next to its cost. These functions only count;
answers arrive already normalised by the model adapter ("yes"/"no"/other strings), and are compared exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["SelfConsistencyConfig", "agreement_rate", "majority_answer", "consistency_signals"]


def _check_answers(answers: Sequence[str], where: str = "answers") -> list[str]:
    """Return answers as a list, rejecting a bare string (which would be read as characters) and empties."""
    if isinstance(answers, (str, bytes)):
        raise ValueError(f"{where} must be a sequence of answer strings, not a single string {answers!r}")
    items = list(answers)
    if not items:
        raise ValueError(f"{where} is empty; need at least one sampled answer")
    for a in items:
        if not isinstance(a, str):
            raise ValueError(f"{where} must contain strings (normalised answers), got {a!r}")
    return items


def _counts_in_first_seen_order(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in items:
        counts[a] = counts.get(a, 0) + 1
    return counts  # dicts keep insertion order, i.e. order of first occurrence


def agreement_rate(answers: Sequence[str]) -> float:
    """Share of the K answers equal to the most frequent one, in [1/K, 1]. Empty input -> ValueError."""
    items = _check_answers(answers)
    return max(_counts_in_first_seen_order(items).values()) / len(items)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the tied answer that occurs *earliest* in `answers`.

    Why first occurrence: it is deterministic given the (seeded) sampling order and lets a caller make ties go
    to the greedy answer by listing it first. It is not permutation-invariant; sort `answers` first if that is
    wanted.
    """
    counts = _counts_in_first_seen_order(_check_answers(answers))
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best)


def consistency_signals(samples_per_item: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Per-item self-consistency signals; items may have different K.

    Returns arrays of shape (n_items,): "agreement" (float, agreement_rate), "n_distinct" (int, number of
    different answers), "k" (int, number of samples) and "majority" (object array of str, majority_answer,
    for scoring the self-consistency answer itself).
    """
    if isinstance(samples_per_item, (str, bytes)):
        raise ValueError("samples_per_item must be a sequence of per-item answer lists, not a string")
    agreement, n_distinct, k, majority = [], [], [], []
    for i, answers in enumerate(samples_per_item):
        items = _check_answers(answers, where=f"item {i}")
        counts = _counts_in_first_seen_order(items)
        best = max(counts.values())
        agreement.append(best / len(items))
        n_distinct.append(len(counts))
        k.append(len(items))
        majority.append(next(a for a, c in counts.items() if c == best))
    majority_arr = np.empty(len(majority), dtype=object)
    majority_arr[:] = majority
    return {
        "agreement": np.asarray(agreement, dtype=np.float64),
        "n_distinct": np.asarray(n_distinct, dtype=np.int64),
        "k": np.asarray(k, dtype=np.int64),
        "majority": majority_arr,
    }


@dataclass(frozen=True)
class SelfConsistencyConfig:
    """Sampling settings for self-consistency; defaults are the paper's (K=10, T=0.7, top-p 0.9).

    `seed` is the base seed: sample j of an item should use a generator seeded from (seed, item, j) so reruns
    reproduce the same K answers.
    """

    k: int = 10
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def cost_multiplier(self) -> int:
        """Generations per question relative to one greedy answer: k.

        Counted in full generations (prefill + decode each); the greedy answer, if also produced, is not
        included (total k + 1). Sharing the prompt's KV cache across samples makes the real compute lower,
        mostly for long prompts, so this is the simple, conservative unit the paper's "10x cost" uses.
        """
        return int(self.k)
