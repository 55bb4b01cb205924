"""The production gate: answer, say how far to trust the answer, route it — from the pass that made the answer.

`ReliabilityGate.answer` makes ONE `run.run_batch` call (one greedy generate whose prefill is captured at the
probe's layer), scores the captured state with the probe, calibrates the score, and routes:

* c >= threshold (outside the gray zone): ``generate`` — the answer is served;
* c < threshold (outside the gray zone): ``fallback`` — the configured ``fallback_strategy`` takes over;
* lo <= c < hi with ``gray_zone_action: self_consistency_k<K>``: ``self_consistency`` — K sampled answers; the
  greedy answer is served when their majority equals it with agreement >= ``min_agreement``, else the fallback.

Zero extra forward passes outside the gray zone: the probe reads the states of the answer's own prefill, so
`answer` makes exactly the model calls of a plain greedy generate (tested by counting calls). Self-consistency is
the only extra cost; each decision reports it measured (sequence-forward passes and seconds), and
`ReliabilityGate.stats` aggregates the cost multiplier over all decisions.

With a risk certificate (``routing.risk_target``) the generate/fallback split is the certified rule itself:
raw probe score >= the certified raw threshold (see `build_gate_from_run`). Gray-zone answers served by
self-consistency below the threshold are outside the certificate; each decision says whether it was certified.

`build_gate_from_run` fits everything from a cached extraction run (probe on the train split, calibrators and the
threshold on the calibration split, every reported number on the test split) and writes a bundle:
``gate.yaml`` + ``probe/`` (safetensors + JSON) + ``calibration.json`` + ``report.json``. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

from vlmrel_core.gate.calibration import AnyCalibrator, CalibrationMethod, TemperatureScaler, calibrator_from_dict
from vlmrel_core.engine.capture import resolve_layers
from vlmrel_core.gate.drift import DriftMonitor, DriftReport, recalibrate
from vlmrel_core.gate.novelty import NoveltyModel, fit_novelty
from vlmrel_core.gate.ood_guard import OODGuard
from vlmrel_core.gate.config import (
    GateConfig,
    GateConfigError,
    ReliabilityMonitorConfig,
    dump_gate_config,
    load_gate_config,
    parse_gate_config,
)
from vlmrel_core.analysis.metrics import area_under_risk_coverage, expected_calibration_error, risk_coverage_curve
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, Probe, ProbeError, fit_run_probe, load_probe, select_layer_probe
from vlmrel_core.gate.risk import RiskThreshold, UnreachableRiskTarget, select_risk_threshold
from vlmrel_core.gate.signal_calibration import OUTPUT_SIGNALS, calibrate_signals, signal_scores, summary_table
from vlmrel_core.signals.consistency import SelfConsistencyConfig
from vlmrel_core.analysis.splits import SplitSpec, group_keys, holdout_indices, labels_of, make_split
from vlmrel_core.engine.store import RunReader

logger = logging.getLogger("vlmrel.gate")

Action = Literal["generate", "fallback", "self_consistency"]
BUNDLE_CONFIG = "gate.yaml"
BUNDLE_PROBE = "probe"
BUNDLE_CALIBRATION = "calibration.json"
BUNDLE_REPORT = "report.json"
BUNDLE_NOVELTY = "novelty"
CALIBRATION_SCHEMA_VERSION = 1
DEFAULT_GRAY_ZONE_HALFWIDTH = 0.075


class GateError(ValueError):
    """A gate that cannot be assembled or run as configured (model/probe/calibration mismatch), said in words."""


# --------------------------------------------------------------------------------------------------- records


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
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationBundle":
        path = Path(path)
        if not path.is_file():
            raise GateError(f"calibration file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise GateError(f"{path} is not valid JSON ({err.msg})") from err
        if not isinstance(data, dict):
            raise GateError(f"{path}: expected a JSON object")
        return cls.from_dict(data, str(path))


# --------------------------------------------------------------------------------------------------- the gate


def _as_config(config: GateConfig | ReliabilityMonitorConfig) -> GateConfig:
    return config if isinstance(config, GateConfig) else GateConfig(reliability_monitor=config)


def _fusion_name(fusion: str) -> str:
    return {"late": "late_fusion", "early": "early_fusion"}.get(fusion, fusion)


class ReliabilityGate:
    """Answer + calibrated confidence + route, from one generate call (plus self-consistency in the gray zone).

    Thread-safe: `answer` may be called from several threads sharing one model (capture hooks are per call; the
    statistics and drift window are guarded by a lock).
    """

    def __init__(
        self,
        loaded: Any,
        probe: Probe,
        calibrator: AnyCalibrator,
        config: GateConfig | ReliabilityMonitorConfig,
        *,
        risk_certificate: Mapping[str, Any] | None = None,
        signal_calibrators: Mapping[str, AnyCalibrator] | None = None,
        drift_reference: DriftReference | None = None,
        novelty: NoveltyModel | None = None,
    ) -> None:
        self.loaded = loaded
        self.probe = probe
        self.calibrator = calibrator
        self.config = _as_config(config)
        self.signal_calibrators = dict(signal_calibrators or {})
        m = self.config.monitor
        self.pooling = m.probe.pooling
        try:
            self.layer = resolve_layers(loaded.n_layers, [m.target_layer])[0]
        except ValueError as err:
            raise GateError(f"reliability_monitor.target_layer: {err}") from err
        self._check_model_and_probe()
        self._check_calibrator()
        self.threshold, self.threshold_raw, self.threshold_source = self._resolve_threshold(risk_certificate)
        self.risk_certificate = dict(risk_certificate) if risk_certificate is not None else None
        routing = m.routing
        self.gray_zone = routing.gray_zone_bounds if routing.gray_zone_action != "none" else None
        if self.gray_zone is not None and not self.gray_zone[0] <= self.threshold <= self.gray_zone[1]:
            raise GateError(
                f"reliability_monitor.routing.gray_zone_bounds: the threshold {self.threshold:.4g} "
                f"({self.threshold_source}) lies outside [{self.gray_zone[0]:g}, {self.gray_zone[1]:g}]"
            )
        k = routing.self_consistency_k
        sc = routing.self_consistency
        self.self_consistency = (
            SelfConsistencyConfig(k=k, temperature=sc.temperature, top_p=sc.top_p, seed=sc.seed) if k else None
        )
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._seconds: Counter[str] = Counter()
        self.drift_reference = drift_reference
        self.monitor: DriftMonitor | None = None
        if drift_reference is not None and m.logging.log_confidence_distributions:
            self.monitor = DriftMonitor(
                drift_reference.confidence, drift_reference.embedding_mean,
                kl_threshold=m.monitoring.kl_divergence_threshold, window=m.monitoring.window,
                alpha=m.monitoring.ks_alpha, embedding_shift_threshold=m.monitoring.embedding_shift_threshold,
                bins=m.monitoring.bins,
            )
        self._window_conf: list[float] = []
        self._window_state_sum: np.ndarray | None = None
        self.last_drift_report: DriftReport | None = None
        self.ood = OODGuard(novelty, m.novelty) if novelty is not None else None

    # ---- checks --------------------------------------------------------------------------------------
    def _check_model_and_probe(self) -> None:
        m, loaded, info = self.config.monitor, self.loaded, self.probe.info
        if info.model_fingerprint != loaded.fingerprint:
            raise ProbeError(
                f"model fingerprint mismatch: the probe was trained on model {info.model_fingerprint!r} "
                f"({info.model_source or 'unknown source'}), but the gate's model is {loaded.fingerprint!r} ({loaded.source})"
            )
        expected_arch = _fusion_name(loaded.adapter.fusion)
        if m.architecture != expected_arch:
            raise GateError(f"reliability_monitor.architecture: config says {m.architecture!r}, the model is {expected_arch!r}")
        hidden = loaded.hidden_size
        if m.probe.hidden_dim is not None and m.probe.hidden_dim != hidden:
            raise GateError(f"reliability_monitor.probe.hidden_dim: config says {m.probe.hidden_dim}, the model's hidden size is {hidden}")
        if info.hidden_size != hidden or info.n_features != hidden:
            raise GateError(f"the probe reads {info.n_features} features (hidden size {info.hidden_size}); the model's hidden size is {hidden}")
        if list(info.layers) != [self.layer]:
            raise GateError(
                f"reliability_monitor.target_layer: {m.target_layer} (layer {self.layer}), but the probe was trained "
                f"on layer(s) {info.layers}; the gate needs a single-layer probe of its target layer"
            )
        if info.pooling and info.pooling != self.pooling:
            raise GateError(f"reliability_monitor.probe.pooling: {self.pooling!r}, but the probe was trained on {info.pooling!r}")

    def _check_calibrator(self) -> None:
        probe_cfg = self.config.monitor.probe
        method = self.calibrator.to_dict()["method"]
        if method != probe_cfg.calibration_method:
            raise GateError(
                f"reliability_monitor.probe.calibration_method: {probe_cfg.calibration_method!r}, but the calibrator is {method!r}"
            )
        if isinstance(self.calibrator, TemperatureScaler):
            if self.calibrator.score_kind != "prob" or self.calibrator.n_classes is not None:
                raise GateError("the probe's temperature scaler must be binary and fitted on probabilities (score_kind 'prob')")
            if probe_cfg.temperature is not None and not math.isclose(
                probe_cfg.temperature, float(self.calibrator.temperature), rel_tol=1e-6
            ):
                raise GateError(
                    f"reliability_monitor.probe.temperature: {probe_cfg.temperature:g} disagrees with the calibration "
                    f"file's fitted temperature {self.calibrator.temperature:g}"
                )

    def _resolve_threshold(self, certificate: Mapping[str, Any] | None) -> tuple[float, float | None, str]:
        routing = self.config.monitor.routing
        if routing.confidence_threshold is not None:
            return float(routing.confidence_threshold), None, "confidence_threshold"
        target = routing.risk_target
        assert target is not None
        if certificate is None:
            raise GateError(
                "reliability_monitor.routing.risk_target: a risk target needs the certified threshold from the "
                "bundle's calibration file (risk_certificate); run `vlmrel build-gate` or set confidence_threshold"
            )
        if not (math.isclose(float(certificate["target_risk"]), target.max_risk, rel_tol=1e-9)
                and math.isclose(float(certificate["delta"]), target.delta, rel_tol=1e-9)):
            raise GateError(
                f"reliability_monitor.routing.risk_target: {{max_risk: {target.max_risk:g}, delta: {target.delta:g}}} "
                f"but the calibration file certifies max_risk {certificate['target_risk']:g} at delta "
                f"{certificate['delta']:g}; rebuild the gate for the new target"
            )
        raw = float(certificate["threshold"])
        calibrated = float(self.calibrator.transform(np.asarray([raw]))[0])
        return calibrated, raw, "risk_target"

    # ---- routing -------------------------------------------------------------------------------------
    def route(self, confidence: float, raw_score: float) -> Literal["generate", "fallback", "gray_zone"]:
        """Where a (calibrated confidence, raw probe score) pair goes before any self-consistency is run."""
        if self.gray_zone is not None and self.gray_zone[0] <= confidence < self.gray_zone[1]:
            return "gray_zone"
        if self.threshold_raw is not None:
            return "generate" if raw_score >= self.threshold_raw else "fallback"
        return "generate" if confidence >= self.threshold else "fallback"

    # ---- answering -----------------------------------------------------------------------------------
    def answer(self, image: Image.Image, question: str) -> GateDecision:
        """Answer one question about one image and route it (see the module docstring)."""
        return self.answer_batch([image], [question])[0]

    def answer_batch(
        self, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int = 8
    ) -> list[GateDecision]:
        """Decisions for many questions: greedy passes in left-padded batches, self-consistency per gray item."""
        from vlmrel_core.engine.run import run_batch

        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        m = self.config.monitor
        decisions: list[GateDecision] = []
        for start in range(0, len(questions), batch_size):
            batch_images, batch_questions = list(images[start : start + batch_size]), list(questions[start : start + batch_size])
            t0 = time.perf_counter()
            record = run_batch(
                self.loaded, batch_images, batch_questions, layers=[self.layer], poolings=[self.pooling],
                attentions=False, logit_lens=False, max_new_tokens=m.max_new_tokens, normalization=m.normalization,
            )
            t1 = time.perf_counter()
            states = record.states[self.pooling][:, 0, :]
            raw = self.probe.score(states)
            confidence = self.calibrator.transform(raw)
            signals = self._signals(record.output)
            t2 = time.perf_counter()
            shared = {
                "batch_size": len(batch_questions),
                "preprocess_s": record.timings["preprocess_s"],
                "generate_s": record.timings["generate_s"],
                "postprocess_s": record.timings["postprocess_s"],
                "probe_s": t2 - t1,
                "pass_s": t2 - t0,
            }
            for i in range(len(batch_questions)):
                decisions.append(self._decide(
                    batch_images[i], batch_questions[i], record.answer[i], record.answer_text[i],
                    float(raw[i]), float(confidence[i]), states[i], {n: {k: v[i] for k, v in e.items()} for n, e in signals.items()},
                    record.n_forward_calls, shared,
                ))
        return decisions

    def _signals(self, output: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        """Each output signal's raw score and, where the bundle has its calibrator, its calibrated probability."""
        result: dict[str, dict[str, np.ndarray]] = {}
        for name, values in signal_scores(output).items():
            entry = {"raw": values}
            calibrator = self.signal_calibrators.get(name)
            if calibrator is not None:
                finite = np.isfinite(values)  # e.g. no generated token: no mean log-prob for that row
                calibrated = np.full(values.shape, np.nan)
                if finite.any():
                    calibrated[finite] = calibrator.transform(values[finite])
                entry["calibrated"] = calibrated
            result[name] = entry
        return result

    def _decide(
        self, image: Image.Image, question: str, answer: str, answer_text: str, raw: float, confidence: float,
        state: np.ndarray, signals: Mapping[str, Mapping[str, Any]], pass_calls: int, shared: Mapping[str, float],
    ) -> GateDecision:
        m = self.config.monitor
        routing = m.routing
        where = self.route(confidence, raw)
        sc_result = None
        certified = self.threshold_source == "risk_target"
        if where == "gray_zone" and self.self_consistency is not None:
            from vlmrel_core.engine.self_consistency import sample_answers

            sc_result = sample_answers(self.loaded, image, question, self.self_consistency,
                                       max_new_tokens=m.max_new_tokens, normalization=m.normalization)
            action: Action = "self_consistency"
            accepted = (sc_result.majority_answer == answer and sc_result.agreement >= routing.self_consistency.min_agreement)
            certified = False
        elif where == "gray_zone":  # gray_zone_action "fallback"
            action, accepted = "fallback", False
        else:
            action, accepted = where, where == "generate"
        verdict = self.ood.observe(state) if self.ood is not None else None
        reason = None
        if verdict is not None and not verdict.in_domain:
            certified = False  # the certificate holds only on the distribution it was fitted on
            reason = "out of distribution" if verdict.novel else "window drift alarm"
            if verdict.novel or m.novelty.on_alarm != "flag":
                action, accepted = "fallback", False
        sc_calls = sc_result.n_forward_calls if sc_result else 0
        sc_sequence_passes = sc_result.sequence_forward_passes if sc_result else 0
        sc_seconds = sc_result.seconds if sc_result else 0.0
        greedy_seconds = shared["pass_s"] / max(shared["batch_size"], 1)
        timings = dict(shared)
        timings["self_consistency_s"] = sc_seconds
        evidence: dict[str, Any] = {
            "layer": self.layer,
            "pooling": self.pooling,
            "raw_probe_score": raw,
            "calibration_method": m.probe.calibration_method,
            "threshold": self.threshold,
            "threshold_raw": self.threshold_raw,
            "threshold_source": self.threshold_source,
            "gray_zone": list(self.gray_zone) if self.gray_zone is not None else None,
            "route_before_self_consistency": where,
            "n_forward_calls": pass_calls,  # the answer's own generate: the probe added none
            "self_consistency_forward_calls": sc_calls,
            "total_forward_calls": pass_calls + sc_calls,
            # Sequence-forward passes relative to the greedy answer alone (each SC call carries K sequences).
            "cost_multiplier": (pass_calls + sc_sequence_passes) / max(pass_calls, 1),
            "time_multiplier": (greedy_seconds + sc_seconds) / greedy_seconds if greedy_seconds > 0 else None,
            "timings": timings,
            "signals": {n: {k: float(v) if np.isfinite(v) else None for k, v in e.items()} for n, e in signals.items()},
            "model_fingerprint": self.loaded.fingerprint,
        }
        if m.logging.capture_states:
            evidence["state"] = [float(v) for v in state]
        with self._lock:
            self._stats["n"] += 1
            self._stats[f"action_{action}"] += 1
            self._stats["accepted"] += int(accepted)
            self._stats["greedy_sequence_passes"] += pass_calls
            self._stats["self_consistency_sequence_passes"] += sc_sequence_passes
            self._seconds["greedy_s"] += greedy_seconds
            self._seconds["self_consistency_s"] += sc_seconds
            drift = self._update_drift(confidence, state)
        if drift is not None:
            evidence["drift"] = drift.to_dict()
        if verdict is not None:
            evidence["novelty_threshold"] = verdict.novelty_threshold
            if verdict.window_report is not None:
                evidence["window_drift"] = verdict.window_report
        return GateDecision(
            answer=answer,
            answer_text=answer_text,
            confidence=confidence,
            action=action,
            accepted=bool(accepted),
            route="answer" if accepted else routing.fallback_strategy,
            certified=bool(certified),
            self_consistency=None if sc_result is None else {**sc_result.to_dict(), "agrees_with_greedy": sc_result.majority_answer == answer,
                                                               "min_agreement": routing.self_consistency.min_agreement},
            evidence=evidence,
            novelty=None if verdict is None else verdict.novelty,
            in_domain=True if verdict is None else verdict.in_domain,
            reason=reason,
        )

    def _update_drift(self, confidence: float, state: np.ndarray) -> DriftReport | None:
        """Tumbling window: every `monitoring.window` decisions, compare the window with the reference (lock held)."""
        if self.monitor is None:
            return None
        self._window_conf.append(confidence)
        state64 = np.asarray(state, dtype=np.float64)
        self._window_state_sum = state64.copy() if self._window_state_sum is None else self._window_state_sum + state64
        if len(self._window_conf) < self.monitor.window:
            return None
        mean = self._window_state_sum / len(self._window_conf)
        report = self.monitor.check(np.asarray(self._window_conf), mean if self.monitor.reference_embedding_mean is not None else None)
        self._window_conf, self._window_state_sum = [], None
        self.last_drift_report = report
        if report.alert and self.config.monitor.logging.alert_on_calibration_drift:
            logger.warning("calibration drift alert: %s", "; ".join(report.reasons))
        return report

    def stats(self) -> dict[str, Any]:
        """Decisions so far: actions, acceptance, and the measured self-consistency cost multiplier."""
        with self._lock:
            n = self._stats["n"]
            greedy, extra = self._stats["greedy_sequence_passes"], self._stats["self_consistency_sequence_passes"]
            greedy_s, extra_s = self._seconds["greedy_s"], self._seconds["self_consistency_s"]
            return {
                "n_decisions": n,
                "actions": {a: self._stats[f"action_{a}"] for a in ("generate", "fallback", "self_consistency")},
                "accepted_share": self._stats["accepted"] / n if n else None,
                "gray_zone_share": self._stats["action_self_consistency"] / n if n else None,
                "cost_multiplier": (greedy + extra) / greedy if greedy else None,
                "time_multiplier": (greedy_s + extra_s) / greedy_s if greedy_s else None,
                "cost_unit": "sequence-forward passes relative to the greedy answers alone",
                "self_consistency_k": self.self_consistency.k if self.self_consistency else None,
            }


