"""Fit a gate on a cached extraction run: probe on train, calibrators and the threshold on calibration, every
reported number on test; then (optionally) write the bundle.

Why from a cached run: fitting needs only the stored states, answers and labels, so a gate is rebuilt in seconds
without the model. The gate's config is built as the pydantic `GateConfig` directly (validated on construction),
not as a YAML-shaped dict that is parsed again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import ValidationError

from vlmrel_core.analysis.metrics import area_under_risk_coverage, risk_coverage_curve
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, Probe, fit_run_probe, select_layer_probe
from vlmrel_core.analysis.splits import SplitSpec, labels_of, make_split
from vlmrel_core.engine.layers import resolve_layers
from vlmrel_core.engine.store import RunManifest, RunReader
from vlmrel_core.gate.bundle import BUNDLE_CALIBRATION, BUNDLE_NOVELTY, BUNDLE_PROBE, GateComponents, write_gate_bundle
from vlmrel_core.gate.calibration import AnyCalibrator, CalibrationMethod, TemperatureScaler
from vlmrel_core.gate.config import (
    GateConfig,
    GateConfigError,
    ModelSection,
    NoveltySection,
    ProbeSection,
    ReliabilityMonitorConfig,
    RiskTarget,
    RoutingSection,
)
from vlmrel_core.gate.image_novelty import fit_image_novelty, run_image_features
from vlmrel_core.gate.novelty import NoveltyModel
from vlmrel_core.gate.novelty_choice import NoveltyChoice, fit_chosen_novelty, shifted_run_states
from vlmrel_core.gate.records import CalibrationBundle, DriftReference
from vlmrel_core.gate.risk import RiskThreshold, UnreachableRiskTarget, select_risk_threshold
from vlmrel_core.gate.runtime import ReliabilityGate, architecture_name
from vlmrel_core.gate.signal_calibration import OUTPUT_SIGNALS, calibrate_signals, signal_scores, summary_table
from vlmrel_core.progress import Progress, report as report_progress

DEFAULT_GRAY_ZONE_HALFWIDTH = 0.075
STATE_WINDOW_TESTS: tuple[str, ...] = ("classifier", "novelty_rate")
# With image statistics: the image classifier test sees JPEG / blur / background shifts the states barely show.
IMAGE_WINDOW_TESTS: tuple[str, ...] = ("classifier", "novelty_rate", "image_classifier")
_STAGES = 4  # probe, calibration, threshold, report (+ bundle)


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

    def components(self) -> GateComponents:
        return GateComponents(self.config, self.probe, self.calibrator, self.calibration, self.novelty)

    def gate(self, loaded: Any) -> ReliabilityGate:
        return self.components().gate(loaded)

    def write(self, out_dir: str | Path) -> Path:
        """Write the bundle to ``out_dir`` and remember it there (the config's relative paths resolve against it)."""
        self.out_dir = write_gate_bundle(out_dir, self.config, self.probe, self.calibration, self.report,
                                         self.novelty)
        return self.out_dir


def _model_path_for_bundle(model_source: str, out_dir: Path | None) -> str:
    path = Path(model_source)
    if out_dir is None or not path.exists():
        return model_source
    return os.path.relpath(path.resolve(), out_dir.resolve())


def _leaves_folder(path_text: str, out_dir: Path | None) -> bool:
    """Whether a bundle path (as written into gate.yaml) names an existing path outside the bundle folder."""
    base = (out_dir or Path.cwd()).resolve()
    candidate = (Path(path_text) if Path(path_text).is_absolute() else base / path_text).resolve()
    return candidate.exists() and not candidate.is_relative_to(base)


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


def _gate_config(
    manifest: RunManifest, target_layer: int, pooling: str, calibration_method: CalibrationMethod,
    calibrator: AnyCalibrator, routing: RoutingSection, model_path: str, out_dir: Path | None,
    image_statistics: bool = True,
) -> GateConfig:
    """The bundle's config as validated pydantic objects; relative paths resolve against ``out_dir``."""
    model_path_text = _model_path_for_bundle(model_path, out_dir)
    model = ModelSection(
        path=model_path_text,
        dtype=manifest.dtype if manifest.dtype in ("float32", "float16", "bfloat16") else "auto",
        attn_implementation=manifest.attn_implementation
        if manifest.attn_implementation in ("eager", "sdpa", "flash_attention_2") else "eager",
    )
    probe = ProbeSection(
        hidden_dim=int(manifest.hidden_size), dropout=0.0, calibration_method=calibration_method,
        temperature=float(calibrator.temperature) if isinstance(calibrator, TemperatureScaler) else None,
        path=BUNDLE_PROBE, pooling=pooling, calibration_file=BUNDLE_CALIBRATION,
    )
    monitor = ReliabilityMonitorConfig(
        architecture=architecture_name(manifest.fusion), target_layer=int(target_layer), model=model, probe=probe,
        routing=routing, max_new_tokens=int(manifest.max_new_tokens), normalization=manifest.normalization,
        novelty=NoveltySection(path=BUNDLE_NOVELTY, image_statistics=image_statistics,
                               window_tests=list(IMAGE_WINDOW_TESTS if image_statistics else STATE_WINDOW_TESTS)),
        # a model outside the bundle (the shipped bundles point at sample_data/models) must be allowed explicitly
        allow_external_paths=_leaves_folder(model_path_text, out_dir),
    )
    return GateConfig(reliability_monitor=monitor).with_base_dir(out_dir or Path.cwd())


def _routing(
    gate_threshold: float, zone: tuple[float, float] | None, risk_target: float | None, delta: float,
    gray_zone_action: str, fallback_strategy: str,
) -> RoutingSection:
    return RoutingSection(
        fallback_strategy=fallback_strategy,
        gray_zone_action=gray_zone_action if zone is not None else "none",
        gray_zone_bounds=zone,
        risk_target=RiskTarget(max_risk=float(risk_target), delta=float(delta)) if risk_target is not None else None,
        confidence_threshold=None if risk_target is not None else gate_threshold,
    )


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
    novelty_method: NoveltyChoice = "knn",
    novelty_shifted_runs: Sequence[str | Path] = (),
    layer_probes: bool = True,
    image_statistics: bool | None = None,
    image_root: str | Path | None = None,
    progress: Progress | None = None,
) -> GateBuild:
    """Fit a gate on a cached extraction run and (if ``out_dir``) write its bundle.

    Split (image-grouped, `splits.make_split`): the probe is fitted on train (C by grouped CV; ``layer=None`` picks
    the layer by training-split CV AUROC too), every calibrator (temperature scaling and isotonic, for the probe
    and each output signal) and the threshold on calibration, and every reported number is on test.
    Give ``threshold`` (calibrated confidence) or ``risk_target`` (+ ``delta``): the latter runs
    `risk.select_risk_threshold` on the calibration split's *raw* probe scores (candidates independent of the
    labels, so the Learn-then-Test guarantee holds as proved) and raises `UnreachableRiskTarget` when no
    threshold can be certified. ``gray_zone="auto"`` is the band threshold ± ``gray_zone_halfwidth``.
    ``novelty_method="auto"`` picks the novelty score by held-out AUROC against ``novelty_shifted_runs``
    (`gate.novelty_choice`); the choice and the comparison go into the report. With ``out_dir`` and
    ``layer_probes`` the bundle also ships a probe per layer for the Inspect strip (`inspection.layer_probe_file`).
    ``image_statistics`` also fits
    the image-statistics novelty score (`gate.image_novelty`) on the run's images (read relative to ``image_root``,
    default the dataset JSONL's folder), with both thresholds set jointly for the same false-reject rate; ``None``
    fits it when the run's rows name their images (an ``image`` column; an unreadable image is then an error) and
    says so in the config (``novelty.image_statistics``) and the report.
    """
    if (threshold is None) == (risk_target is None):
        raise ValueError("give exactly one of threshold (a calibrated confidence) or risk_target")
    if calibration_method not in ("temperature_scaling", "isotonic"):
        raise ValueError(f"calibration_method must be 'temperature_scaling' or 'isotonic', got {calibration_method!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a calibrated confidence in [0, 1], got {threshold}")
    if novelty_method not in ("knn", "mahalanobis", "auto"):
        raise ValueError(f"novelty_method must be 'knn', 'mahalanobis' or 'auto', got {novelty_method!r}")
    if novelty_method == "auto" and not novelty_shifted_runs:
        raise ValueError("novelty_method='auto' needs novelty_shifted_runs (shifted extractions to measure against)")
    reader = RunReader(run_dir)
    manifest = reader.manifest
    rows = reader.rows
    if image_statistics is None:
        image_statistics = "image" in rows.columns
    y = labels_of(rows)
    spec = split or SplitSpec("image", test_fraction=0.2, calibration_fraction=0.3, seed=seed)
    if spec.calibration_fraction <= 0:
        raise ValueError("the split needs a calibration part (calibration_fraction > 0)")
    parts = make_split(rows, spec)
    total = _STAGES + (out_dir is not None)
    report_progress(progress, 0, total, "fit probe" if layer is not None else "select layer and fit probe")
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

    report_progress(progress, 1, total, "calibrate probe and output signals")
    scores = {"probe": raw, **signal_scores(rows)}
    reports, fitted = calibrate_signals(
        {n: s[cal] for n, s in scores.items()}, y[cal], {n: s[test] for n, s in scores.items()}, y[test],
        probability_signals=("probe",),
    )
    calibrator = fitted["probe"][calibration_method]
    conf = calibrator.transform(raw)

    report_progress(progress, 2, total, "certify threshold" if risk_target is not None else "threshold")
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
        gate_threshold = float(threshold)
        kept_test = conf[test] >= gate_threshold
    zone = _gray_zone(gray_zone, gate_threshold, gray_zone_halfwidth)

    out_path = Path(out_dir) if out_dir is not None else None
    try:
        routing = _routing(gate_threshold, zone, risk_target, delta, gray_zone_action, fallback_strategy)
        config = _gate_config(manifest, target_layer, pooling, calibration_method, calibrator, routing,
                              model_path or manifest.model_source, out_path, image_statistics)
    except ValidationError as err:
        raise GateConfigError(f"build_gate_from_run: these arguments make an invalid gate config:\n{err}") from None
    k = config.monitor.routing.self_consistency_k

    report_progress(progress, 3, total, "held-out report")
    held_out = np.union1d(cal, test)
    # Novelty: by default k-NN, which beat Mahalanobis (Ledoit-Wolf and OAS) on the shift report's held-out AUROC
    # (late fusion; early fusion was a near tie); threshold set on the calibration split (see gate.novelty).
    shifted = (shifted_run_states(novelty_shifted_runs, manifest.model_fingerprint, pooling, target_layer)
               if novelty_shifted_runs else {})
    novelty, novelty_selection = fit_chosen_novelty(states[parts.train], states[cal], states[test], novelty_method,
                                                    shifted, seed=seed)
    features = None
    if image_statistics:
        features = run_image_features(reader, image_root)
        novelty.attach_image(fit_image_novelty(features[parts.train], features[cal],
                                               false_reject_rate=novelty.false_reject_rate, seed=seed))
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
    test_features = None if features is None else features[test]
    report["novelty"] = {"method": novelty.method, "threshold": novelty.threshold,
                         "false_reject_rate_target": novelty.false_reject_rate,
                         "false_reject_rate_test": float(novelty.is_novel(states[test], test_features).mean()) if test.size else None,
                         "selection": novelty_selection}
    if novelty.image is not None and test_features is not None:
        report["novelty"]["image_statistics"] = {
            "threshold": novelty.image.threshold, "per_score_rate": novelty.info.get("joint_per_score_rate"),
            "false_reject_rate_test_state": float((novelty.score(states[test]) > novelty.threshold).mean()) if test.size else None,
            "false_reject_rate_test_image": float((novelty.image.score(test_features) > novelty.image.threshold).mean()) if test.size else None,
            **novelty.image.info}
    build = GateBuild(config, probe, calibrator, calibration, report, novelty=novelty)
    if out_path is not None:
        report_progress(progress, 4, total, "write bundle")
        build.write(out_path)
        if layer_probes:  # the Inspect strip's probe per layer, so no first Ask has to fit them
            from vlmrel_core.inspection.layer_probe_file import write_bundle_layer_probes

            write_bundle_layer_probes(build.probe, run_dir, out_path, seed=seed,
                                      progress=lambda d, t, stage="": report_progress(progress, 4, total, f"write bundle: {stage}"))
    report_progress(progress, total, total, "done")
    return build


__all__ = ["DEFAULT_GRAY_ZONE_HALFWIDTH", "GateBuild", "build_gate_from_run"]
