import json

from report_fixtures import report, runs  # noqa: F401 (pytest fixtures)
from vlmrel_core.analysis.probes import load_probe
from vlmrel_core.analysis.report_io import write_report


def test_written_report_files_and_saved_probe(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    names = {p.name for p in paths}
    for name in ("table7.csv", "table7.md", "gains.csv", "transfer.md", "layer_signals.md", "sweep.md", "report.md",
                 "report.json"):
        assert name in names
    text = (tmp_path / "out" / "report.md").read_text()
    assert "higher = more likely correct" in text and "leaves AUROC unchanged" in text and "holds for" in text
    assert "negated" in (tmp_path / "out" / "table7.md").read_text()
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["runs"][0]["claim"]["holds"] is True
    probe_dir = tmp_path / "out" / "probes" / "synthetic-model-1__adversarial"
    probe = load_probe(probe_dir, expected_fingerprint="synthetic-model-1", expected_hidden_size=8)
    assert probe.info.layers == [2] and probe.info.metrics["test_auroc"]["value"] == 1.0
