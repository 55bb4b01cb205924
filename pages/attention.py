"""Attention vs hidden state page: does where the answer looks predict correctness as well as what the hidden state
holds? Attention signals (H, H_s, C_k, ΔH_s at a chosen layer) against the gate probe's score on the gate's held-out
rows, each with AUROC / R_pb and 95% CI; pick a point (or a question) to see its image, attention and answer."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard_common import attempt, sidebar_model_choice
from dashboard_results import attention_rows, family_report, signal_association
from vlmrel_core.figures.attention import attention_overlay, attention_probe_scatter, selected_id
from vlmrel_core.validation.images import load_image
from vlmrel_core.results.attention_probe import ATTENTION_SIGNAL_KEYS, signal_label

MEAN_MAP_LABEL = "layer-mean map"
SIGNAL_WORDS = {"entropy": "attention entropy H", "spatial_entropy": "spatial entropy H_s",
                "cluster_count": "cluster count C_k", "delta_spatial_entropy": "sharpening ΔH_s"}

st.title("Attention vs hidden state")
st.caption("Each point is one held-out question of the gate's training run (its test split): x = an attention "
           "signal of the answer position's map over the image, y = the gate probe's P(correct) from the hidden state.")
choice = sidebar_model_choice()
if choice is None:
    st.stop()
gate_yaml = str(choice.gate_yaml)
loaded = attempt("Computing the attention signals", lambda: attention_rows(gate_yaml, choice.family))
if loaded is None:
    st.stop()
run, table = loaded

left, middle = st.columns(2)
key = left.selectbox("Attention signal", ATTENTION_SIGNAL_KEYS, key="attn_signal", format_func=SIGNAL_WORDS.get)
layer_options = [MEAN_MAP_LABEL, *table.layers]
layer_choice = middle.selectbox("Layer", layer_options, key="attn_signal_layer",
                                help="A decoder layer's map, or the map averaged over layers (ΔH_s: the last layer "
                                     "against the one before) as in the report's Table 7.")
layer = None if layer_choice == MEAN_MAP_LABEL else int(layer_choice)
values = attempt("Reading the signal", lambda: table.signal(key, layer))
if values is None:
    st.stop()

chart, numbers = st.columns([1, 1], gap="large")
with numbers:
    st.subheader("How well each predicts correctness")
    records = []
    for name, at in ((key, layer), ("probe", None)):
        found = attempt(f"Scoring {signal_label(name, at)}", lambda n=name, l=at: signal_association(gate_yaml, choice.family, n, l))
        if found is not None:
            records.append({"signal": ("−" if name != "probe" else "") + signal_label(name, at),
                            "AUROC [95% CI]": f"{found.auroc.value:.3f} [{found.auroc.low:.3f}, {found.auroc.high:.3f}]",
                            "R_pb [95% CI]": f"{found.r_pb.value:.3f} [{found.r_pb.low:.3f}, {found.r_pb.high:.3f}]",
                            "n": found.n})
    st.dataframe(pd.DataFrame(records), hide_index=True, width="stretch", key="attn_association")
    st.caption("Attention signals are negated (focused attention = predicted correct), as in the report; 0.5 AUROC "
               "and 0 R_pb are chance. Bootstrap CIs over these rows.")
    if choice.family is not None and layer is None:
        report = attempt("Reading the shipped report", lambda: family_report(choice.family))
        if report is not None:
            report_key = "attention_delta_spatial_entropy" if key == "delta_spatial_entropy" else f"attention_{key}"
            row = attempt("Reading Table 7", lambda: report.signal(report_key, f"{choice.family}/adversarial"))
            if row is not None:
                st.caption(f"Shipped report (its own image-grouped test split, n={int(row['n_test'])}): "
                           f"{row['signal']} AUROC {row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}].")

ids = table.rows.tolist()
figure = attention_probe_scatter(values, table.probe_score, table.correct, signal_label(key, layer),
                                 title=f"{signal_label(key, layer)} vs probe score", ids=ids)
with chart:
    event = st.plotly_chart(figure, width="stretch", key="attn_scatter", on_select="rerun", selection_mode="points")
points = (event or {}).get("selection", {}).get("points", []) if event else []
picked = next((selected_id(figure, p.get("curve_number", -1), p.get("point_index", -1)) for p in points), None)
if picked is not None and picked in ids:
    st.session_state["attn_sample"] = picked

st.subheader("One question")
rows = run.rows
if st.session_state.get("attn_sample") not in ids:  # another model's rows: start from its first question
    st.session_state.pop("attn_sample", None)
sample = st.selectbox("Question (or click a point above)", ids, key="attn_sample",
                      format_func=lambda i: f"#{rows.iloc[i]['sample_id']} · {rows.iloc[i]['question']} "
                                            f"({'correct' if rows.iloc[i]['correct'] else 'wrong'})")
record = rows.iloc[sample]
position = ids.index(sample)
info, picture = st.columns([1, 2], gap="large")
with info:
    st.markdown(f"**Question:** {record['question']}")
    st.metric("Answer", str(record["answer_text"]).strip() or "(empty)",
              delta="correct" if record["correct"] else f"wrong (truth: {record['label']})",
              delta_color="normal" if record["correct"] else "inverse")
    st.metric("Probe P(correct)", f"{table.probe_score[position]:.3f}")
    st.metric(signal_label(key, layer), f"{values[position]:.3f}")
with picture:
    grid = attempt("Reading the attention map", lambda: run.attention_map(sample, layer))
    image = attempt("Opening the image", lambda: load_image(run.image_path(sample)).image)
    if grid is not None and image is not None:
        st.plotly_chart(attention_overlay(image, grid, title=f"Answer→image attention ({layer_choice if layer is None else f'layer {layer}'})"),
                        width="stretch", key="attn_overlay")
