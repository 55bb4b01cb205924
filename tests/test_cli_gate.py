"""`vlmrel build-gate`, `vlmrel gate` (single and batch) and `vlmrel drift` end to end on a tiny model."""

from __future__ import annotations

import json

from gate_helpers import QUESTION, late_run, write_synthetic_run  # noqa: F401
from vlmrel_core.gate.records import CalibrationBundle


def test_cli_build_gate_single_batch_and_drift(tmp_path, tiny_loaded, tiny_model_dirs, tiny_dataset, late_run, capsys):
    from vlmrel_core.cli.main import main

    out = tmp_path / "bundle"
    assert main(["build-gate", str(late_run), "--out", str(out), "--layer", "3", "--threshold", "0.7",
                 "--gray-zone", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold"] == 0.7 and summary["threshold_source"] == "confidence_threshold"
    assert {"ece_before", "ece_after", "test", "calibration_summary"} <= set(summary)

    image = tiny_dataset.parent / "images" / "0000000.png"
    assert main(["gate", "--config", str(out / "gate.yaml"), "--image", str(image), "--question", QUESTION]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["action"] in ("generate", "fallback") and decision["evidence"]["layer"] == 3

    decisions = tmp_path / "decisions.jsonl"
    assert main(["gate", "--config", str(out / "gate.yaml"), "--data", str(tiny_dataset), "--out", str(decisions),
                 "--limit", "5", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    batch = json.loads(captured.out)
    lines = [json.loads(line) for line in decisions.read_text().splitlines()]
    assert len(lines) == batch["n_decisions"] == 5 and "accuracy_all" in batch
    assert batch["accuracy_all"] == sum(line["correct"] for line in lines) / 5
    assert {"question_id", "label", "correct", "answer", "confidence", "action"} <= set(lines[0])

    assert main(["gate", "--config", str(out / "gate.yaml"), "--image", str(image)]) == 2
    assert "needs both --image and --question" in capsys.readouterr().err
    assert main(["build-gate", str(late_run), "--out", str(tmp_path / "x"), "--layer", "3", "--risk-target", "0.01"]) == 2
    assert "cannot be certified" in capsys.readouterr().err

    shifted = write_synthetic_run(tmp_path / "shift", tiny_loaded["late_fusion"].fingerprint, n=300, seed=3,
                                  dataset_hash="h3", shift=0.5)
    new_cal = tmp_path / "recalibrated.json"
    code = main(["drift", "--config", str(out / "gate.yaml"), "--reference", str(late_run), "--current", str(shifted),
                 "--recalibrate", "--write-calibration", str(new_cal), "--fail-on-alert"])
    drift = json.loads(capsys.readouterr().out)
    assert code == 3 and drift["alert"] and drift["written_calibration"] == str(new_cal)
    assert len(drift["windows"]["values"]) == drift["windows"]["n"] == 300 // drift["windows"]["size"]
    assert CalibrationBundle.load(new_cal).risk_certificate is None
