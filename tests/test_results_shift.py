"""results.shift: the shipped shift report read back into a per shift × model table (values straight from JSON)."""

from __future__ import annotations

import json

import pytest

from vlmrel_core.figures.monitor_batch import shift_alarm_figure
from vlmrel_core.results.files import ResultsError
from vlmrel_core.results.shift import load_shift_report
from vlmrel_core.samples.catalog import sample_catalog

PATH = sample_catalog().shift_report()


def test_table_holds_every_model_and_shift_with_the_json_values():
    raw = json.loads(PATH.read_text())
    report = load_shift_report(PATH.parent)
    table = report.table()
    assert len(table) == sum(len(m["shifts"]) for m in raw.values())
    row = table[(table["model"] == "late_fusion") & (table["shift"] == "style")].iloc[0]
    style = raw["late_fusion"]["shifts"]["style"]
    assert row["accuracy"] == style["accuracy"]
    assert row["certified_risk"] == style["certified_rule"]["realised_risk"]
    assert row["certified_coverage"] == style["certified_rule"]["coverage"]
    assert row["novelty_routed_share"] == style["novelty_share"]
    assert row["image_novel_share"] == style["novelty_share_image"]
    assert row["alarm_rate@100"] == style["windows"]["100"]["alarm_rate"]
    rates = report.in_domain_rates().set_index("model")
    assert rates.loc["early_fusion", "in_domain_false_reject_rate"] == raw["early_fusion"]["goals"]["in_domain_false_reject_rate"]
    figure = shift_alarm_figure(table)
    assert len(figure.data) == 2 * len(raw["late_fusion"]["window_sizes"])


def test_a_broken_report_names_the_file_and_field(tmp_path):
    raw = json.loads(PATH.read_text())
    del raw["late_fusion"]["shifts"]["style"]["accuracy"]
    bad = tmp_path / "shift_report.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ResultsError, match="accuracy"):
        load_shift_report(bad)
