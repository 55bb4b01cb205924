"""Choose the gate's novelty score by measurement instead of by default.

Why: which score separates in-domain from shifted inputs depends on the model (the shift report measured k-NN
ahead on late fusion, Mahalanobis marginally ahead on early fusion). With shifted runs at hand (extractions of
shifted data, each row shifted by construction) the candidates of `shift_report.NOVELTY_CANDIDATES` are compared
by their mean AUROC of held-out in-domain states against each shifted run, and the best one is fitted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from vlmrel_core.engine.store import RunReader
from vlmrel_core.gate.novelty import DEFAULT_FALSE_REJECT_RATE, NoveltyModel, fit_novelty
from vlmrel_core.gate.shift_report import NOVELTY_CANDIDATES, compare_novelty

NoveltyChoice = Literal["knn", "mahalanobis", "auto"]
AUTO_CRITERION = "mean AUROC, the run's test split (in-domain) vs each shifted run"


def shifted_run_states(
    runs: Sequence[str | Path], fingerprint: str, pooling: str, layer: int
) -> dict[str, np.ndarray]:
    """Each shifted run's states at the gate's layer and pooling; the runs must come from the gate's model."""
    states = {}
    for run in runs:
        reader = RunReader(run)
        m = reader.manifest
        if m.model_fingerprint != fingerprint:
            raise ValueError(f"shifted run {run} is from model {m.model_fingerprint}, the gate's run from {fingerprint}")
        if layer not in m.layers or pooling not in m.poolings:
            raise ValueError(f"shifted run {run} has layers {m.layers} and poolings {m.poolings}; the gate needs "
                             f"layer {layer} with {pooling!r}")
        states[Path(run).name] = reader.states(pooling, [layer])[:, 0].astype(np.float64)
    return states


def fit_chosen_novelty(
    train: np.ndarray, calibration: np.ndarray, held_out: np.ndarray, method: NoveltyChoice,
    shifted: Mapping[str, np.ndarray], seed: int = 0, false_reject_rate: float = DEFAULT_FALSE_REJECT_RATE,
) -> tuple[NoveltyModel, dict[str, Any]]:
    """The fitted novelty model and how it was chosen (``{"criterion", "chosen", "candidates"}``)."""
    if method not in ("knn", "mahalanobis", "auto"):
        raise ValueError(f"novelty method must be 'knn', 'mahalanobis' or 'auto', got {method!r}")
    if method != "auto":
        return (fit_novelty(train, calibration, method, false_reject_rate=false_reject_rate, seed=seed),
                {"criterion": "given", "chosen": method})
    if not shifted:
        raise ValueError("novelty method 'auto' needs at least one shifted run to measure the candidates against")
    best, table = compare_novelty({"train": train, "calibration": calibration}, held_out, shifted, false_reject_rate)
    model = fit_novelty(train, calibration, false_reject_rate=false_reject_rate, seed=seed, **NOVELTY_CANDIDATES[best])
    return model, {"criterion": AUTO_CRITERION, "chosen": best, "candidates": table}


__all__ = ["AUTO_CRITERION", "NoveltyChoice", "fit_chosen_novelty", "shifted_run_states"]
