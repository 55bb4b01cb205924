"""`refresh-sample-data --only gates`: inputs checked before anything is deleted, progress over both families,
the refresh summary merged (the per-family rebuild itself is replaced here: it runs the models for minutes)."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLES
from vlmrel_core.samples import refresh
from vlmrel_core.samples.catalog import FAMILIES


def _linked_root(tmp_path, skip=()):
    """A sample root whose inputs are links to the shipped ones (nothing shipped is written by these tests)."""
    for name in ("models", "shapes_pope", "shapes_drift"):
        (tmp_path / name).symlink_to(SAMPLES.root / name)
    for family in FAMILIES:
        (tmp_path / "runs" / family).mkdir(parents=True)
        for run in ("adversarial", "drift_in_domain", "drift_shifted"):
            if (family, run) not in skip:
                (tmp_path / "runs" / family / run).symlink_to(SAMPLES.root / "runs" / family / run)
    (tmp_path / "refresh_summary.json").write_text(json.dumps({FAMILIES[0]: {"accuracy": {"kept": 1}}}))
    return tmp_path


def test_refresh_gates_reports_progress_and_merges_the_summary(tmp_path, monkeypatch):
    root = _linked_root(tmp_path)
    calls, events = [], []

    def fake_family_gate(root_, family, threads, log, progress=None):
        calls.append(family)
        for done in range(0, 301, 100):
            progress(done, 300, f"[{family}] step")
        return {"gate": {"family": family}}

    monkeypatch.setattr(refresh, "refresh_family_gate", fake_family_gate)
    summary = refresh.refresh_gates(root, progress=lambda done, total, stage="": events.append((done, total)))
    assert calls == list(FAMILIES) and set(summary) == set(FAMILIES)
    done = [d for d, _ in events]
    assert done == sorted(done) and events[-1][0] == events[-1][1] == len(FAMILIES) * 300
    merged = json.loads((root / "refresh_summary.json").read_text())
    assert merged[FAMILIES[0]] == {"accuracy": {"kept": 1}, "gate": {"family": FAMILIES[0]}}


def test_a_missing_run_fails_before_any_bundle_is_rebuilt(tmp_path, monkeypatch):
    root = _linked_root(tmp_path, skip={(FAMILIES[-1], "drift_shifted")})
    monkeypatch.setattr(refresh, "refresh_family_gate", lambda *a, **k: pytest.fail("rebuilt before checking"))
    with pytest.raises(Exception, match="drift_shifted"):
        refresh.refresh_gates(root)


def test_clearing_a_bundle_keeps_files_other_tools_put_there(tmp_path):
    for name in ("probe", "novelty"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.json").write_text("{}")
    for name in ("gate.yaml", "calibration.json", "report.json", "drift.json", "live_run.json", "layer_probes.json"):
        (tmp_path / name).write_text("{}")
    refresh.clear_gate_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer_probes.json"]
