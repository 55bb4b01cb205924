"""Inspect page: ask one question about one image and look inside the answer — calibrated confidence, routing and
its reason, the probe at every layer, the answer position's attention over the image, and what each step cost."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard_common import (
    attempt, load_gate_cached, load_layer_probes_cached, shipped_questions, show_error, sidebar_model_choice,
    streamlit_progress,
)
from vlmrel_core.inspection.images import load_image_bytes
from vlmrel_core.samples.catalog import sample_catalog

SAMPLE, UPLOAD = "shipped sample", "upload"
ACTION_LABEL = {"generate": "serve", "fallback": "fallback", "self_consistency": "gray zone → self-consistency"}

st.title("Inspect — will this answer be right?")
choice = sidebar_model_choice()
if choice is None:
    st.stop()

questions = attempt("Reading the shipped questions", shipped_questions) or []


def _use_sample_question() -> None:
    row = next((q for q in questions if q["id"] == st.session_state.get("sample")), None)
    if row is not None:
        st.session_state["question"] = row["question"]


left, right = st.columns([1, 1], gap="large")
with left:
    source = st.radio("Image", [SAMPLE, UPLOAD], horizontal=True, key="image_source")
    image, image_id, truth = None, None, None
    if source == SAMPLE and questions:
        by_id = {q["id"]: q for q in questions}
        sample_id = st.selectbox("Shipped question (adversarial split)", list(by_id), key="sample",
                                 format_func=lambda i: f"#{i} · {by_id[i]['question']} (truth: {by_id[i]['label']})",
                                 on_change=_use_sample_question)
        st.session_state.setdefault("question", by_id[sample_id]["question"])
        row = by_id[sample_id]
        image = attempt("Opening the sample image", lambda: load_image_bytes(open(row["image"], "rb").read(), row["image"]))
        image_id, truth = f"sample:{sample_id}", row["label"]
    elif source == UPLOAD:
        upload = st.file_uploader("An image (PNG or JPEG)", key="upload")
        if upload is not None:
            image = attempt(f"Reading {upload.name}", lambda: load_image_bytes(upload.getvalue(), upload.name))
            image_id = f"upload:{upload.file_id}"
    question = st.text_input("Question", key="question", max_chars=300,
                             placeholder="is there a red circle in the image?").strip()
    if image is not None:
        st.image(image.resize((256, 256)), caption="what the model sees (upscaled)" + (f" · truth: {truth}" if truth else ""))
    asked = st.button("Ask", type="primary", key="ask", disabled=image is None or not question)

signature = (str(choice.gate_yaml), image_id, question)
if asked and image is not None and question:
    from vlmrel_core.inspection.explain import inspect_question  # torch/transformers: only once someone asks

    gate = attempt("Loading the model and gate", lambda: load_gate_cached(str(choice.gate_yaml)))
    if gate is not None:
        with streamlit_progress("Preparing the per-layer probes") as progress:
            probes = attempt("Preparing the per-layer probes",
                             lambda: load_layer_probes_cached(str(choice.gate_yaml), progress=progress))
        try:
            st.session_state["inspection"] = (signature, inspect_question(gate, probes, image, question), image)
        except Exception as err:  # shown as one message; the page stays usable
            show_error("Asking the gate", err)
            st.session_state.pop("inspection", None)

stored = st.session_state.get("inspection")
if stored is None or stored[0] != signature:
    with right:
        st.info("Pick or upload an image, type a question and press **Ask**.")
    st.stop()

from vlmrel_core.inspection.attention_view import hide_sinks, sink_mask, sink_summary  # noqa: E402 (after the first draw)
from vlmrel_core.inspection.explain import routing_reason  # noqa: E402
from vlmrel_core.inspection.report_quotes import headline_quote  # noqa: E402
from vlmrel_core.figures.attention import attention_overlay  # noqa: E402
from vlmrel_core.figures.calibration import confidence_gauge  # noqa: E402
from vlmrel_core.figures.layers import probe_score_strip  # noqa: E402

_, inspection, shown_image = stored
decision = inspection.decision
ev = decision.evidence
with right:
    a, c, r = st.columns(3)
    a.metric("Answer", decision.answer_text or "(empty)")
    c.metric("Confidence", f"{decision.confidence:.3f}")
    r.metric("Routing", ACTION_LABEL.get(decision.action, decision.action),
             delta="served" if decision.accepted else f"→ {decision.route}",
             delta_color="normal" if decision.accepted else "inverse")
    st.markdown(f"**Why:** {routing_reason(decision)}")
    st.plotly_chart(confidence_gauge(decision.confidence, ev["threshold"], ev["gray_zone"]), width="stretch", key="gauge")
    st.caption("Black line: the gate's threshold; shaded band: the gray zone where self-consistency decides.")
    if decision.self_consistency:
        sc = decision.self_consistency
        st.markdown(f"**Self-consistency:** {sc['k']} sampled answers (T={sc['temperature']}, top-p={sc['top_p']})")
        st.dataframe(pd.DataFrame({"sample": range(1, len(sc["samples"]) + 1), "answer": sc["samples_text"],
                                   "normalised": sc["samples"]}), hide_index=True, key="sc_samples")

st.subheader("The probe at every layer")
if inspection.layer_scores:
    strip_layers = sorted(inspection.layer_scores)
    st.plotly_chart(probe_score_strip(strip_layers, [inspection.layer_scores[l] for l in strip_layers],
                                      inspection.gate_layer, title="Probe P(correct) at each layer (outlined: the gate's)"),
                    width="stretch", key="layer_strip")
    st.caption(f"Each cell: a probe fitted on that layer's states (same training rows as the gate's), raw P(correct). "
               f"The gate reads layer {inspection.gate_layer} (raw {ev['raw_probe_score']:.3f}, calibrated "
               f"{decision.confidence:.3f}).")
else:
    st.warning("No per-layer probes for this gate (see the message above); the gate's own layer is in the evidence.")

st.subheader("Where the answer position looks")
if inspection.attention is None:
    st.info(inspection.attention_note or "no attention map")
else:
    layers = inspection.attention.layers
    controls, picture = st.columns([1, 2])
    with controls:
        layer = st.select_slider("Layer", options=layers, value=inspection.gate_layer if inspection.gate_layer in layers else layers[-1],
                                 key="attn_layer")
        hide = st.checkbox("Hide attention sinks", key="hide_sinks",
                           help="Cells holding more than 10× the uniform share soak up the map; hiding them shows the rest.")
        hide_border = st.checkbox("Hide the border patches", key="hide_border",
                                  help="Sinks (register-like patches) often sit on the image border; blank its outer ring.")
        grid = inspection.attention.grid(layer)
        summary = sink_summary(grid)
        st.caption(summary.sentence())
        if choice.family is not None:
            quote = attempt("Reading the shipped report", lambda: headline_quote(
                sample_catalog().report_file(choice.family, "report.json"), f"{choice.family}/adversarial"))
            if quote is not None:
                st.markdown(f"**How little attention predicts:** held-out AUROC of the attention map's spatial entropy "
                            f"for correctness is **{quote.attention_auroc}** (0.5 = chance), against "
                            f"**{quote.probe_auroc}** for the probe (shipped report, {quote.run}, image-grouped split).")
    with picture:
        drawn = hide_sinks(grid, sink_mask(grid)) if hide and summary.n_sinks else grid
        st.plotly_chart(attention_overlay(shown_image.resize((256, 256)), drawn, mask_border_sinks=hide_border,
                                          title=f"answer-position attention, layer {layer}"), key="attention")

st.subheader("Time of each step")
st.dataframe(pd.DataFrame({"step": list(inspection.timings), "seconds": [round(v, 4) for v in inspection.timings.values()]}),
             hide_index=True, key="timings")
st.caption("gate_* steps are the production path (one generate call); the inspection pass re-runs the model capturing "
           "every layer and the attention, which production does not pay.")
