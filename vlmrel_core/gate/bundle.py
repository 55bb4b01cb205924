"""A gate bundle on disk: ``gate.yaml`` + ``probe/`` (safetensors + JSON) + ``calibration.json`` + ``report.json``.

Why a folder of plain files: a bundle is moved, inspected and diffed by people; nothing in it is pickled, and its
relative paths are resolved against the folder of ``gate.yaml`` so the whole folder can be moved.

A config is resolved once: public entry points accept a path or a parsed `GateConfig` (or already-loaded
`GateComponents`) and turn it into components a single time; everything below them takes the parsed objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from vlmrel_core.analysis.probes import Probe, load_probe
from vlmrel_core.gate.calibration import AnyCalibrator, TemperatureScaler, calibrator_from_dict
from vlmrel_core.gate.config import GateConfig, GateConfigError, dump_gate_config, load_gate_config
from vlmrel_core.gate.image_novelty import IMAGE_FILES
from vlmrel_core.gate.novelty import NoveltyModel
from vlmrel_core.gate.records import CalibrationBundle, GateError
from vlmrel_core.gate.runtime import ReliabilityGate
from vlmrel_core.io import write_json

BUNDLE_CONFIG = "gate.yaml"
BUNDLE_PROBE = "probe"
BUNDLE_CALIBRATION = "calibration.json"
BUNDLE_REPORT = "report.json"
BUNDLE_NOVELTY = "novelty"


@dataclass
class GateComponents:
    """Everything in a gate bundle except the model: enough for offline scoring and drift checks."""

    config: GateConfig
    probe: Probe
    calibrator: AnyCalibrator
    calibration: CalibrationBundle | None
    novelty: NoveltyModel | None = None  # absent in bundles built before the novelty guard: no OOD routing

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


GateSource = GateComponents | GateConfig | str | Path


def resolve_gate_config(config: GateConfig | str | Path) -> GateConfig:
    """A parsed config as is; a path read and validated (the only place a bundle's YAML is parsed)."""
    return config if isinstance(config, GateConfig) else load_gate_config(config)


def _read_components(
    config: GateConfig, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> GateComponents:
    m = config.monitor
    if m.probe.path is None:
        raise GateConfigError("reliability_monitor.probe.path: the config names no probe directory")
    probe = load_probe(config.resolve(m.probe.path, "probe.path"), expected_fingerprint, expected_hidden_size)
    calibration = None
    if m.probe.calibration_file is not None:
        calibration = CalibrationBundle.load(config.resolve(m.probe.calibration_file, "probe.calibration_file"))
        if calibration.model_fingerprint != probe.info.model_fingerprint:
            raise GateError(
                f"reliability_monitor.probe.calibration_file: calibrated for model {calibration.model_fingerprint!r}, "
                f"but the probe is for model {probe.info.model_fingerprint!r}"
            )
        calibrator = calibration.probe_calibrator
    else:
        calibrator = TemperatureScaler(score_kind="prob", temperature=float(m.probe.temperature))
    novelty_dir = config.resolve(m.novelty.path, "novelty.path")
    novelty = NoveltyModel.load(novelty_dir) if novelty_dir is not None else None
    if novelty is not None and m.novelty.image_statistics and novelty.image is None:
        raise GateError(
            f"reliability_monitor.novelty.image_statistics: true, but {novelty_dir} holds no image statistics "
            f"({' + '.join(IMAGE_FILES)}); rebuild the bundle (`vlmrel build-gate`, `vlmrel refresh-sample-data "
            "--only gates`) or set image_statistics: false")
    if novelty is not None and not m.novelty.image_statistics and novelty.image is not None:
        # Asked not to use them: the state score alone, at its own calibrated threshold (not the joint one).
        novelty = dataclasses.replace(novelty, image=None, threshold=float(novelty.info.get("state_only_threshold", novelty.threshold)))
    if novelty is not None and novelty.image is None and "image_classifier" in m.novelty.window_tests:
        raise GateError("reliability_monitor.novelty.window_tests: 'image_classifier' needs the bundle's image statistics")
    return GateComponents(config, probe, calibrator, calibration, novelty)


def load_gate_components(
    config: GateConfig | str | Path, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> GateComponents:
    """Read the probe and calibration a config points to (paths relative to the config file)."""
    return _read_components(resolve_gate_config(config), expected_fingerprint, expected_hidden_size)


def as_components(source: GateSource) -> GateComponents:
    """Loaded components as they are; a config or a path loaded once (callers pass the result further down)."""
    return source if isinstance(source, GateComponents) else load_gate_components(source)


def load_gate(config: GateConfig | str | Path, loaded: Any | None = None) -> ReliabilityGate:
    """A ready gate from a config (a bundle's gate.yaml); loads the model it names unless ``loaded`` is given."""
    config = resolve_gate_config(config)
    if loaded is None:
        from vlmrel_core.engine.loading import load_vlm

        model = config.monitor.model
        if model is None:
            raise GateConfigError("reliability_monitor.model: the config names no model; pass a loaded model")
        loaded = load_vlm(config.model_source(), device=model.device, dtype=model.dtype,
                          attn_implementation=model.attn_implementation)
    return _read_components(config, loaded.fingerprint, loaded.hidden_size).gate(loaded)


def write_gate_bundle(
    out_dir: str | Path, config: GateConfig, probe: Probe, calibration: CalibrationBundle, report: Mapping[str, Any],
    novelty: NoveltyModel | None = None,
) -> Path:
    """gate.yaml + probe/ + calibration.json + report.json (+ novelty/) in ``out_dir``; ``config`` is rebased onto it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe.save(out / BUNDLE_PROBE)
    calibration.save(out / BUNDLE_CALIBRATION)
    if novelty is not None:
        novelty.save(out / BUNDLE_NOVELTY)
    write_json(out / BUNDLE_REPORT, dict(report))
    dump_gate_config(config, out / BUNDLE_CONFIG)
    config.with_base_dir(out)
    return out


def write_recalibrated_bundle(config: GateSource, calibrator: Mapping[str, Any], out_path: str | Path) -> Path:
    """A copy of the bundle's calibration file with the probe calibrator replaced (the certificate is dropped)."""
    components = as_components(config)
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
    "BUNDLE_CALIBRATION", "BUNDLE_CONFIG", "BUNDLE_NOVELTY", "BUNDLE_PROBE", "BUNDLE_REPORT", "GateComponents", "GateSource", "as_components",
    "load_gate", "load_gate_components", "resolve_gate_config", "write_gate_bundle", "write_recalibrated_bundle",
]
