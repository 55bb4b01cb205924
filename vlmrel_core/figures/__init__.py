"""Plotly figures built from the library's own results (`vlmrel_core.results`); no I/O except html_report.

Every builder takes loaded results (or plain arrays) and returns a `plotly.graph_objects.Figure`, so the
dashboard and the HTML report draw the same pictures.
"""

from vlmrel_core.figures.attention import attention_overlay, attention_probe_scatter, border_mask
from vlmrel_core.figures.calibration import confidence_gauge, reliability_figure, risk_coverage_figure
from vlmrel_core.figures.html_report import render_html, report_figures, write_html_report
from vlmrel_core.figures.interventions import condition_label, live_masking_figure, masking_effect_figure
from vlmrel_core.figures.layers import layer_signals_figure, layer_sweep_figure, logit_lens_figure, probe_score_strip
from vlmrel_core.figures.monitoring import drift_figure
from vlmrel_core.figures.signals import table7_figure

__all__ = [
    "attention_overlay", "attention_probe_scatter", "border_mask", "condition_label", "confidence_gauge", "drift_figure",
    "layer_signals_figure", "layer_sweep_figure", "live_masking_figure", "logit_lens_figure", "masking_effect_figure", "probe_score_strip",
    "reliability_figure", "render_html", "report_figures", "risk_coverage_figure", "table7_figure", "write_html_report",
]
