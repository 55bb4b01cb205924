"""`report.html`: a self-contained page of a report folder's figures (plotly.js inlined once), beside report.md.

Why from the written folder and not the in-memory Report: the page then shows exactly what the files say, and
any report folder (shipped or old) can be re-rendered with the same function.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from vlmrel_core.figures.layers import layer_signals_figure, layer_sweep_figure
from vlmrel_core.figures.signals import table7_figure
from vlmrel_core.io import atomic_write_text
from vlmrel_core.results.report import ReportResults, load_report

HTML_NAME = "report.html"


def report_figures(report: ReportResults, grouping: str = "image") -> list[tuple[str, list[go.Figure]]]:
    """Per run: Table 7 forest plot, the layer sweep (with reference signals), and the per-layer signals."""
    sections = []
    sweep_runs = set(report.sweep.runs())
    for run in report.summary.runs:
        figures = []
        if not report.table7[(report.table7["run"] == run.name) & (report.table7["grouping"] == grouping)].empty:
            figures.append(table7_figure(report.table7, run.name, grouping))
        if run.name in sweep_runs:
            figures.append(layer_sweep_figure(report.sweep, run.name, grouping, table7=report.table7))
        if not report.layer_signals.empty and (report.layer_signals["run"] == run.name).any():
            figures.append(layer_signals_figure(report.layer_signals, run.name))
        sections.append((run.name, figures))
    return sections


def render_html(sections: Sequence[tuple[str, Sequence[go.Figure]]], title: str, intro: Sequence[str] = ()) -> str:
    """One HTML page: plotly.js inlined with the first figure only, every later figure reuses it."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>",
             "<body style='font-family: sans-serif; max-width: 1100px; margin: auto'>", f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in intro]
    first = True
    for heading, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for figure in figures:
            parts.append(figure.to_html(full_html=False, include_plotlyjs=True if first else False))
            first = False
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html_report(report_dir: str | Path, out_path: str | Path | None = None, grouping: str = "image") -> Path:
    """Read a report folder back and write its figures to ``report.html`` (default: inside the folder)."""
    report = load_report(report_dir)
    out = Path(out_path) if out_path is not None else Path(report_dir) / HTML_NAME
    intro = [claim.claim.sentence for claim in report.summary.runs]
    page = render_html(report_figures(report, grouping), "Where reliability lives: report", intro)
    return atomic_write_text(out, page)
