import argparse
import json

import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from report_fixtures import GRID, OPTIONS, report, runs  # noqa: F401 (pytest fixtures)
from synthetic_runs import make_run
from vlmrel_core.analysis.report import build_report
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.analysis.sweep import sweep_layers
from vlmrel_core.analysis.transfer import transfer_across_runs
from vlmrel_core.cli import analysis as cli_analysis
from vlmrel_core.engine.store import RunReader


def test_table7_lists_every_signal_and_control_for_both_splits(report):
    table = report.table7
    expected = {
        "max_answer_prob", "yes_no_margin", "top1_top2_margin", "top1_prob", "token_entropy", "mean_token_logprob",
        "attention_entropy", "attention_spatial_entropy", "attention_cluster_count", "attention_delta_spatial_entropy",
        "probe_selected", "probe_best_on_test", "probe_concat", "probe_mean_score", "answer_only", "item_control",
        "shuffled_label_probe", "no_model", "output_model", "fusion",
    }
    for (run, grouping), part in table.groupby(["run", "grouping"]):
        keys = set(part["key"])
        assert expected <= keys, (run, grouping, expected - keys)
    assert set(table["grouping"]) == {"image", "item"}
    assert set(table["run"]) == {"synthetic-model-1/adversarial"}
    entropy = table[table["key"] == "token_entropy"].iloc[0]
    assert entropy["orientation"] == "negated" and entropy["signal"] == "−token_entropy"
    assert set(table.loc[table["key"] == "max_answer_prob", "orientation"]) == {"as is"}
    cost = dict(zip(table["key"], table["cost"]))
    assert cost["probe_selected"] == "1× (same pass, 0 extra)" and cost["no_model"].startswith("0×")
    sc = table[table["key"] == "self_consistency"]
    assert len(sc) == 2 and set(sc["cost"]) == {"10× (K=10 samples)"}
    probe = table[table["key"] == "probe_selected"]
    assert (probe["auroc"] == 1.0).all()


def test_table7_numbers_equal_sklearn_and_scipy_on_the_same_test_rows(report, runs):
    rows = RunReader(runs[0]).rows
    test = make_split(rows, SplitSpec("image", 0.3, 0.0, 0)).test
    y = rows["correct"].to_numpy()[test]
    table = report.table7
    part = table[(table["run"] == "synthetic-model-1/adversarial") & (table["grouping"] == "image")]
    for key, oriented in (("max_answer_prob", rows["max_answer_prob"].to_numpy()[test]),
                          ("token_entropy", -rows["token_entropy"].to_numpy()[test])):
        row = part[part["key"] == key].iloc[0]
        assert row["n_test"] == len(test)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, oriented), abs=1e-12)
        assert row["r_pb"] == pytest.approx(stats.pointbiserialr(y, oriented).statistic, abs=1e-12)
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]


def test_claims_gains_and_headline(report):
    assert all(c.holds for c in report.claims)
    assert all("holds for synthetic-model-1/" in c.sentence for c in report.claims)
    gains = report.gains
    item_gain = gains[(gains["grouping"] == "item") & (gains["baseline"] == "control: item")]
    assert len(item_gain) == 1 and (item_gain["group_ci_low"] > 0).all()
    headline = report.headline()
    assert list(headline.columns[:3]) == ["run", "grouping", "probe (CV-selected layer)"]
    assert headline["probe (CV-selected layer)"].str.startswith("1.000").all()


def test_transfer_across_runs_both_ways_and_across_image_ranges(report, runs):
    ranges = report.transfer
    assert list(ranges["kind"]) == ["image-id range"] * 2
    assert list(ranges["source"]) == ["synthetic-model-1/adversarial images 0–29",
                                      "synthetic-model-1/adversarial images 30–59"]
    adversarial, random = RunReader(runs[0]), RunReader(runs[1])
    forward = transfer_across_runs(random, adversarial, "last_token", 2, source_name="random",
                                   target_name="adversarial", n_boot=100, c_grid=GRID)
    backward = transfer_across_runs(adversarial, random, "last_token", 2, source_name="adversarial",
                                    target_name="random", n_boot=100, c_grid=GRID)
    for result in (forward, backward):
        assert result.n_test > 0 and result.transfer.value > 0.95 and result.in_domain.value > 0.95
        assert result.transfer_minus_in_domain.low <= 0.0 <= result.transfer_minus_in_domain.high
    # the shared image pool: no image of the target's test rows was in the transferred probe's training rows
    assert forward.n_train_source + forward.n_test <= len(random.rows)
    with pytest.raises(ValueError, match="one model"):
        other = make_run(runs[0].parent / "other-model", fingerprint="synthetic-model-2")
        transfer_across_runs(RunReader(other), adversarial, "last_token", 2, source_name="a", target_name="b",
                             n_boot=50, c_grid=GRID)


