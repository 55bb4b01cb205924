"""Neuron masking page: what happens to the answers when the dimensions the probe reads are zeroed, or the
patches the answer attends to are greyed? Each slider change re-runs the gate's held-out questions with the mask
and compares accuracy and confidence with the unmasked run (paired bootstrap CIs), late and early fusion side by
side. `VLMREL_MASKING_QUESTIONS` sets how many questions are re-run (default 300; the tests use a few)."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from dashboard_common import attempt, load_layer_probes_cached, sidebar_model_choice, streamlit_progress
from dashboard_results import (
    family_label, masking_baseline, masking_example, masking_question_count, masking_results,
)
from vlmrel_core.figures.interventions import live_masking_figure
from vlmrel_core.samples.catalog import FAMILIES, sample_catalog

WHICH = {"most-attended": "high", "least-attended": "low", "random": "random"}

st.title("Neuron masking — does the model use what the probe reads?")
choice = sidebar_model_choice()
if choice is None:
    st.stop()
n_questions = attempt("Reading VLMREL_MASKING_QUESTIONS", masking_question_count)
if n_questions is None:
    st.stop()

models = {choice.label: (str(choice.gate_yaml), choice.family)}
if choice.family is not None:
    compare = st.checkbox("Side by side with the other embedded model", value=True, key="masking_compare")
    if compare:
        for family in FAMILIES:
            if family != choice.family:
                other = attempt("Finding the other shipped gate", lambda f=family: sample_catalog().gate_config(f))
                if other is not None:
                    models[family_label(family)] = (str(other), family)

probes = {}
for label, (gate_yaml, _) in models.items():
    with streamlit_progress(f"Preparing the per-layer probes of {label}") as progress:
        found = attempt(f"Preparing the per-layer probes of {label}", lambda g=gate_yaml: load_layer_probes_cached(g, progress))
    if found is None:
        st.stop()
    probes[label] = found

primary = probes[choice.label]
controls = st.columns(4)
layer = controls[0].selectbox("Layer whose dimensions are zeroed", primary.layers, key="masking_layer",
                              index=primary.layers.index(primary.gate_layer))
top_k = controls[1].slider("Top-k probe dimensions zeroed", 0, 32, 0, key="masking_top_k",
                           help="The k dimensions with the largest |weight| in this layer's probe.")
random_fraction = controls[2].slider("Random share of dimensions zeroed", 0.0, 0.9, 0.0, 0.05, key="masking_random",
                                     help="A seeded random draw among the other dimensions: the control for top-k.")
patch_fraction = controls[3].slider("Share of image patches greyed", 0.0, 0.6, 0.0, 0.05, key="masking_patches")
which_label = st.radio("Which patches", list(WHICH), horizontal=True, key="masking_which",
                       help="Ranked by the unmasked answer's attention over the image (averaged over layers).")
which = WHICH[which_label]

from vlmrel_core.interventions.live import MaskSettings, paired_effect  # noqa: E402 (numbers only until a run)

settings = MaskSettings(layer=int(layer), top_k=int(top_k), random_fraction=float(random_fraction),
                        patch_fraction=float(patch_fraction), patch_which=which)
weights_of = {}
for label, (gate_yaml, family) in models.items():
    if layer not in probes[label].probes:
        st.error(f"{label} has no probe at layer {layer}; its layers are {probes[label].layers}.")
        st.stop()
    weights_of[label] = probes[label].probes[layer].coef.reshape(-1)
    with streamlit_progress(f"Unmasked pass over {n_questions} held-out questions on {label} (once)") as progress:
        if attempt(f"Running the unmasked pass on {label}", lambda g=gate_yaml, f=family: masking_baseline(
                g, f, n_questions, progress)) is None:
            st.stop()
start = time.perf_counter()
with st.spinner(f"Re-running {n_questions} held-out questions with the mask on {' and '.join(models)}…"):
    runs = attempt("Re-running the questions with the mask", lambda: masking_results(
        {label: (g, f, weights_of[label]) for label, (g, f) in models.items()}, n_questions, settings))
if runs is None:
    st.stop()
seconds = time.perf_counter() - start
effects = {label: paired_effect(base.result, masked) for label, (base, masked) in runs.items()}

st.plotly_chart(live_masking_figure(effects, f"{n_questions} held-out questions, masked vs unmasked"), width="stretch",
                key="masking_effect")
table = pd.concat([e.assign(model=label) for label, e in effects.items()], ignore_index=True)
st.dataframe(table[["model", "metric", "n", "unmasked", "masked", "delta", "ci_low", "ci_high"]].round(4),
             hide_index=True, width="stretch", key="masking_table")
st.caption("Δ = masked − unmasked on the same questions; 95% paired bootstrap CI (1,000 resamples). Confidence is "
           "the answer token's probability. "
           + f"This change: {seconds:.2f} s for {' and '.join(models)} together (a position already computed is "
           "reused; only what the mask changes is re-run).")

st.subheader("One question, before and after")
baseline = runs[choice.label][0]
index = st.selectbox("Question", range(len(baseline.samples)), key="masking_example",
                     format_func=lambda i: f"#{baseline.samples[i].sample_id} · {baseline.samples[i].question}")
sample = baseline.samples[index]
for label, (base, masked) in runs.items():
    if index >= len(base.samples):
        continue
    gate_yaml, family = models[label]
    example = attempt(f"Answering the question with the mask on {label}", lambda g=gate_yaml, f=family, l=label: masking_example(
        g, f, n_questions, settings, weights_of[l], index))
    if example is None:
        continue
    left, right = st.columns(2)
    left.metric(f"{label} — unmasked", base.result.answers[index] or "(empty)",
                delta=f"confidence {base.result.confidence[index]:.3f}", delta_color="off")
    right.metric(f"{label} — masked", example[0] or "(empty)", delta=f"confidence {example[1]:.3f}", delta_color="off")
st.caption(f"Question: {sample.question} · truth: {sample.label}")
if settings.patch_fraction > 0:
    from vlmrel_core.interventions.masking import mask_image_patches  # noqa: E402

    masked_image = attempt("Greying the patches", lambda: mask_image_patches(  # all images: the same random draws
        baseline.images, baseline.attention_maps, baseline.grids, settings.patch_fraction, settings.patch_which,
        settings.seed)[0][index])
    pictures = st.columns(2)
    pictures[0].image(baseline.images[index].resize((224, 224)), caption="unmasked")
    if masked_image is not None:
        pictures[1].image(masked_image.resize((224, 224)), caption=f"{settings.patch_fraction:.0%} {which_label} patches greyed "
                                                                  f"({choice.label})")
