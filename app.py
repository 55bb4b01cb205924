"""vlmrel dashboard — ask the embedded (or your) VLM a question and see the gated, calibrated answer.

A thin view: every number comes from vlmrel_core (the gate bundle built by `vlmrel refresh-sample-data`, the
shipped report); nothing is computed here.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image, UnidentifiedImageError

from vlmrel_core.samples.catalog import FAMILY_SPECS, SampleDataError, sample_catalog

SAMPLES = sample_catalog()
FAMILY_BY_LABEL = {spec.label: name for name, spec in FAMILY_SPECS.items()}
MAX_UPLOAD_PIXELS = 4096 * 4096

st.set_page_config(page_title="vlmrel", layout="wide")


@st.cache_resource(show_spinner="Loading model and gate…")
def load_gate_for(family: str):
    """One gate per model for all sessions: capture hooks are per call, tokenizer calls are serialised."""
    from vlmrel_core.gate.runtime import load_gate

    return load_gate(SAMPLES.gate_config(family))


def read_upload(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_UPLOAD_PIXELS:
            raise ValueError(f"image is {image.width}x{image.height}; the limit is {MAX_UPLOAD_PIXELS:,} pixels")
        return image.convert("RGB")


def confidence_gauge(confidence: float, threshold: float | None, gray_zone: list[float] | None) -> go.Figure:
    steps = []
    if gray_zone:
        steps.append({"range": gray_zone, "color": "#f3e3b5"})
    figure = go.Figure(go.Indicator(
        mode="gauge+number", value=confidence,
        gauge={"axis": {"range": [0, 1]}, "steps": steps,
               "threshold": {"line": {"color": "black", "width": 3}, "value": threshold} if threshold is not None else None},
        title={"text": "calibrated P(correct)"},
    ))
    figure.update_layout(height=260, margin={"t": 40, "b": 10, "l": 20, "r": 20})
    return figure


st.title("vlmrel — will this answer be right?")
family_label = st.sidebar.radio("Model", list(FAMILY_BY_LABEL))
family = FAMILY_BY_LABEL[family_label]
try:
    SAMPLES.gate_config(family)
except SampleDataError as err:
    st.error(f"{err} (or build one with `vlmrel build-gate`).")
    st.stop()

left, right = st.columns([1, 1])
with left:
    source = st.radio("Image", ["sample image", "upload"], horizontal=True)
    image: Image.Image | None = None
    if source == "upload":
        upload = st.file_uploader("PNG or JPEG", type=["png", "jpg", "jpeg"])
        if upload is not None:
            try:
                image = read_upload(upload.getvalue())
            except (UnidentifiedImageError, OSError, ValueError) as err:
                st.error(f"Cannot use this file: {err}")
    else:
        try:
            images = SAMPLES.sample_images(limit=40)
        except SampleDataError as err:
            st.error(str(err))
            st.stop()
        choice = st.selectbox("Sample", [p.name for p in images])
        image = Image.open(SAMPLES.images_dir() / choice).convert("RGB")
    question = st.text_input("Question", value="is there a red circle in the image?", max_chars=300)
    if image is not None:
        st.image(image.resize((256, 256), Image.NEAREST), caption="what the model sees (upscaled)")

with right:
    if image is not None and question.strip() and st.button("Ask", type="primary"):
        try:
            gate = load_gate_for(family)
            decision = gate.answer(image, question.strip())
        except Exception as err:  # a model/gate failure must show, never crash the session
            st.error(f"The gate failed: {type(err).__name__}: {err}")
        else:
            routing = gate.config.monitor.routing if hasattr(gate, "config") else None
            st.metric("Answer", decision.answer_text or "(empty)")
            action_text = {"generate": "serve the answer", "fallback": f"fallback → {decision.route}",
                           "self_consistency": "gray zone → self-consistency"}.get(decision.action, decision.action)
            st.metric("Routing", action_text)
            evidence = decision.evidence
            st.plotly_chart(confidence_gauge(decision.confidence, evidence.get("threshold"),
                                             list(routing.gray_zone_bounds) if routing and routing.gray_zone_bounds else None),
                            width="stretch")
            if decision.self_consistency:
                sc = decision.self_consistency
                st.write(f"Self-consistency: agreement {sc.get('agreement'):.2f} over {len(sc.get('samples', []))} samples, "
                         f"majority **{sc.get('majority_answer')}**")
            with st.expander("Evidence (layer, probe score, output signals, timings)"):
                st.json(json.loads(json.dumps(decision.to_dict(), default=str)))

st.divider()
st.subheader("Where reliability lives in this model (held-out, shipped report)")
try:
    table7 = SAMPLES.report_file(family, "table7.csv")
    report_md = SAMPLES.report_file(family, "report.md")
except SampleDataError as err:
    st.warning(str(err))
else:
    st.dataframe(pd.read_csv(table7), width="stretch", hide_index=True)
    with st.expander("Full report"):
        st.markdown(report_md.read_text())
