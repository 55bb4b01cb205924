"""What every dashboard page shares: the cached model/gate loaders, the sidebar model choice, a progress bar for
library jobs, and the one way a library error reaches the user (a single `st.error`, never a traceback box).

Pages stay thin: they call these helpers and `vlmrel_core`, and compute nothing themselves.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import streamlit as st

from vlmrel_core.progress import Progress
from vlmrel_core.samples.catalog import FAMILY_SPECS, SampleDataError, sample_catalog

ROOT = Path(__file__).resolve().parent
LOCAL_BUNDLE = "a local checkpoint folder (gate bundle)"
CACHE_ENV = "VLMREL_CACHE_DIR"  # where fitted per-layer probes are kept between sessions
LAYER_PROBE_CACHE = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlmrel") / "layer_probes"
T = TypeVar("T")


@dataclass(frozen=True)
class ModelChoice:
    """The sidebar's answer: which gate bundle (gate.yaml, naming its model) the pages use."""

    label: str
    gate_yaml: Path
    family: str | None  # an embedded family name, None for a local bundle


# --------------------------------------------------------------------------------------------- errors


# Library errors that already say what is wrong in words (module, class). Looked up in sys.modules only: an
# error of a class whose module was never imported cannot occur, and importing torch to format a message would not do.
WORDED_ERRORS = (
    ("vlmrel_core.validation.errors", "InputError"), ("vlmrel_core.gate.config", "GateConfigError"),
    ("vlmrel_core.gate.records", "GateError"), ("vlmrel_core.analysis.probes", "ProbeError"),
    ("vlmrel_core.engine.loading", "ModelLoadError"), ("vlmrel_core.engine.store", "CacheError"),
    ("vlmrel_core.engine.adapters.base", "AdapterError"), ("vlmrel_core.data.loader", "DatasetError"),
    ("vlmrel_core.inspection.layer_probes", "LayerProbeError"), ("vlmrel_core.samples.catalog", "SampleDataError"),
    ("vlmrel_core.inspection.report_quotes", "ReportQuoteError"), ("vlmrel_core.results.files", "ResultsError"),
)


def _message(err: BaseException) -> str:
    """Library errors in their own words; anything else keeps its type name for a bug report."""
    for module_name, class_name in WORDED_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(err, getattr(module, class_name)):
            return str(err)
    return f"{type(err).__name__}: {err}"


def show_error(what: str, err: BaseException) -> None:
    """One red message: what was being done, and the library's words for what went wrong."""
    st.error(f"{what} failed — {_message(err)}", icon=":material/error:")


def attempt(what: str, action: Callable[[], T]) -> T | None:
    """Run ``action``; on any error show one `st.error` and return None (the page carries on without it)."""
    try:
        return action()
    except Exception as err:  # every failure must reach the user as a message, not a traceback
        show_error(what, err)
        return None


# --------------------------------------------------------------------------------------------- progress


@contextmanager
def streamlit_progress(label: str) -> Iterator[Progress]:
    """A `vlmrel_core.progress.Progress` callback drawn as an `st.progress` bar (removed when the job ends)."""
    bar = st.progress(0.0, text=label)

    def update(done: int, total: int, stage: str = "") -> None:
        fraction = min(max(done / total, 0.0), 1.0) if total else 1.0
        bar.progress(fraction, text=f"{label} — {stage}" if stage else label)

    try:
        yield update
    finally:
        bar.empty()


# --------------------------------------------------------------------------------------------- loaders


@st.cache_resource(show_spinner="Loading the model and its gate…")
def load_gate_cached(gate_yaml: str):
    """One gate (and model) per bundle for all sessions. Safe to share: the library's capture hooks are per call,
    tokenizer/processor calls go through the model's `processor_lock` (an HF fast tokenizer is not thread-safe),
    and the gate's counters and drift window are guarded by its own lock."""
    from vlmrel_core.gate.bundle import load_gate

    return load_gate(gate_yaml)


@dataclass
class _LayerProbeSlot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    probes: object | None = None


@st.cache_resource(show_spinner=False)
def _layer_probe_slot(gate_yaml: str) -> _LayerProbeSlot:
    """One slot per bundle for all sessions. The fit runs outside the cached function so it can draw a progress
    bar (elements drawn inside a cached function are replayed on later hits, into a page that no longer has them)."""
    return _LayerProbeSlot()


def load_layer_probes_cached(gate_yaml: str, progress: Progress | None = None):
    """Per-layer probes for the Inspect strip: the ones the bundle ships, else fitted once per bundle (then read
    from the on-disk cache)."""
    from vlmrel_core.gate.bundle import load_gate_components
    from vlmrel_core.inspection.layer_probe_file import layer_probes_for_bundle
    from vlmrel_core.inspection.layer_probes import training_run_dir

    slot = _layer_probe_slot(gate_yaml)
    with slot.lock:
        if slot.probes is None:
            components = load_gate_components(gate_yaml)
            provenance = components.calibration.provenance if components.calibration is not None else {}
            bundle_dir = Path(gate_yaml).resolve().parent
            slot.probes = layer_probes_for_bundle(
                bundle_dir, components.probe, lambda: training_run_dir(provenance, [ROOT, bundle_dir]),
                LAYER_PROBE_CACHE, progress=progress)
        return slot.probes


# --------------------------------------------------------------------------------------------- sidebar


def sidebar_model_choice() -> ModelChoice | None:
    """The model radio (embedded late/early fusion, or a local bundle folder); None with a message if unusable."""
    options = [spec.label for spec in FAMILY_SPECS.values()] + [LOCAL_BUNDLE]
    label = st.sidebar.radio("Model", options, key="model_choice",
                             help="The embedded tiny VLMs ship with a gate bundle; a local checkpoint needs one too "
                                  "(`vlmrel build-gate` writes gate.yaml beside its probe and calibration).")
    if label == LOCAL_BUNDLE:
        folder = st.sidebar.text_input("Gate bundle folder (holds gate.yaml)", key="local_bundle").strip()
        if not folder:
            st.sidebar.info("Type the folder of a gate bundle; its gate.yaml names the model checkpoint.")
            return None
        gate_yaml = Path(folder).expanduser() / "gate.yaml"
        if not gate_yaml.is_file():
            st.error(f"No gate.yaml in {folder}. Build one with `vlmrel build-gate --run <run> --out {folder}`.")
            return None
        return ModelChoice(label, gate_yaml.resolve(), None)
    family = next(name for name, spec in FAMILY_SPECS.items() if spec.label == label)
    gate_yaml = attempt("Finding the shipped gate bundle", lambda: sample_catalog().gate_config(family))
    return None if gate_yaml is None else ModelChoice(label, gate_yaml, family)


@st.cache_data(show_spinner=False)
def shipped_questions(split: str = "adversarial", limit: int = 60) -> list[dict]:
    """The first ``limit`` labelled questions of a shipped split: id, image path, question, ground truth."""
    from vlmrel_core.data.loader import load_vqa_jsonl

    samples = load_vqa_jsonl(sample_catalog().dataset(split))[:limit]
    return [{"id": s.sample_id, "image": str(s.image_path), "question": s.question, "label": s.label} for s in samples]
