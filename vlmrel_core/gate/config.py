"""The gate's YAML configuration: the seed design's `reliability_monitor` template, validated with pydantic.

Why strict (``extra="forbid"`` everywhere): a misspelt key in a deployed gate config (``gray_zone_bound``) would
otherwise be ignored silently and the gate would route with a default nobody chose. Every error names the field
path (``reliability_monitor.routing.gray_zone_bounds``) and, for an unknown key, the closest known one.

The seed template's keys are all accepted (``architecture``, ``target_layer``, ``probe{hidden_dim, dropout,
calibration_method, temperature}``, ``routing{confidence_threshold, fallback_strategy, gray_zone_bounds,
gray_zone_action}``, ``monitoring{drift_detection_interval, kl_divergence_threshold, retrain_trigger}``,
``logging{capture_states, log_confidence_distributions, alert_on_calibration_drift}``). Ours on top:
``model`` (path or HF id), ``probe.path``, ``probe.pooling``, ``probe.calibration_file``,
``routing.risk_target{max_risk, delta}`` (instead of a plain threshold), ``routing.self_consistency{...}``,
``monitoring.window`` (and the KS / embedding-shift settings of `drift.DriftMonitor`), ``max_new_tokens`` and
``normalization``. Relative paths are resolved against the YAML file's folder, so a bundle can be moved whole;
they must stay inside that folder unless ``allow_external_paths: true`` says otherwise (`validation.paths`).
The YAML is read by `validation.yaml_safe` (size cap, no anchors/aliases, no duplicate keys) and every number has
a range, so a config cannot ask for K = 100000 samples or 10^8 new tokens.

Semantics a reader of the template might not guess:
* ``probe.dropout`` is accepted for the template but unused: the probe is a logistic regression (no dropout).
* ``probe.hidden_dim`` / ``architecture`` / ``target_layer`` are checked against the loaded model and the probe;
  a mismatch is an error, not a silent override.
* Routing (c = calibrated confidence): with a gray zone [lo, hi) and a self-consistency action, lo <= c < hi runs
  self-consistency; otherwise c >= threshold answers ("generate") and c < threshold goes to the fallback. The
  threshold must lie inside the gray zone, so the zone is a band of doubt around the decision boundary.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from vlmrel_core.engine.layers import POOLINGS
from vlmrel_core.io import atomic_write_text
from vlmrel_core.validation.errors import InputError, excerpt
from vlmrel_core.validation.paths import resolve_inside
from vlmrel_core.validation.yaml_safe import load_yaml_file

TOP_KEY = "reliability_monitor"
_SC_ACTION = re.compile(r"^self_consistency_k(\d+)$")
_IDENTIFIER = r"^[A-Za-z][A-Za-z0-9_\-]*$"
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
MAX_SELF_CONSISTENCY_K = 64  # each sample is a full generate call: K=64 is already 64x the cost of an answer
MAX_NEW_TOKENS = 512  # a yes/no or short answer; 10^8 would generate until memory runs out


class GateConfigError(InputError):
    """A gate config that cannot be used; the message names the file and every bad field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelSection(_Strict):
    """Which model the gate runs. A bare string in the YAML (``model: path``) is read as ``{path: ...}``."""

    path: str = Field(min_length=1)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The probe was trained on states captured with the extraction's attention kernel; eager is load_vlm's default.
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "eager"


class ProbeSection(_Strict):
    hidden_dim: int | None = Field(default=None, gt=0, le=1_000_000)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # template key; unused by a logistic-regression probe
    calibration_method: Literal["temperature_scaling", "isotonic"] = "temperature_scaling"
    temperature: float | None = Field(default=None, gt=0.0, le=1000.0)
    path: str | None = Field(default=None, min_length=1)
    pooling: Literal[POOLINGS] = "last_token"  # type: ignore[valid-type]
    calibration_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _calibration_source(self) -> "ProbeSection":
        if self.calibration_method == "isotonic" and self.calibration_file is None:
            raise ValueError("calibration_file: calibration_method 'isotonic' needs a calibration file (its knots are data)")
        if self.calibration_method == "temperature_scaling" and self.temperature is None and self.calibration_file is None:
            raise ValueError("temperature: calibration_method 'temperature_scaling' needs a temperature or a calibration_file")
        return self


class RiskTarget(_Strict):
    """At most ``max_risk`` wrong answers among those kept, with probability >= 1 - ``delta`` (see risk.py)."""

    max_risk: float = Field(gt=0.0, lt=1.0)
    delta: float = Field(default=0.1, gt=0.0, lt=1.0)


