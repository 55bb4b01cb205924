"""vlmrel dashboard — ask the embedded (or your) VLM a question and see the gated, calibrated answer.

A thin view: every number comes from vlmrel_core (the gate bundle built by `vlmrel refresh-sample-data`, the
shipped report); nothing is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.images import load_image
from vlmrel_core.validation.questions import validate_question

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "sample_data"
FAMILIES = {"late fusion (LLaVA class)": "late_fusion", "early fusion (PaliGemma class)": "early_fusion"}

st.set_page_config(page_title="vlmrel", layout="wide")


@st.cache_resource(show_spinner="Loading model and gate…")
def load_gate_for(family: str):
    """One gate per model for all sessions: capture hooks are per call, tokenizer calls are serialised."""
    from vlmrel_core.gate.runtime import load_gate

    return load_gate(SAMPLE / "gates" / family / "gate.yaml")


def read_upload(data: bytes, name: str = "uploaded image") -> Image.Image:
    """The library's image validation (one pixel cap everywhere, bombs refused from the header); notes shown."""
    validated = load_image(data, name=name)
    for note in validated.notes:
        st.info(note)
    return validated.image


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
family_label = st.sidebar.radio("Model", list(FAMILIES))
family = FAMILIES[family_label]
gate_yaml = SAMPLE / "gates" / family / "gate.yaml"
if not gate_yaml.is_file():
    st.error(f"No gate bundle at {gate_yaml}. Build it with `vlmrel refresh-sample-data` (or `vlmrel build-gate`).")
    st.stop()

left, right = st.columns([1, 1])
with left:
    source = st.radio("Image", ["sample image", "upload"], horizontal=True)
    image: Image.Image | None = None
    if source == "upload":
        upload = st.file_uploader("PNG or JPEG", type=["png", "jpg", "jpeg"])
        if upload is not None:
            try:
                image = read_upload(upload.getvalue(), upload.name)
            except InputError as err:
                st.error(f"Cannot use this file: {err}")
    else:
        images = sorted((SAMPLE / "shapes_pope" / "images").glob("*.png"))[:40]
        if not images:
            st.error("sample_data/shapes_pope/images is empty; run `vlmrel generate-data`.")
            st.stop()
        choice = st.selectbox("Sample", [p.name for p in images])
        image = Image.open(SAMPLE / "shapes_pope" / "images" / choice).convert("RGB")
    question = st.text_input("Question", value="is there a red circle in the image?", max_chars=300)
    if image is not None:
        st.image(image.resize((256, 256), Image.NEAREST), caption="what the model sees (upscaled)")

with right:
    if image is not None and st.button("Ask", type="primary"):
        try:
            gate = load_gate_for(family)
            decision = gate.answer(image, validate_question(question))
        except InputError as err:
            st.error(f"Cannot ask this: {err}")
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
table7 = SAMPLE / "reports" / family / "table7.csv"
if table7.is_file():
    st.dataframe(pd.read_csv(table7), width="stretch", hide_index=True)
    report_md = SAMPLE / "reports" / family / "report.md"
    if report_md.is_file():
        with st.expander("Full report"):
            st.markdown(report_md.read_text())
else:
    st.warning(f"No report at {table7}; run `vlmrel refresh-sample-data`.")
