"""Output-level confidence signals from the answer position's logits and the generated tokens' log-probs.

Why these exist: they are the cheap baselines every reliability method must beat (paper: logit entropy ~0.50,
mean log-prob ~0.54, top-1/top-2 logit margin ~0.70 AUROC on POPE adversarial). Computing them in log space
(scipy log_softmax / logsumexp) matters: 7B models put logits in the tens, and naive exp() overflows or rounds
p_yes + p_no to 0, which would turn the answer-restricted confidence into NaN.

Pure numpy; the adapter supplies the logits at the first answer position and the yes/no token ids. The two
log-space reductions are scipy's algorithms written in plain numpy (`_log_softmax`, `_logsumexp`): the same
operations in the same order, so the same bits, without scipy's array-API dispatch, which cost ~0.5 ms per call
and made these signals the largest non-model cost of a batch-1 extraction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.special import expit

__all__ = ["output_signals", "mean_token_logprob"]


def _check_token_ids(ids: Sequence[int], vocab_size: int, name: str) -> np.ndarray:
    """Return the unique token ids as an int array, raising ValueError for empty, non-int or out-of-range ids.

    Duplicates are collapsed (a set of tokens: listing "yes" twice must not double its probability)."""
    raw = list(ids)
    if not raw:
        raise ValueError(f"{name} is empty; pass at least one token id")
    for t in raw:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"{name} must contain ints, got {t!r}")
    arr = np.asarray(sorted({int(t) for t in raw}), dtype=np.int64)  # np.unique's dispatch costs more than this
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size}): {bad.tolist()}")
    return arr


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """``scipy.special.log_softmax(x, axis=1)`` for finite 2-D input (same operations, same bits)."""
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """``scipy.special.logsumexp(x, axis=1)`` for finite 2-D input (same operations, same bits): the maximal
    terms are kept out of the sum and added back through log1p, for precision."""
    x_max = x.max(axis=1, keepdims=True)
    is_max = x == x_max
    n_max = is_max.sum(axis=1, keepdims=True, dtype=x.dtype)
    total = np.exp(np.where(is_max, -np.inf, x) - x_max).sum(axis=1, keepdims=True)
    total = np.where(total == 0, total, total / n_max)
    return (np.log1p(total) + np.log(n_max) + x_max)[:, 0]


def output_signals(
    answer_logits: np.ndarray, yes_token_ids: Sequence[int], no_token_ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """Confidence signals for n yes/no answers from their (n, V) logits at the first answer position.

    Returned arrays, each shape (n,):
      p_yes, p_no          softmax mass over all yes (resp. no) token ids, full-vocabulary softmax.
      yes_no_mass          p_yes + p_no: how much the model is answering yes/no at all.
      yes_no_log_odds      logsumexp(yes logits) - logsumexp(no logits) = log(p_yes / p_no), signed
                           (> 0 means the answer-restricted prediction is "yes").
      yes_no_margin        |yes_no_log_odds|: confidence in whichever of yes/no wins.
      max_answer_prob      max(p_yes, p_no) / (p_yes + p_no) = sigmoid(yes_no_margin), computed in log space
                           so it is finite even when p_yes + p_no underflows. It is a monotone function of
                           yes_no_margin (identical rankings/AUROC), but saturates to exactly 1.0 in float64
                           once the margin exceeds ~37 nats, so rank with yes_no_margin.
      top1_top2_margin     full-vocabulary top-1 minus top-2 logit (the paper's "logit margin").
      token_entropy        entropy of the full softmax, nats.
      top1_prob            full-vocabulary max probability.

    Raises ValueError for non-2-D or non-finite logits, V < 2, empty/out-of-range ids, or overlapping
    yes/no id sets.
    """
    logits = np.asarray(answer_logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"answer_logits must have shape (n, vocab_size), got {logits.shape}; use x[None] for one")
    n, vocab = logits.shape
    if vocab < 2:
        raise ValueError(f"need a vocabulary of at least 2 tokens for a top-1/top-2 margin, got {vocab}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("answer_logits contains NaN or infinite values (masked logits? cast before -inf fill?)")
    yes = _check_token_ids(yes_token_ids, vocab, "yes_token_ids")
    no = _check_token_ids(no_token_ids, vocab, "no_token_ids")
    overlap = sorted(set(yes.tolist()) & set(no.tolist()))
    if overlap:
        raise ValueError(f"yes_token_ids and no_token_ids overlap: {overlap}")

    logp = _log_softmax(logits)
    log_p_yes = _logsumexp(logp[:, yes])
    log_p_no = _logsumexp(logp[:, no])
    log_odds = log_p_yes - log_p_no  # == logsumexp(yes logits) - logsumexp(no logits); normaliser cancels
    margin = np.abs(log_odds)

    if n:
        top2 = np.partition(logits, vocab - 2, axis=1)[:, -2:]
        top1_top2 = top2[:, 1] - top2[:, 0]
    else:
        top1_top2 = np.zeros(0)
    probs = np.exp(logp)
    return {
        "p_yes": np.exp(log_p_yes),
        "p_no": np.exp(log_p_no),
        "yes_no_mass": np.exp(np.logaddexp(log_p_yes, log_p_no)),
        "yes_no_log_odds": log_odds,
        "yes_no_margin": margin,
        "max_answer_prob": expit(margin),
        "top1_top2_margin": top1_top2,
        "token_entropy": -np.sum(probs * logp, axis=1),
        "top1_prob": np.exp(logp.max(axis=1)),
    }


def mean_token_logprob(token_logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Mean log-probability of each sample's generated tokens (the paper's "output confidence").

    Input is ragged: one 1-D array of per-token log-probs per sample (answers have different lengths). The
    mean, not the sum, so long answers are not penalised for length. Raises ValueError for a sample with no
    tokens, non-finite values, or values > 0 (a log-prob cannot exceed 0; positive values usually mean raw
    logits or probabilities were passed).
    """
    out = np.empty(len(token_logprobs), dtype=np.float64)
    for i, lp in enumerate(token_logprobs):
        arr = np.atleast_1d(np.asarray(lp, dtype=np.float64))
        if arr.ndim != 1:
            raise ValueError(f"sample {i}: token log-probs must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"sample {i} has no generated tokens")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"sample {i}: token log-probs contain NaN or infinite values")
        if np.any(arr > 1e-6):
            raise ValueError(
                f"sample {i}: token log-probs must be <= 0 (max {arr.max():.3g}); were logits or probabilities passed?"
            )
        out[i] = arr.mean()
    return out