class SelfConsistencySection(_Strict):
    """Sampling settings of the gray-zone action (K comes from ``gray_zone_action``); the paper's T and top-p."""

    temperature: float = Field(default=0.7, gt=0.0, le=10.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    # A gray-zone answer is served when the K samples' majority equals the greedy answer with at least this share.
    min_agreement: float = Field(default=0.8, ge=0.0, le=1.0)


class RoutingSection(_Strict):
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    risk_target: RiskTarget | None = None
    fallback_strategy: str = Field(default="human_review", pattern=_IDENTIFIER)
    gray_zone_bounds: tuple[float, float] | None = None
    gray_zone_action: str = "self_consistency_k5"
    self_consistency: SelfConsistencySection = Field(default_factory=SelfConsistencySection)

    @field_validator("gray_zone_bounds")
    @classmethod
    def _bounds(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is None:
            return value
        low, high = value
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"must be [low, high] with 0 <= low < high <= 1, got [{low}, {high}]")
        return value

    @field_validator("gray_zone_action")
    @classmethod
    def _action(cls, value: str) -> str:
        match = _SC_ACTION.match(value)
        if value in ("none", "fallback") or (match and 1 <= int(match.group(1)) <= MAX_SELF_CONSISTENCY_K):
            return value
        raise ValueError(f"must be 'none', 'fallback' or 'self_consistency_k<K>' with 1 <= K <= {MAX_SELF_CONSISTENCY_K} "
                         f"(e.g. self_consistency_k5), got {excerpt(value, 40)!r}")

    @model_validator(mode="after")
    def _threshold_or_target(self) -> "RoutingSection":
        if (self.confidence_threshold is None) == (self.risk_target is None):
            raise ValueError(
                "give exactly one of confidence_threshold (a plain threshold) or risk_target {max_risk, delta} "
                "(a certified threshold chosen by `vlmrel build-gate`)"
            )
        if self.confidence_threshold is not None:
            check_threshold_in_gray_zone(self.confidence_threshold, self.gray_zone_bounds)
        return self

    @property
    def self_consistency_k(self) -> int | None:
        """K of a ``self_consistency_k<K>`` gray-zone action, else None."""
        match = _SC_ACTION.match(self.gray_zone_action)
        return int(match.group(1)) if match else None


def check_threshold_in_gray_zone(threshold: float, bounds: tuple[float, float] | None) -> None:
    if bounds is not None and not bounds[0] <= threshold <= bounds[1]:
        raise ValueError(
            f"confidence_threshold: {threshold:g} lies outside gray_zone_bounds [{bounds[0]:g}, {bounds[1]:g}]; "
            "the gray zone is a band around the threshold"
        )


class MonitoringSection(_Strict):
    drift_detection_interval: Literal["per_window", "hourly", "daily", "weekly", "monthly"] = "weekly"
    kl_divergence_threshold: float = Field(default=0.15, gt=0.0, le=100.0)
    retrain_trigger: Literal["auto", "manual", "off"] = "manual"
    window: int = Field(default=200, ge=2, le=1_000_000)
    ks_alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    embedding_shift_threshold: float = Field(default=0.05, gt=0.0, le=2.0)  # a cosine distance lies in [0, 2]
    bins: int = Field(default=10, ge=1, le=1000)


class NoveltySection(_Strict):
    """Out-of-distribution guard (`gate.novelty`, `gate.drift_tests`): per-input novelty score and window tests.

    An input whose novelty score exceeds the bundle's threshold goes to the fallback ("out of distribution",
    never certified). While a window of ``window`` inputs is in alarm no decision is certified, and ``on_alarm``
    says what else happens: ``flag`` (serve as routed, uncertified), ``fallback`` (route everything to the
    fallback) or ``recalibrate`` (fallback, and the gate asks for a labelled sample to recalibrate on).
    ``image_statistics``: also score each input's image statistics (`gate.image_novelty`; the bundle's
    ``image_novelty.*`` files, thresholds set jointly with the state score) — a bundle without them is an error.
    Window tests run at ``alpha`` / (number of tests) each (Bonferroni); ``image_classifier`` needs image statistics.
    """

    path: str | None = Field(default=None, min_length=1)  # folder with novelty.json + novelty.safetensors
    route_novel: bool = True
    image_statistics: bool = True
    window_tests: list[Literal["classifier", "mmd", "novelty_rate", "image_classifier"]] = Field(
        default_factory=lambda: ["classifier", "novelty_rate"], min_length=1)
    window: int = Field(default=200, ge=20, le=100_000)
    alpha: float = Field(default=0.01, gt=0.0, lt=0.5)
    on_alarm: Literal["flag", "fallback", "recalibrate"] = "flag"

    @model_validator(mode="after")
    def _image_tests(self) -> "NoveltySection":
        if "image_classifier" in self.window_tests and not self.image_statistics:
            raise ValueError("window_tests: 'image_classifier' tests image statistics; set image_statistics: true")
        if len(set(self.window_tests)) != len(self.window_tests):
            raise ValueError(f"window_tests: each test once, got {self.window_tests}")
        return self


class LoggingSection(_Strict):
    capture_states: bool = False  # put the probe-layer state vector in each decision's evidence
    log_confidence_distributions: bool = True  # keep a tumbling window of confidences and drift-check it
    alert_on_calibration_drift: bool = True  # log a warning when a window's drift check alerts


class ReliabilityMonitorConfig(_Strict):
    architecture: Literal["early_fusion", "late_fusion"]
    target_layer: int = Field(ge=-4096, le=4096)
    model: ModelSection | None = None
    probe: ProbeSection
    routing: RoutingSection
    monitoring: MonitoringSection = Field(default_factory=MonitoringSection)
    novelty: NoveltySection = Field(default_factory=NoveltySection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    max_new_tokens: int = Field(default=8, ge=1, le=MAX_NEW_TOKENS)
    normalization: Literal["lenient", "strict"] = "lenient"
    allow_external_paths: bool = False  # the model / probe / calibration paths may leave the config's folder

    @field_validator("model", mode="before")
    @classmethod
    def _model_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class GateConfig(_Strict):
    """The whole file: one ``reliability_monitor`` mapping. ``base_dir`` resolves its relative paths."""

    reliability_monitor: ReliabilityMonitorConfig
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def monitor(self) -> ReliabilityMonitorConfig:
        return self.reliability_monitor

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def with_base_dir(self, base_dir: str | Path) -> "GateConfig":
        self._base_dir = Path(base_dir)
        return self

    def resolve(self, path: str | None, what: str = "path") -> Path | None:
        """A path from the config, relative against the config file's folder and confined to it unless
        ``allow_external_paths`` is set (absolute paths likewise)."""
        if path is None:
            return None
        try:
            return resolve_inside(self._base_dir, path, f"{TOP_KEY}.{what}", self.monitor.allow_external_paths)
        except InputError as err:
            raise GateConfigError(str(err)) from None

    def model_source(self) -> str:
        """The model path resolved against the config folder (confined like every path), or the string as given
        when it is an HF id (``org/name``) and no such local path exists."""
        model = self.monitor.model
        if model is None:
            raise GateConfigError(f"{TOP_KEY}.model: no model path in the config; pass a loaded model instead")
        resolved = self.resolve(model.path, "model.path")
        if resolved is not None and resolved.exists():
            return str(resolved)
        if _HF_ID.match(model.path) and not model.path.startswith("."):
            return model.path
        raise GateConfigError(f"{TOP_KEY}.model.path: {excerpt(model.path, 120)} is neither a folder ({resolved}) "
                              "nor a model id like org/name")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"]) or TOP_KEY
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            parent = _model_at(item["loc"][:-1])
            known = list(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            message = f"unknown key{f' (did you mean {close[0]!r}?)' if close else ''}; allowed: {', '.join(known)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
            field, _, rest = message.partition(": ")
            parent = _model_at(item["loc"])
            if rest and parent is not None and field in parent.model_fields:
                loc, message = f"{loc}.{field}", rest
        else:
            message = f"{message} (got {excerpt(repr(item.get('input')), 60)})"
        lines.append(f"  {excerpt(loc, 120)}: {message}")
    return f"invalid gate config {source}:\n" + "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by walking field names from GateConfig (for 'did you mean' hints)."""
    model: type[BaseModel] = GateConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model


def parse_gate_config(data: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> GateConfig:
    """Validate a mapping already read from YAML/JSON; raises GateConfigError naming each bad field path."""
    if not isinstance(data, dict) or TOP_KEY not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise GateConfigError(f"invalid gate config {source}: the top-level key must be {TOP_KEY!r}, found {excerpt(keys, 120)}")
    try:
        config = GateConfig.model_validate(data)
    except ValidationError as err:
        raise GateConfigError(_format_errors(err, source)) from None
    return config.with_base_dir(base_dir if base_dir is not None else Path.cwd())


def load_gate_config(path: str | Path) -> GateConfig:
    """Read a gate YAML strictly (`validation.yaml_safe`: safe tags only, no aliases, no duplicate keys, size cap)
    and validate it."""
    path = Path(path)
    if not path.is_file():
        raise GateConfigError(f"gate config not found: {path}")
    try:
        data = load_yaml_file(path)
    except InputError as err:
        raise GateConfigError(str(err)) from None
    return parse_gate_config(data, source=str(path), base_dir=path.resolve().parent)


def dump_gate_config(config: GateConfig, path: str | Path) -> Path:
    """Write the config as YAML, atomically (safe_dump of plain types; unset optional keys are left out)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
