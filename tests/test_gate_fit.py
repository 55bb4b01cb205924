"""build_gate_from_run: held-out numbers, the risk certificate, a config built as validated objects, progress."""

from __future__ import annotations

import numpy as np
import pytest

from gate_helpers import FAST_C_GRID, late_bundle, late_run, write_synthetic_run  # noqa: F401
from vlmrel_core.gate.config import GateConfigError, load_gate_config
from vlmrel_core.gate.fit import build_gate_from_run
from vlmrel_core.gate.risk import UnreachableRiskTarget


def test_unreachable_risk_target_is_refused_with_a_clear_message(tmp_path, tiny_loaded):
    run = write_synthetic_run(tmp_path / "small", tiny_loaded["late_fusion"].fingerprint, n=200)
    with pytest.raises(UnreachableRiskTarget, match="cannot build a gate .* at risk target 0.01: .*cannot be certified"):
        build_gate_from_run(run, tmp_path / "never", layer=3, risk_target=0.01, c_grid=FAST_C_GRID)
    assert not (tmp_path / "never").exists()


def test_build_reports_held_out_numbers_and_a_certificate(late_bundle):
    report = late_bundle.report
    cert = report["risk_certificate"]
    assert cert["target_risk"] == 0.2 and cert["risk_upper_bound"] <= 0.2
    assert report["threshold"] == pytest.approx(late_bundle.calibrator.transform(np.asarray([cert["threshold"]]))[0])
    split = report["split"]
    assert report["test"]["n"] == split["n_test"] and cert["n_calibration"] == split["n_calibration"]
    assert 0 < report["test"]["coverage"] <= 1 and report["test"]["realised_risk"] is not None
    assert set(report["ece_after_by_method"]) == {"temperature_scaling", "isotonic"}
    assert set(report["calibration"]) == {"probe", "max_answer_prob", "top1_prob", "mean_token_prob",
                                          "top1_top2_margin", "neg_token_entropy"}
    assert report["calibration"]["top1_top2_margin"]["before"] is None  # not a probability: no "before" ECE
    assert report["expected_cost_multiplier"] == pytest.approx(1 + report["gray_zone_share_test"] * 3)


def test_config_is_the_one_written_and_read_back(late_bundle):
    """The config built in memory equals what gate.yaml parses to, and says what the report says."""
    on_disk = load_gate_config(late_bundle.out_dir / "gate.yaml")
    assert on_disk == late_bundle.config
    assert on_disk.base_dir == late_bundle.config.base_dir == late_bundle.out_dir.resolve()
    m = late_bundle.config.monitor
    assert m.target_layer == late_bundle.report["layer"] == 3 and m.architecture == "late_fusion"
    assert m.routing.risk_target.max_risk == 0.2 and m.routing.confidence_threshold is None
    assert m.routing.gray_zone_bounds == (0.0, 1.0) and m.routing.self_consistency_k == 3
    assert m.probe.temperature == pytest.approx(late_bundle.calibrator.temperature)


def test_plain_threshold_without_output_dir_and_progress(late_run):
    calls = []
    build = build_gate_from_run(late_run, layer=3, threshold=0.6, gray_zone="auto", gray_zone_halfwidth=0.1,
                                calibration_method="isotonic", c_grid=FAST_C_GRID,
                                progress=lambda done, total, stage="": calls.append((done, total, stage)))
    assert build.out_dir is None
    routing = build.config.monitor.routing
    assert routing.confidence_threshold == 0.6 and routing.risk_target is None
    assert routing.gray_zone_bounds == (0.5, 0.7) and build.report["gray_zone"] == [0.5, 0.7]
    assert build.config.monitor.probe.temperature is None and build.config.monitor.probe.calibration_method == "isotonic"
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][:2] == (calls[-1][1], calls[-1][1])
    assert calls[0][0] == 0 and all(total == calls[0][1] for _, total, _ in calls)


def test_bad_routing_arguments_name_the_field(tmp_path, late_run):
    with pytest.raises(GateConfigError, match="gray_zone_action"):
        build_gate_from_run(late_run, tmp_path / "bad", layer=3, threshold=0.6, gray_zone_action="vote",
                            c_grid=FAST_C_GRID)
    with pytest.raises(ValueError, match="threshold must be a calibrated confidence"):
        build_gate_from_run(late_run, layer=3, threshold=1.5, c_grid=FAST_C_GRID)
    assert not (tmp_path / "bad").exists()


def test_novelty_auto_picks_the_candidate_with_the_best_held_out_auroc(tmp_path, late_run, tiny_loaded):
    """Against a shifted run the choice is measured and recorded; without one 'auto' fails before any fitting."""
    shifted = write_synthetic_run(tmp_path / "shifted", tiny_loaded["late_fusion"].fingerprint, n=200, seed=3,
                                  shift=1.0)
    build = build_gate_from_run(late_run, layer=3, risk_target=0.2, delta=0.1, c_grid=FAST_C_GRID,
                                novelty_method="auto", novelty_shifted_runs=[shifted])
    selection = build.report["novelty"]["selection"]
    table = selection["candidates"]
    assert selection["chosen"] == max(table, key=lambda name: table[name]["mean_auroc"])
    assert build.novelty.method == selection["chosen"].split("_")[0]
    assert table[selection["chosen"]]["auroc_vs_in_domain"]["shifted"] > 0.95
    with pytest.raises(ValueError, match="needs novelty_shifted_runs"):
        build_gate_from_run(late_run, layer=3, risk_target=0.2, novelty_method="auto")
    other = write_synthetic_run(tmp_path / "other_model", "f" * 16, n=200, seed=4)
    with pytest.raises(ValueError, match="is from model"):
        build_gate_from_run(late_run, layer=3, risk_target=0.2, c_grid=FAST_C_GRID, novelty_method="auto",
                            novelty_shifted_runs=[other])


def test_the_default_novelty_is_knn_and_says_so(late_bundle):
    assert late_bundle.novelty.method == "knn"
    assert late_bundle.report["novelty"]["selection"] == {"criterion": "given", "chosen": "knn"}


def test_the_bundle_ships_a_probe_per_layer_tied_to_its_own_probe(late_bundle, late_run):
    from vlmrel_core.inspection.layer_probe_file import LAYER_PROBES_META, LAYER_PROBES_TENSORS, load_bundle_layer_probes
    from vlmrel_core.inspection.layer_probes import fit_layer_probes

    assert (late_bundle.out_dir / LAYER_PROBES_TENSORS).is_file() and (late_bundle.out_dir / LAYER_PROBES_META).is_file()
    shipped = load_bundle_layer_probes(late_bundle.out_dir, late_bundle.probe)
    fitted = fit_layer_probes(late_bundle.probe, late_run)
    assert shipped.layers == fitted.layers and shipped.probes[3] is late_bundle.probe
    for layer in fitted.layers:
        np.testing.assert_array_equal(shipped.probes[layer].coef, fitted.probes[layer].coef)
