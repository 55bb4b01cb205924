"""Known-answer tests for self-consistency signals and their sampling config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vlmrel_core.signals.consistency import (
    SelfConsistencyConfig,
    agreement_rate,
    consistency_signals,
    majority_answer,
)


def test_agreement_rate_known_values():
    assert agreement_rate(["yes"] * 7 + ["no"] * 3) == pytest.approx(0.7)
    assert agreement_rate(["no", "yes", "no", "no"]) == pytest.approx(0.75)
    assert agreement_rate(["yes", "no", "other"]) == pytest.approx(1 / 3)
    assert agreement_rate(("no",)) == 1.0
    # No normalisation happens here: the adapter owns it, so "Yes" and "yes" are different answers.
    assert agreement_rate(["yes", "Yes"]) == 0.5


@pytest.mark.parametrize(
    "answers, match",
    [([], "empty"), ("yes", "not a single string"), (["yes", None], "must contain strings"), (["yes", 1], "strings")],
)
def test_agreement_rate_rejects_bad_input(answers, match):
    with pytest.raises(ValueError, match=match):
        agreement_rate(answers)


def test_majority_answer_clear_and_tied():
    assert majority_answer(["no", "yes", "yes"]) == "yes"
    # Ties go to the tied answer that occurs first.
    assert majority_answer(["no", "yes", "yes", "no"]) == "no"
    assert majority_answer(["yes", "no", "no", "yes"]) == "yes"
    assert majority_answer(["other", "yes", "no"]) == "other"
    assert majority_answer(["maybe", "yes", "no", "no", "yes"]) == "yes"  # first of the tied pair, not "maybe"
    with pytest.raises(ValueError, match="empty"):
        majority_answer([])


def test_consistency_signals_ragged_items():
    s = consistency_signals([["yes"] * 10, ["yes"] * 6 + ["no"] * 4, ["a", "b", "c"], ["no", "yes"]])
    np.testing.assert_allclose(s["agreement"], [1.0, 0.6, 1 / 3, 0.5])
    np.testing.assert_array_equal(s["n_distinct"], [1, 2, 3, 2])
    np.testing.assert_array_equal(s["k"], [10, 10, 3, 2])
    assert list(s["majority"]) == ["yes", "yes", "a", "no"]
    assert s["agreement"].dtype == np.float64
    assert s["n_distinct"].dtype.kind == "i" and s["k"].dtype.kind == "i"
    # Agrees with the scalar functions item by item.
    items = [["no", "no", "yes"], ["x", "y", "y", "x"]]
    s2 = consistency_signals(items)
    assert list(s2["agreement"]) == [agreement_rate(a) for a in items]
    assert list(s2["majority"]) == [majority_answer(a) for a in items]


def test_consistency_signals_errors_and_empty():
    with pytest.raises(ValueError, match="item 1"):
        consistency_signals([["yes"], []])
    with pytest.raises(ValueError, match="item 0"):
        consistency_signals(["yes"])  # a bare string per item would be read as characters
    s = consistency_signals([])
    assert all(v.shape == (0,) for v in s.values())


def test_self_consistency_config_defaults_and_cost():
    cfg = SelfConsistencyConfig()
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.seed) == (10, 0.7, 0.9, 0)
    assert cfg.cost_multiplier == 10
    assert SelfConsistencyConfig(k=5).cost_multiplier == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "k must"), ({"k": 2.5}, "k must"), ({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
     ({"top_p": 0.0}, "top_p")],
)
def test_self_consistency_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfConsistencyConfig(**kwargs)
