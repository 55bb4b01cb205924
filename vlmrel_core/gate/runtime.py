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
raw probe score >= the certified raw threshold (see `gate.fit.build_gate_from_run`). Gray-zone answers served by
self-consistency below the threshold are outside the certificate; each decision says whether it was certified.

Where the parts come from: `gate.bundle` loads a gate from a bundle, `gate.fit` fits one from a cached run,
`gate.batch` runs one over a dataset, `gate.records` holds the decision and calibration-file types.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
from PIL import Image

from vlmrel_core.analysis.probes import Probe, ProbeError
from vlmrel_core.engine.layers import resolve_layers
from vlmrel_core.gate.calibration import AnyCalibrator, TemperatureScaler
from vlmrel_core.gate.config import GateConfig, ReliabilityMonitorConfig
from vlmrel_core.gate.drift import DriftMonitor, DriftReport
from vlmrel_core.gate.image_novelty import images_features
from vlmrel_core.gate.novelty import NoveltyModel
from vlmrel_core.gate.ood_guard import OODGuard
from vlmrel_core.gate.records import Action, DriftReference, GateDecision, GateError
from vlmrel_core.gate.signal_calibration import signal_scores
from vlmrel_core.signals.consistency import SelfConsistencyConfig

if TYPE_CHECKING:
    from vlmrel_core.engine.run import Prefill

logger = logging.getLogger("vlmrel.gate")


def _as_config(config: GateConfig | ReliabilityMonitorConfig) -> GateConfig:
    return config if isinstance(config, GateConfig) else GateConfig(reliability_monitor=config)


def architecture_name(fusion: str) -> str:
    """The config's ``architecture`` value for a run's or adapter's ``fusion`` ("late" -> "late_fusion")."""
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
        expected_arch = architecture_name(loaded.adapter.fusion)
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
                keep_prefill=self.self_consistency is not None,  # gray-zone sampling starts from this prefill
                prefix_cache=self.loaded.prefix_cache,  # a later question about the same image skips its prefix
            )
            t1 = time.perf_counter()
            states = record.states[self.pooling][:, 0, :]
            # Image statistics of the images this call was handed (no model pass): the OOD guard's image score.
            features = (images_features(batch_images, self.ood.novelty.image.side)
                        if self.ood is not None and self.ood.novelty.image is not None else None)
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
                    record.n_forward_calls, shared, None if features is None else features[i], record.prefill, i,
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
        image_features: np.ndarray | None = None, prefill: Prefill | None = None, row: int = 0,
    ) -> GateDecision:
        m = self.config.monitor
        routing = m.routing
        where = self.route(confidence, raw)
        sc_result = None
        certified = self.threshold_source == "risk_target"
        if where == "gray_zone" and self.self_consistency is not None:
            from vlmrel_core.engine.self_consistency import sample_answers

            sc_result = sample_answers(self.loaded, image, question, self.self_consistency,
                                       max_new_tokens=m.max_new_tokens, normalization=m.normalization,
                                       prefill=None if prefill is None else prefill.row(row))
            action: Action = "self_consistency"
            accepted = (sc_result.majority_answer == answer and sc_result.agreement >= routing.self_consistency.min_agreement)
            certified = False
        elif where == "gray_zone":  # gray_zone_action "fallback"
            action, accepted = "fallback", False
        else:
            action, accepted = where, where == "generate"
        verdict = self.ood.observe(state, image_features) if self.ood is not None else None
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
            if image_features is not None:
                evidence["image_features"] = [float(v) for v in image_features]
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
            if verdict.image_novelty is not None and self.ood is not None and self.ood.novelty.image is not None:
                evidence["image_novelty"] = verdict.image_novelty
                evidence["image_novelty_threshold"] = float(self.ood.novelty.image.threshold)
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


__all__ = ["ReliabilityGate", "architecture_name"]
