"""The gate's out-of-distribution guard: per-input novelty + a tumbling window of drift tests, one verdict each.

Why a separate object: `ReliabilityGate` only needs to ask "is this input (and the traffic around it) inside
what the certificate was fitted on?" and act on the answer; the statistics live in `novelty` and `drift_tests`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmrel_core.gate.drift_tests import WindowDriftDetector, WindowDriftReport
from vlmrel_core.gate.novelty import NoveltyModel

logger = logging.getLogger("vlmrel.gate")


@dataclass(frozen=True)
class OODVerdict:
    """``novel``: this input is beyond the state or the image novelty threshold; ``window_alarm``: the current window is in alarm;
    ``in_domain``: neither, so the certificate applies."""

    novelty: float
    novelty_threshold: float
    novel: bool
    image_novelty: float | None
    window_alarm: bool
    window_report: dict[str, Any] | None

    @property
    def in_domain(self) -> bool:
        return not self.novel and not self.window_alarm


class OODGuard:
    """Scores each state, keeps a tumbling window of states, and holds the last window's alarm until a later
    window passes. Thread-safe (own lock)."""

    def __init__(self, novelty: NoveltyModel, section: Any, seed: int = 0) -> None:
        self.novelty = novelty
        self.section = section
        self.detector = WindowDriftDetector(novelty, section.window_tests, section.alpha, seed)
        self._lock = threading.Lock()
        self._states: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self.in_alarm = False
        self.last_report: WindowDriftReport | None = None
        self.needs_recalibration = False

    def observe(self, state: np.ndarray, image_features: np.ndarray | None = None) -> OODVerdict:
        """Verdict for one input's probe-layer state and, when the novelty model has an image score, its image
        statistics (`image_novelty.image_features`); the window check runs when the window fills."""
        score = float(self.novelty.score(np.asarray(state, dtype=np.float64)[None, :])[0])
        image = self.novelty.image
        image_score = None
        if image is not None:
            if image_features is None:
                raise ValueError("the novelty model scores image statistics: pass the input's image_features")
            image_score = float(image.score(np.asarray(image_features, dtype=np.float64)[None, :])[0])
        report = None
        with self._lock:
            self._states.append(np.asarray(state, dtype=np.float64))
            if image_features is not None:
                self._features.append(np.asarray(image_features, dtype=np.float64))
            if len(self._states) >= self.section.window:
                features = np.vstack(self._features) if image is not None else None
                result = self.detector.check(np.vstack(self._states), image_features=features)
                self._states, self._features = [], []
                self.in_alarm = result.alarm
                self.last_report = result
                report = result.to_dict()
                if result.alarm:
                    logger.warning("window drift alarm: %s", "; ".join(result.reasons))
                    if self.section.on_alarm == "recalibrate":
                        self.needs_recalibration = True
            alarm = self.in_alarm
        far = score > self.novelty.threshold or (image_score is not None and image_score > image.threshold)
        novel = bool(self.section.route_novel and far)
        return OODVerdict(score, float(self.novelty.threshold), novel, image_score, alarm, report)
