"""`vlmrel refresh-sample-data`: the shipped caches, reports and gates must come from the shipped models."""

import json

import pytest

from conftest import SAMPLE_DATA, SAMPLE_MODELS
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.samples.refresh import FAMILIES, refresh_sample_data

SHIPPED = SAMPLE_DATA.parent


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_artifact_names_the_shipped_model(family):
    """After retraining, a forgotten refresh leaves caches and probes of the old weights: this catches it."""
    fingerprint = load_vlm(SAMPLE_MODELS / family).fingerprint
    manifests = sorted((SHIPPED / "runs" / family).glob("*/manifest.json"))
    probe_files = sorted((SHIPPED / "reports" / family / "probes").glob("*/probe.json"))
    gate_files = [SHIPPED / "gates" / family / name for name in ("probe/probe.json", "calibration.json", "report.json")]
    assert len(manifests) >= 7 and len(probe_files) >= 3
    for path in manifests + probe_files + gate_files:
        assert json.loads(path.read_text())["model_fingerprint"] == fingerprint, f"{path} is stale: run vlmrel refresh-sample-data"


def test_refresh_summary_matches_the_model_cards():
    summary = json.loads((SHIPPED / "refresh_summary.json").read_text())
    for family in FAMILIES:
        card = json.loads((SAMPLE_MODELS / family / "model_card.json").read_text())
        assert summary[family]["accuracy"] == card["accuracy"]
        assert summary[family]["gate"]["model_fingerprint"] == card["fingerprint"]


def test_refresh_refuses_an_unknown_family_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="unknown demo families"):
        refresh_sample_data(tmp_path, families=["late_fusion", "mid_fusion"])
    assert list(tmp_path.iterdir()) == []


def _fake_sample_root(root):
    for name in ("adversarial", "random", "popular", "open_questions"):
        (root / "shapes_pope").mkdir(parents=True, exist_ok=True)
        (root / "shapes_pope" / f"{name}.jsonl").write_text("")
    for family in FAMILIES:
        (root / "models" / family).mkdir(parents=True)
        (root / "models" / family / "config.json").write_text("{}")


def test_refresh_reports_progress_per_stage_on_one_monotone_bar(tmp_path, monkeypatch):
    """Every family's stages (and extraction questions inside them) drive one bar from 0 to its total, named."""
    import vlmrel_core.samples.refresh as refresh

    _fake_sample_root(tmp_path)
    calls = []

    def fake_family(root, family, drift_data, k, rows, threads, log, progress=None):
        for index, stage in enumerate(refresh.FAMILY_STAGES):
            sub = refresh._stage(progress, index, family, stage)
            for done in range(0, 11, 5):
                sub(done, 10, "")
        progress(len(refresh.FAMILY_STAGES) * refresh.STAGE_UNITS, len(refresh.FAMILY_STAGES) * refresh.STAGE_UNITS, "done")
        return {"family": family}

    monkeypatch.setattr(refresh, "write_drift_data", lambda root, n: {"in_domain": root / "a", "shifted": root / "b"})
    monkeypatch.setattr(refresh, "refresh_family", fake_family)
    monkeypatch.setattr(refresh, "write_ablation_tables", lambda root: [])
    summary = refresh.refresh_sample_data(tmp_path, log=lambda line: None,
                                          progress=lambda done, total, stage="": calls.append((done, total, stage)))
    assert set(summary) == set(FAMILIES)
    done = [c[0] for c in calls]
    totals = {c[1] for c in calls}
    assert len(totals) == 1 and done[-1] == totals.pop() and done[0] == 0
    assert done == sorted(done), "the bar never goes back"
    stages = " ".join(c[2] for c in calls)
    for family in FAMILIES:
        for stage in refresh.FAMILY_STAGES:
            assert f"[{family}] {stage}" in stages
    assert "drift data" in stages and "ablation tables" in stages
    assert json.loads((tmp_path / "refresh_summary.json").read_text()) == summary


def test_refresh_checks_models_and_splits_before_anything_runs(tmp_path):
    from vlmrel_core.engine.inputs import InputError
    from vlmrel_core.engine.loading import ModelLoadError
    from vlmrel_core.samples.refresh import check_sample_root

    with pytest.raises(InputError, match="POPE split not found"):
        check_sample_root(tmp_path)
    _fake_sample_root(tmp_path)
    (tmp_path / "models" / "early_fusion" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="early_fusion holds no config.json"):
        check_sample_root(tmp_path)
    assert check_sample_root(tmp_path, ["late_fusion"]) == tmp_path
