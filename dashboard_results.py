"""Cached readers of the library's results for the analysis pages (Layer sweep, Calibration, Attention vs hidden
state, Neuron masking). Each wraps one `vlmrel_core.results` call in `st.cache_resource` (results are read-only
and shared by all sessions) with a spinner that says what it does; pages compute nothing themselves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from vlmrel_core.validation.errors import int_setting
from vlmrel_core.samples.catalog import FAMILIES, FAMILY_SPECS, sample_catalog

GROUPINGS = {"held-out images": "image", "held-out items": "item"}


def family_label(family: str) -> str:
    return FAMILY_SPECS[family].label


@st.cache_resource(show_spinner="Reading the shipped report (sweep, Table 7, layer signals)…")
def family_report(family: str):
    from vlmrel_core.results.report import load_report

    return load_report(sample_catalog().report_dir(family))


@st.cache_resource(show_spinner="Computing the logit-lens margins per layer…")
def lens_curves(family: str, run: str):
    from vlmrel_core.results.shipped import load_shipped_run

    return load_shipped_run(family, run).lens_curves()


@st.cache_resource(show_spinner="Reading the gate bundle (probe, calibrators, report)…")
def gate_bundle(gate_yaml: str):
    from vlmrel_core.results.gate import load_gate_bundle

    return load_gate_bundle(gate_yaml)


@st.cache_resource(show_spinner="Re-deriving the gate's calibration and test rows from its training run…")
def split_scores(gate_yaml: str):
    from vlmrel_core.results.gate_splits import gate_split_scores

    return gate_split_scores(gate_bundle(gate_yaml))


@st.cache_resource(show_spinner="Bootstrapping ECE / MCE / Brier confidence intervals…")
def calibration_cis(gate_yaml: str, method: str):
    from vlmrel_core.results.gate_splits import calibration_metric_cis

    confidence, correct = split_scores(gate_yaml).test_rows(method)
    return calibration_metric_cis(correct, confidence)


@st.cache_resource(show_spinner="Computing attention signals (H, H_s, C_k, ΔH_s) for the gate's test rows…")
def attention_rows(gate_yaml: str, family: str | None):
    """The gate's test rows with attention features; shipped runs resolve their images inside the catalog."""
    from vlmrel_core.results.attention_probe import attention_probe_rows
    from vlmrel_core.results.runs import load_run

    scores = split_scores(gate_yaml)
    image_root = sample_catalog().pope_dir() if family is not None else None
    run = load_run(scores.run_dir, image_root=image_root)
    return run, attention_probe_rows(run, scores)


@st.cache_resource(show_spinner="Bootstrapping AUROC and R_pb confidence intervals…")
def signal_association(gate_yaml: str, family: str | None, key: str, layer: int | None):
    return attention_rows(gate_yaml, family)[1].association(key, layer)


def run_names(family: str) -> list[str]:
    """The sweep's runs of one family, without the family prefix ('adversarial', 'random', ...)."""
    return [name.split("/", 1)[1] for name in family_report(family).sweep.runs()]


# --------------------------------------------------------------------------------------------- live masking

MASKING_QUESTIONS_ENV = "VLMREL_MASKING_QUESTIONS"  # how many held-out questions the masking page re-runs (tests: few)
DEFAULT_MASKING_QUESTIONS = 300


def masking_question_count() -> int:
    return int_setting(MASKING_QUESTIONS_ENV, DEFAULT_MASKING_QUESTIONS, minimum=2)


@dataclass
class _MaskingSlot:
    """Per gate bundle and question count, for all sessions: the unmasked pass and every masked result so far."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    baseline: object | None = None
    masked: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # (settings, question index) -> full masked answer, confidence


@st.cache_resource(show_spinner=False)
def _masking_slot(gate_yaml: str, n_questions: int) -> _MaskingSlot:
    return _MaskingSlot()


def masking_baseline(gate_yaml: str, family: str | None, n_questions: int, progress=None):
    """The unmasked pass over the gate's first ``n_questions`` held-out questions (computed once, then kept).
    Runs outside `st.cache_resource` so it can draw a progress bar."""
    from dashboard_common import load_gate_cached
    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.interventions.live import live_baseline
    from vlmrel_core.results.gate_splits import held_out_samples
    from vlmrel_core.results.runs import load_run

    slot = _masking_slot(gate_yaml, n_questions)
    with slot.lock:
        if slot.baseline is None:
            scores = split_scores(gate_yaml)
            run = load_run(scores.run_dir)
            dataset = sample_catalog().dataset("adversarial") if family is not None else Path(run.manifest.dataset_path)
            samples = held_out_samples(scores, run, load_vqa_jsonl(dataset), n_questions)
            loaded = load_gate_cached(gate_yaml).loaded
            slot.baseline = live_baseline(loaded, samples, progress=progress)
        return slot.baseline


def masking_results(jobs: dict, n_questions: int, settings) -> dict:
    """Every model's (baseline, masked pass) for one slider position: label -> (gate_yaml, family, probe weights).
    Positions computed before are reused; the others run for all models at once (`run_masked_in_parallel`).
    The baselines must exist (`masking_baseline`, with its progress bar)."""
    from dashboard_common import load_gate_cached
    from vlmrel_core.interventions.live import run_masked_in_parallel

    out, todo = {}, {}
    for label, (gate_yaml, family, weights) in jobs.items():
        baseline = masking_baseline(gate_yaml, family, n_questions)
        slot = _masking_slot(gate_yaml, n_questions)
        with slot.lock:
            known = slot.masked.get(settings)
        if known is not None:
            out[label] = (baseline, known)
        else:
            todo[label] = (load_gate_cached(gate_yaml).loaded, baseline, settings, weights)
    for label, result in run_masked_in_parallel(todo).items():
        slot = _masking_slot(jobs[label][0], n_questions)
        with slot.lock:
            out[label] = (todo[label][1], slot.masked.setdefault(settings, result))
    return {label: out[label] for label in jobs}


def masking_example(gate_yaml: str, family: str | None, n_questions: int, settings, probe_weights, index: int):
    """One question's full masked answer text and confidence (the fast pass keeps only the deciding first word)."""
    from dashboard_common import load_gate_cached
    from vlmrel_core.interventions.live import masked_answer

    baseline = masking_baseline(gate_yaml, family, n_questions)
    slot = _masking_slot(gate_yaml, n_questions)
    with slot.lock:
        key = (settings, int(index))
        if key not in slot.examples:
            slot.examples[key] = masked_answer(load_gate_cached(gate_yaml).loaded, baseline, settings, probe_weights,
                                               int(index))
        return slot.examples[key]
