"""report.html: a self-contained page with plotly.js inlined once, written by `vlmrel report` beside report.md."""

import argparse
import html
import json

from synthetic_runs import make_run
from vlmrel_core.cli import analysis as cli_analysis
from vlmrel_core.figures.html_report import report_figures, write_html_report
from vlmrel_core.results import load_report
from vlmrel_core.samples.catalog import sample_catalog


def test_html_report_of_the_shipped_report_inlines_plotly_once(tmp_path):
    report_dir = sample_catalog().report_dir("early_fusion")
    out = write_html_report(report_dir, tmp_path / "report.html")
    page = out.read_text()
    sections = report_figures(load_report(report_dir))
    n_figures = sum(len(f) for _, f in sections)
    assert n_figures >= 3 * 3 and [name for name, _ in sections][0] == "early_fusion/adversarial"
    assert page.count("Plotly.newPlot") == n_figures
    assert page.count("plotly.js v") == 1  # the library itself, once
    assert "<script src=" not in page  # nothing fetched from a CDN
    claims = json.loads((report_dir / "report.json").read_text())["runs"]
    assert all(html.escape(run["claim"]["sentence"]) in page for run in claims)


def test_cli_report_writes_report_html_beside_report_md(tmp_path, capsys):
    run = make_run(tmp_path / "small", n_images=30, hidden_strength=(0.0, 8.0))
    parser = argparse.ArgumentParser(prog="vlmrel")
    cli_analysis.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "rep"), "--n-boot", "50",
                              "--c-grid", "0.1,10", "--no-transfer", "--no-save-probes"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    html_path = tmp_path / "rep" / "report.html"
    assert str(html_path) in printed["files"] and (tmp_path / "rep" / "report.md").exists()
    page = html_path.read_text()
    assert page.count("plotly.js v") == 1 and "Probe AUROC by layer" in page
