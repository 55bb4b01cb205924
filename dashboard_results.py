"""Cached readers of the library's results for the analysis pages (Layer sweep, Calibration, Attention vs hidden
state, Neuron masking). Each wraps one `vlmrel_core.results` call in `st.cache_resource` (results are read-only
and shared by all sessions) with a spinner that says what it does; pages compute nothing themselves.
"""

from __future__ import annotations

import streamlit as st

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