# --------------------------------------------------------------------------------------------------- loading


@dataclass
class GateComponents:
    """Everything in a gate bundle except the model: enough for offline scoring and drift checks."""

    config: GateConfig
    probe: Probe
    calibrator: AnyCalibrator
    calibration: CalibrationBundle | None
    novelty: NoveltyModel | None = None

    def gate(self, loaded: Any) -> ReliabilityGate:
        cal = self.calibration
        return ReliabilityGate(
            loaded, self.probe, self.calibrator, self.config,
            risk_certificate=cal.risk_certificate if cal else None,
            signal_calibrators=cal.signal_calibrators if cal else None,
            drift_reference=cal.drift_reference if cal else None,
            novelty=self.novelty,
        )

    def confidences(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw probe score, calibrated confidence) for (n, d) states of the probe's layer and pooling."""
        raw = self.probe.score(states)
        return raw, self.calibrator.transform(raw)


def load_gate_components(
    config: GateConfig | str | Path, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> GateComponents:
    """Read the probe and calibration a config points to (paths relative to the config file)."""
    if not isinstance(config, GateConfig):
        config = load_gate_config(config)
    m = config.monitor
    if m.probe.path is None:
        raise GateConfigError("reliability_monitor.probe.path: the config names no probe directory")
    probe = load_probe(config.resolve(m.probe.path), expected_fingerprint, expected_hidden_size)
    calibration = None
    if m.probe.calibration_file is not None:
        calibration = CalibrationBundle.load(config.resolve(m.probe.calibration_file))
        if calibration.model_fingerprint != probe.info.model_fingerprint:
            raise GateError(
                f"reliability_monitor.probe.calibration_file: calibrated for model {calibration.model_fingerprint!r}, "
                f"but the probe is for model {probe.info.model_fingerprint!r}"
            )
        calibrator = calibration.probe_calibrator
    else:
        calibrator = TemperatureScaler(score_kind="prob", temperature=float(m.probe.temperature))
    novelty_dir = config.resolve(m.novelty.path)
    novelty = NoveltyModel.load(novelty_dir) if novelty_dir is not None else None
    return GateComponents(config, probe, calibrator, calibration, novelty)


def load_gate(config: GateConfig | str | Path, loaded: Any | None = None) -> ReliabilityGate:
    """A ready gate from a config (a bundle's gate.yaml); loads the model it names unless ``loaded`` is given."""
    if not isinstance(config, GateConfig):
        config = load_gate_config(config)
    if loaded is None:
        from vlmrel_core.engine.loading import load_vlm

        model = config.monitor.model
        if model is None:
            raise GateConfigError("reliability_monitor.model: the config names no model; pass a loaded model")
        loaded = load_vlm(config.model_source(), device=model.device, dtype=model.dtype,
                          attn_implementation=model.attn_implementation)
    components = load_gate_components(config, loaded.fingerprint, loaded.hidden_size)
    return components.gate(loaded)


# --------------------------------------------------------------------------------------------------- building


@dataclass
class GateBuild:
    """What `build_gate_from_run` produced; ``gate(loaded)`` assembles the runtime gate without touching disk."""

    config: GateConfig
    probe: Probe
    calibrator: AnyCalibrator
    calibration: CalibrationBundle
    report: dict[str, Any]
    out_dir: Path | None = None
    novelty: NoveltyModel | None = None

    def gate(self, loaded: Any) -> ReliabilityGate:
        return GateComponents(self.config, self.probe, self.calibrator, self.calibration, self.novelty).gate(loaded)


def _model_path_for_bundle(model_source: str, out_dir: Path | None) -> str:
    path = Path(model_source)
    if out_dir is None or not path.exists():
        return model_source
    return os.path.relpath(path.resolve(), out_dir.resolve())


def _gray_zone(
    gray_zone: tuple[float, float] | Literal["auto"] | None, threshold: float, halfwidth: float
) -> tuple[float, float] | None:
    if gray_zone is None:
        return None
    if gray_zone == "auto":
        low, high = max(0.0, threshold - halfwidth), min(1.0, threshold + halfwidth)
        return (round(low, 6), round(high, 6)) if high > low else None
    low, high = float(gray_zone[0]), float(gray_zone[1])
    return (low, high)


def _selective(correct: np.ndarray, kept: np.ndarray) -> dict[str, Any]:
    n_kept = int(kept.sum())
    errors = int((1 - correct[kept]).sum()) if n_kept else 0
    return {"coverage": n_kept / correct.size, "n_kept": n_kept, "n_errors": errors,
            "realised_risk": errors / n_kept if n_kept else None}


def build_gate_from_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    layer: int | None = None,
    pooling: str = "last_token",
    threshold: float | None = None,
    risk_target: float | None = None,
    delta: float = 0.1,
    calibration_method: CalibrationMethod = "temperature_scaling",
    gray_zone: tuple[float, float] | Literal["auto"] | None = "auto",
    gray_zone_halfwidth: float = DEFAULT_GRAY_ZONE_HALFWIDTH,
    gray_zone_action: str = "self_consistency_k5",
    fallback_strategy: str = "human_review",
    model_path: str | None = None,
    split: SplitSpec | None = None,
    seed: int = 0,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> GateBuild:
    """Fit a gate on a cached extraction run and (if ``out_dir``) write its bundle.

    Split (image-grouped, `splits.make_split`): the probe is fitted on train (C by grouped CV; ``layer=None`` picks
    the layer by training-split CV AUROC too), every calibrator (temperature scaling and isotonic, for the probe
    and each output signal) and the threshold on calibration, and every reported number is on test.
    Give ``threshold`` (calibrated confidence) or ``risk_target`` (+ ``delta``): the latter runs
    `risk.select_risk_threshold` on the calibration split's *raw* probe scores (candidates independent of the
    labels, so the Learn-then-Test guarantee holds as proved) and raises `UnreachableRiskTarget` when no
    threshold can be certified. ``gray_zone="auto"`` is the band threshold ± ``gray_zone_halfwidth``.
    """
    if (threshold is None) == (risk_target is None):
        raise ValueError("give exactly one of threshold (a calibrated confidence) or risk_target")
    if calibration_method not in ("temperature_scaling", "isotonic"):
        raise ValueError(f"calibration_method must be 'temperature_scaling' or 'isotonic', got {calibration_method!r}")
    reader = RunReader(run_dir)
    manifest = reader.manifest
    rows = reader.rows
    y = labels_of(rows)
    spec = split or SplitSpec("image", test_fraction=0.2, calibration_fraction=0.3, seed=seed)
    if spec.calibration_fraction <= 0:
        raise ValueError("the split needs a calibration part (calibration_fraction > 0)")
    parts = make_split(rows, spec)
    if layer is None:
        probe = select_layer_probe(reader, parts, poolings=[pooling], seed=seed, c_grid=c_grid)
    else:
        chosen = resolve_layers(manifest.n_layers, [layer])[0]
        if chosen not in manifest.layers:
            raise ValueError(f"layer {layer} was not extracted in {run_dir}; it has {manifest.layers}")
        probe = fit_run_probe(reader, pooling, [chosen], parts, seed, c_grid=c_grid)
    target_layer = probe.info.layers[0]
    states = reader.states(pooling, [target_layer])[:, 0]
    raw = probe.score(states)
    cal, test = parts.calibration, parts.test

    scores = {"probe": raw, **signal_scores(rows)}
    reports, fitted = calibrate_signals(
        {n: s[cal] for n, s in scores.items()}, y[cal], {n: s[test] for n, s in scores.items()}, y[test],
        probability_signals=("probe",),
    )
    calibrator = fitted["probe"][calibration_method]
    conf = calibrator.transform(raw)

    certificate: dict[str, Any] | None = None
    if risk_target is not None:
        try:
            chosen_rule: RiskThreshold = select_risk_threshold(raw[cal], y[cal], risk_target, delta)
        except UnreachableRiskTarget as err:
            raise UnreachableRiskTarget(
                f"cannot build a gate for {run_dir} at risk target {risk_target:g}: {err}",
                best_bound=err.best_bound, kept_samples_needed=err.kept_samples_needed,
            ) from None
        certificate = chosen_rule.to_dict()
        certificate["score"] = "raw probe score (rule: raw >= threshold)"
        certificate["calibrated_threshold"] = float(calibrator.transform(np.asarray([chosen_rule.threshold]))[0])
        gate_threshold = certificate["calibrated_threshold"]
        kept_test = raw[test] >= chosen_rule.threshold
    else:
        assert threshold is not None
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a calibrated confidence in [0, 1], got {threshold}")
        gate_threshold = float(threshold)
        kept_test = conf[test] >= gate_threshold
    zone = _gray_zone(gray_zone, gate_threshold, gray_zone_halfwidth)

    out_path = Path(out_dir) if out_dir is not None else None
    routing: dict[str, Any] = {
        "fallback_strategy": fallback_strategy,
        "gray_zone_action": gray_zone_action if zone is not None else "none",
    }
    if zone is not None:
        routing["gray_zone_bounds"] = list(zone)
    if risk_target is not None:
        routing["risk_target"] = {"max_risk": float(risk_target), "delta": float(delta)}
    else:
        routing["confidence_threshold"] = gate_threshold
    config_data = {
        "reliability_monitor": {
            "architecture": _fusion_name(manifest.fusion),
            "target_layer": int(target_layer),
            "model": {"path": _model_path_for_bundle(model_path or manifest.model_source, out_path),
                      "dtype": manifest.dtype if manifest.dtype in ("float32", "float16", "bfloat16") else "auto",
                      "attn_implementation": manifest.attn_implementation
                      if manifest.attn_implementation in ("eager", "sdpa", "flash_attention_2") else "eager"},
            "probe": {
                "hidden_dim": int(manifest.hidden_size),
                "dropout": 0.0,
                "calibration_method": calibration_method,
                **({"temperature": float(calibrator.temperature)} if isinstance(calibrator, TemperatureScaler) else {}),
                "path": BUNDLE_PROBE,
                "pooling": pooling,
                "calibration_file": BUNDLE_CALIBRATION,
            },
            "routing": routing,
            "novelty": {"path": BUNDLE_NOVELTY},
            "max_new_tokens": int(manifest.max_new_tokens),
            "normalization": manifest.normalization,
        }
    }
    config = parse_gate_config(config_data, source="build_gate_from_run", base_dir=out_path or Path.cwd())
    k = config.monitor.routing.self_consistency_k

    held_out = np.union1d(cal, test)
    # Novelty: the k-NN score beat Mahalanobis (Ledoit-Wolf and OAS) on the shift report's held-out AUROC.
    novelty = fit_novelty(states[parts.train], states[cal], "knn", seed=seed)
    drift_reference = DriftReference(conf[held_out], states[held_out].astype(np.float64).mean(axis=0),
                                     source=f"{run_dir}: calibration + test rows (n={held_out.size})")
    signal_calibrators = {
        name: fitted[name][OUTPUT_SIGNALS[name].default_method(calibration_method)] for name in fitted if name != "probe"
    }
    calibration = CalibrationBundle(
        model_fingerprint=manifest.model_fingerprint,
        probe_calibrator=calibrator,
        signal_calibrators=signal_calibrators,
        risk_certificate=certificate,
        drift_reference=drift_reference,
        alternatives={m: c.to_dict() for m, c in fitted["probe"].items() if m != calibration_method},
        provenance={"run_dir": str(run_dir), "dataset_hash": manifest.dataset_hash, "split": parts.summary()},
    )

    y_test = y[test]
    in_gray = (conf[test] >= zone[0]) & (conf[test] < zone[1]) if zone is not None else np.zeros(test.size, bool)
    curve = risk_coverage_curve(y_test, conf[test])
    probe_report = reports["probe"]
    report = {
        "run_dir": str(run_dir),
        "model_fingerprint": manifest.model_fingerprint,
        "model_source": manifest.model_source,
        "fusion": manifest.fusion,
        "layer": int(target_layer),
        "pooling": pooling,
        "layer_selection": "given" if layer is not None else "training-split grouped-CV AUROC",
        "probe": {"C": probe.info.C, "cv_auroc": probe.info.cv_auroc, "n_train": probe.info.n_train},
        "split": parts.summary(),
        "calibration_method": calibration_method,
        "temperature": float(calibrator.temperature) if isinstance(calibrator, TemperatureScaler) else None,
        "ece_before": probe_report["before"]["ece"],
        "ece_after": probe_report["after"][calibration_method]["ece"],
        "ece_after_by_method": {m: e["ece"] for m, e in probe_report["after"].items()},
        "test_auroc": probe_report["auroc"],
        "auroc_note": probe_report["auroc_note"],
        "threshold": gate_threshold,
        "threshold_source": "risk_target" if risk_target is not None else "confidence_threshold",
        "risk_certificate": certificate,
        "test": {**_selective(y_test, kept_test), "n": int(test.size), "accuracy": float(y_test.mean()),
                 "target_risk": risk_target, "aurc": area_under_risk_coverage(y_test, conf[test])},
        "risk_coverage_test": {k2: v[:: max(1, len(curve.thresholds) // 50)] for k2, v in curve.to_dict().items()},
        "gray_zone": list(zone) if zone is not None else None,
        "gray_zone_share_test": float(in_gray.mean()) if test.size else None,
        "expected_cost_multiplier": 1.0 + float(in_gray.mean()) * k if k and test.size else 1.0,
        "expected_cost_note": "1 + gray-zone share × K generations (estimated on test; the gate measures it live)",
        "calibration": reports,
        "calibration_summary": summary_table(reports),
    }
    report["novelty"] = {"method": novelty.method, "threshold": novelty.threshold,
                         "false_reject_rate_target": novelty.false_reject_rate,
                         "false_reject_rate_test": float(novelty.is_novel(states[test]).mean()) if test.size else None}
    build = GateBuild(config, probe, calibrator, calibration, report, out_path, novelty)
    if out_path is not None:
        write_gate_bundle(build, out_path)
    return build


def write_gate_bundle(build: GateBuild, out_dir: str | Path) -> Path:
    """gate.yaml + probe/ + calibration.json + report.json in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build.probe.save(out / BUNDLE_PROBE)
    build.calibration.save(out / BUNDLE_CALIBRATION)
    if build.novelty is not None:
        build.novelty.save(out / BUNDLE_NOVELTY)
    (out / BUNDLE_REPORT).write_text(json.dumps(build.report, indent=1, default=_json_default))
    dump_gate_config(build.config, out / BUNDLE_CONFIG)
    build.config.with_base_dir(out)
    build.out_dir = out
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------------- drift on runs


def _run_confidences(components: GateComponents, reader: RunReader, exclude_training_rows: bool) -> dict[str, Any]:
    probe = components.probe
    try:
        probe.check_manifest(reader.manifest)
    except ProbeError as err:
        raise ProbeError(f"{reader.run_dir}: {err}") from err
    layer = probe.info.layers[0]
    pooling = components.config.monitor.probe.pooling
    states = reader.states(pooling, [layer])[:, 0].astype(np.float64)
    rows = reader.rows
    keep = np.arange(len(rows))
    note = "all rows"
    spec = probe.info.split.get("spec") if isinstance(probe.info.split, dict) else None
    if exclude_training_rows and reader.manifest.dataset_hash == probe.info.dataset_hash and spec:
        parts = make_split(rows, SplitSpec.from_dict(spec))
        keep = np.setdiff1d(keep, parts.train)
        note = f"held-out rows only ({keep.size} of {len(rows)}): this run is the probe's training data"
    raw, conf = components.confidences(states[keep])
    correct = labels_of(rows)[keep] if "correct" in rows.columns else None
    return {"states": states[keep], "raw": raw, "confidence": conf, "correct": correct,
            "rows": rows.iloc[keep].reset_index(drop=True), "note": note}


def drift_between_runs(
    config: GateConfig | str | Path,
    reference_run: str | Path,
    current_run: str | Path,
    *,
    recalibrate_on_alert: bool | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """KL + KS on calibrated confidences and the mean-embedding shift of the probe layer, current vs reference.

    Rows a probe was trained on are left out of either run (their scores are in-sample). On an alert, when the
    current run has labels and ``recalibrate_on_alert`` (default: ``monitoring.retrain_trigger == 'auto'``), the
    probe's calibrator is refitted on one image-grouped half of the current run and judged on the other half.
    """
    components = load_gate_components(config) if not isinstance(config, GateComponents) else config
    m = components.config.monitor
    reference = _run_confidences(components, RunReader(reference_run), exclude_training_rows=True)
    current = _run_confidences(components, RunReader(current_run), exclude_training_rows=True)
    monitor = DriftMonitor(
        reference["confidence"], reference["states"], kl_threshold=m.monitoring.kl_divergence_threshold,
        window=m.monitoring.window, alpha=m.monitoring.ks_alpha,
        embedding_shift_threshold=m.monitoring.embedding_shift_threshold, bins=m.monitoring.bins,
    )
    report = monitor.check(current["confidence"], current["states"])
    windows = []
    w = m.monitoring.window
    for start in range(0, current["confidence"].size - w + 1, w):
        windows.append(monitor.check(current["confidence"][start : start + w], current["states"][start : start + w]).alert)
    result: dict[str, Any] = {
        "reference_run": str(reference_run),
        "current_run": str(current_run),
        "reference_rows": reference["note"],
        "current_rows": current["note"],
        "n_reference": int(reference["confidence"].size),
        "n_current": int(current["confidence"].size),
        "mean_confidence": {"reference": float(reference["confidence"].mean()), "current": float(current["confidence"].mean())},
        "thresholds": {"kl": m.monitoring.kl_divergence_threshold, "ks_alpha": m.monitoring.ks_alpha,
                       "embedding_shift": m.monitoring.embedding_shift_threshold},
        **report.to_dict(),
        "windows": {"size": w, "n": len(windows), "n_alert": int(sum(windows))},
        "recalibration": None,
    }
    if recalibrate_on_alert is None:
        recalibrate_on_alert = m.monitoring.retrain_trigger == "auto"
    if report.alert and recalibrate_on_alert:
        result["recalibration"] = _recalibrate_on(components, current, seed)
    return result


def _recalibrate_on(components: GateComponents, current: Mapping[str, Any], seed: int) -> dict[str, Any]:
    correct = current["correct"]
    if correct is None:
        return {"done": False, "reason": "the current run has no labels (correct column); label a sample to recalibrate"}
    rows = current["rows"]
    try:
        groups = group_keys(rows, "image")
    except ValueError:
        groups = np.arange(len(rows)).astype(str)
    fit_idx, eval_idx = holdout_indices(correct, groups, 0.5, seed)
    method = components.config.monitor.probe.calibration_method
    try:
        new = recalibrate(method, current["raw"][fit_idx], correct[fit_idx], score_kind="prob")
    except ValueError as err:
        return {"done": False, "reason": str(err)}
    old_conf = components.calibrator.transform(current["raw"][eval_idx])
    new_conf = new.transform(current["raw"][eval_idx])
    return {
        "done": True,
        "method": method,
        "n_fit": int(fit_idx.size),
        "n_eval": int(eval_idx.size),
        "ece_before": expected_calibration_error(correct[eval_idx], old_conf),
        "ece_after": expected_calibration_error(correct[eval_idx], new_conf),
        "calibrator": new.to_dict(),
        "note": "refitted on one image-grouped half of the current run, judged on the other; the risk threshold "
                "must be re-certified on labelled current data (vlmrel build-gate) before serving with it",
    }


def write_recalibrated_bundle(config: GateConfig | str | Path, calibrator: Mapping[str, Any], out_path: str | Path) -> Path:
    """A copy of the bundle's calibration file with the probe calibrator replaced (the certificate is dropped)."""
    components = load_gate_components(config) if not isinstance(config, GateComponents) else config
    if components.calibration is None:
        raise GateError("the config has no calibration_file to update")
    new = calibrator_from_dict(dict(calibrator))
    updated = CalibrationBundle(
        model_fingerprint=components.calibration.model_fingerprint,
        probe_calibrator=new,
        signal_calibrators=components.calibration.signal_calibrators,
        risk_certificate=None,
        drift_reference=None,
        alternatives={},
        provenance={**components.calibration.provenance, "recalibrated": True,
                    "note": "risk certificate and drift reference dropped: re-certify before using a risk target"},
    )
    return updated.save(out_path)


__all__ = [
    "BUNDLE_CALIBRATION", "BUNDLE_CONFIG", "BUNDLE_PROBE", "BUNDLE_REPORT", "CalibrationBundle", "DriftReference",
    "GateBuild", "GateComponents", "GateDecision", "GateError", "ReliabilityGate", "build_gate_from_run",
    "drift_between_runs", "load_gate", "load_gate_components", "write_gate_bundle", "write_recalibrated_bundle",
]