def test_layer_signals_cover_attention_and_logit_lens(report):
    layers = report.layer_signals
    part = layers[layers["run"] == "synthetic-model-1/adversarial"]
    signals = set(part["signal"])
    assert {"−attention entropy", "−H_s", "−C_k", "−ΔH_s", "lens |yes/no log-odds|", "lens truth margin"} <= signals
    assert set(part.loc[part["signal"] == "−ΔH_s", "layer"]) == {1, 2}
    truth = part[part["signal"] == "lens truth margin"]
    assert truth["note"].str.contains("ground-truth label").all()


def test_build_report_reports_progress_from_zero_to_done(tmp_path):
    run = make_run(tmp_path / "small", n_images=30, hidden_strength=(0.0, 8.0))
    calls = []
    build_report(run, **{**OPTIONS, "n_boot": 20}, transfer=False,
                 progress=lambda done, total, stage: calls.append((done, total, stage)))
    done = [c[0] for c in calls]
    assert calls[-1] == (1000, 1000, "done") and done == sorted(done) and all(c[1] == 1000 for c in calls)
    stages = [c[2] for c in calls]
    for expected in ("image: layer 2/2 last_token", "image: ensembles", "image: controls", "item: signals"):
        assert expected in stages, stages


def test_cli_sweep_and_report(tmp_path, capsys):
    run = make_run(tmp_path / "small", n_images=30, hidden_strength=(0.0, 8.0))
    parser = argparse.ArgumentParser(prog="vlmrel")
    cli_analysis.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", str(run), "--out", str(tmp_path / "sweep"), "--n-boot", "100",
                              "--c-grid", "0.1,10"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["best"]["last_token"]["layer"] == 1 and (tmp_path / "sweep" / "sweep.md").exists()
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "rep"), "--n-boot", "100",
                              "--c-grid", "0.1,10", "--no-transfer", "--no-save-probes"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["claims"] and (tmp_path / "rep" / "table7.md").exists()
    assert not (tmp_path / "rep" / "probes").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["report", str(run)])  # --out is required


def test_report_numbers_do_not_depend_on_n_jobs(runs):
    """Worker processes run the same seeded tasks: every table equals the in-process build's, bit for bit."""
    options = {**OPTIONS, "n_boot": 60, "n_permutations": 3}
    serial = build_report(list(runs), **options, n_jobs=1)
    calls = []
    parallel = build_report(list(runs), **options, n_jobs=2,
                            progress=lambda done, total, stage: calls.append((done, total, stage)))
    for frame in ("table7", "transfer", "sweeps", "gains", "layer_signals"):
        pd.testing.assert_frame_equal(getattr(serial, frame), getattr(parallel, frame), check_exact=True)
    assert len(serial.transfer) == 2 + 4  # both directions across runs, two image ranges per run
    assert [c.sentence for c in serial.claims] == [c.sentence for c in parallel.claims]
    assert serial.settings == parallel.settings
    assert calls[-1] == (1000, 1000, "done") and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_in_domain_transfer_probe_is_the_sweep_probe_only_when_fitted_on_the_same_rows(runs):
    adversarial, random = RunReader(runs[0]), RunReader(runs[1])
    split = make_split(adversarial.rows, SplitSpec("image"))
    sweep = sweep_layers(adversarial, None, split, n_boot=50, c_grid=GRID)
    probe = sweep.probes[("last_token", 2)]
    kwargs = dict(source_name="random", target_name="adversarial", n_boot=50, c_grid=GRID)
    refit = transfer_across_runs(random, adversarial, "last_token", 2, **kwargs)
    reused = transfer_across_runs(random, adversarial, "last_token", 2, in_domain_probe=probe, **kwargs)
    assert reused == refit
    # a probe of other rows (another layer) is not taken for the in-domain probe: the refit happens
    wrong = transfer_across_runs(random, adversarial, "last_token", 2, in_domain_probe=sweep.probes[("last_token", 0)],
                                 **kwargs)
    assert wrong == refit
