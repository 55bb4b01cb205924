"""What the gate produces and stores: one routed decision, and the calibration file of a bundle.

Kept apart from the runtime so that readers of bundles (drift checks, the dashboard, recalibration) need not import
the model-running code, and so the file format lives in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from vlmrel_core.gate.calibration import AnyCalibrator, calibrator_from_dict
from vlmrel_core.gate.signal_calibration import OUTPUT_SIGNALS
from vlmrel_core.io import write_json
from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.paths import read_json_file

Action = Literal["generate", "fallback", "self_consistency"]
CALIBRATION_SCHEMA_VERSION = 1


class GateError(InputError):
    """A gate that cannot be assembled or run as configured (model/probe/calibration mismatch), said in words."""


@dataclass
class GateDecision:
    """One routed answer. ``confidence`` is the calibrated P(correct) of the greedy answer."""

    answer: str  # normalised greedy answer
    answer_text: str
    confidence: float
    action: Action
    accepted: bool  # served automatically
    route: str  # "answer" or the fallback strategy's name
    certified: bool  # decided by the risk-certified rule (False for plain thresholds and gray-zone acceptances)
    self_consistency: dict[str, Any] | None
    evidence: dict[str, Any]
    novelty: float | None = None  # per-input novelty score of the probe state (None: the gate has no novelty model)
    in_domain: bool = True  # False when the input is novel or its window is in alarm: the certificate does not apply
    reason: str | None = None  # why an answer was not served as routed ("out of distribution", "window drift alarm")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriftReference:
    """Held-out calibrated confidences and the mean probe-layer embedding the live windows are compared with."""

    confidence: np.ndarray
    embedding_mean: np.ndarray | None
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": [float(v) for v in self.confidence],
            "embedding_mean": None if self.embedding_mean is None else [float(v) for v in self.embedding_mean],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DriftReference":
        mean = data.get("embedding_mean")
        return cls(np.asarray(data["confidence"], dtype=float), None if mean is None else np.asarray(mean, dtype=float),
                   str(data.get("source", "")))


@dataclass
class CalibrationBundle:
    """Contents of ``calibration.json``: the probe's calibrator, the output signals' calibrators, the risk
    certificate (raw-score threshold + its calibrated value) and the drift reference."""

    model_fingerprint: str
    probe_calibrator: AnyCalibrator
    signal_calibrators: dict[str, AnyCalibrator] = field(default_factory=dict)
    risk_certificate: dict[str, Any] | None = None
    drift_reference: DriftReference | None = None
    alternatives: dict[str, dict[str, Any]] = field(default_factory=dict)  # the other fitted probe calibrators
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": CALIBRATION_SCHEMA_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "probe": self.probe_calibrator.to_dict(),
            "probe_alternatives": self.alternatives,
            "signals": {name: c.to_dict() for name, c in self.signal_calibrators.items()},
            "risk_certificate": self.risk_certificate,
            "drift_reference": None if self.drift_reference is None else self.drift_reference.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<calibration>") -> "CalibrationBundle":
        try:
            if data.get("schema_version") != CALIBRATION_SCHEMA_VERSION:
                raise GateError(f"{source}: calibration schema {data.get('schema_version')!r}, expected {CALIBRATION_SCHEMA_VERSION}")
            unknown = [n for n in data.get("signals", {}) if n not in OUTPUT_SIGNALS]
            if unknown:
                raise GateError(f"{source}: unknown output signals {unknown}; known: {sorted(OUTPUT_SIGNALS)}")
            drift = data.get("drift_reference")
            return cls(
                model_fingerprint=str(data["model_fingerprint"]),
                probe_calibrator=calibrator_from_dict(data["probe"]),
                signal_calibrators={n: calibrator_from_dict(d) for n, d in data.get("signals", {}).items()},
                risk_certificate=data.get("risk_certificate"),
                drift_reference=None if drift is None else DriftReference.from_dict(drift),
                alternatives=dict(data.get("probe_alternatives", {})),
                provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError) as err:
            raise GateError(f"{source} is not a vlmrel gate calibration file: missing or bad {err}") from err

    def save(self, path: str | Path) -> Path:
        """Atomically write ``calibration.json`` (a concurrent reader sees the old file or the new one)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationBundle":
        path = Path(path)
        try:  # not found / not UTF-8 / not JSON: one line naming the file
            data = read_json_file(path, "calibration file")
        except InputError as err:
            raise GateError(str(err)) from None
        if not isinstance(data, dict):
            raise GateError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))


__all__ = ["Action", "CALIBRATION_SCHEMA_VERSION", "CalibrationBundle", "DriftReference", "GateDecision", "GateError"]
