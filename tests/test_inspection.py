"""The inspection library behind the dashboard's Inspect page: per-layer probes, sinks, uploads, reasons, quotes."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from synthetic_runs import make_run
from vlmrel_core.analysis.probes import fit_run_probe
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader
from vlmrel_core.inspection.attention_view import AttentionGrids, hide_sinks, on_border, sink_mask, sink_summary
from vlmrel_core.inspection.explain import routing_reason
from vlmrel_core.inspection.images import ImageInputError, load_image_bytes
from vlmrel_core.inspection.layer_probes import (
    LayerProbeError, fit_layer_probes, load_or_fit_layer_probes, training_run_dir,
)
from vlmrel_core.inspection.report_quotes import ReportQuoteError, headline_quote


@pytest.fixture(scope="module")
def run_and_gate_probe(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run") / "run", hidden_strength=(0.0, 1.5, 4.0))
    reader = RunReader(run)
    split = make_split(reader.rows, SplitSpec("image", test_fraction=0.2, calibration_fraction=0.3))
    return run, fit_run_probe(reader, "last_token", [2], split, c_grid=(1.0,))


def test_layer_probes_reuse_the_gate_probe_and_rank_planted_layers(run_and_gate_probe):
    run, gate_probe = run_and_gate_probe
    seen = []
    probes = fit_layer_probes(gate_probe, run, progress=lambda d, t, s: seen.append((d, t)))
    assert probes.layers == [0, 1, 2] and probes.probes[2] is gate_probe
    assert seen[-1] == (3, 3)
    for layer in (0, 1):  # same training rows and C as the gate's probe
        assert probes.probes[layer].info.split == gate_probe.info.split and probes.probes[layer].info.C == 1.0
    states = RunReader(run).states("last_token")
    rows = RunReader(run).rows
    correct = rows["correct"].to_numpy().astype(bool)
    # Layer 2 carries the planted signal, layer 0 none: mean score gap between right and wrong answers grows.
    gaps = []
    for layer in (0, 2):
        s = probes.probes[layer].score(states[:, layer])
        gaps.append(s[correct].mean() - s[~correct].mean())
    assert gaps[1] > gaps[0] + 0.2
    one = probes.scores(states[0], [0, 1, 2])
    assert one[2] == pytest.approx(float(gate_probe.score(states[:1, 2])[0]))
    with pytest.raises(ValueError, match=r"expected \(3, d\)"):
        probes.scores(states[0][:2], [0, 1, 2])


def test_layer_probe_cache_round_trip(run_and_gate_probe, tmp_path):
    run, gate_probe = run_and_gate_probe
    first = load_or_fit_layer_probes(gate_probe, run, tmp_path)
    stages = []
    second = load_or_fit_layer_probes(gate_probe, run, tmp_path, progress=lambda d, t, s: stages.append(s))
    assert stages == ["layer probes loaded from cache"]
    for layer in (0, 1):
        np.testing.assert_allclose(second.probes[layer].coef, first.probes[layer].coef)
    assert second.probes[2] is gate_probe


def test_layer_probes_refuse_another_models_run(run_and_gate_probe, tmp_path):
    _, gate_probe = run_and_gate_probe
    other = make_run(tmp_path / "other", fingerprint="another-model")
    with pytest.raises(LayerProbeError, match="another-model"):
        fit_layer_probes(gate_probe, other)
    with pytest.raises(LayerProbeError, match="records no training run"):
        training_run_dir({}, [tmp_path])
    with pytest.raises(LayerProbeError, match="not found"):
        training_run_dir({"run_dir": "no/such/run"}, [tmp_path])


def test_sinks_found_by_mass_and_hidden_on_request():
    grid = np.full((8, 8), 1.0)  # 10x the uniform share of 64 cells: above 0.156 of the mass
    grid[0, 7] = 200.0  # a border sink
    grid[3, 2] = 100.0  # an inner sink
    mask = sink_mask(grid)
    assert mask.sum() == 2 and mask[0, 7] and mask[3, 2]
    assert on_border(mask).sum() == 1
    summary = sink_summary(grid)
    assert (summary.n_sinks, summary.n_on_border) == (2, 1)
    assert summary.share == pytest.approx(300 / 362)
    assert "2 of 64 cells" in summary.sentence()
    hidden = hide_sinks(grid, mask)
    assert np.isnan(hidden[mask]).all() and np.nansum(hidden) == pytest.approx(1.0)
    assert sink_summary(np.ones((3, 3))).sentence().startswith("no attention sink")
    with pytest.raises(ValueError, match="every cell"):
        hide_sinks(grid, np.ones_like(mask))


def test_attention_grids_from_capture_are_normalised_per_layer():
    per_layer = np.arange(1, 1 + 2 * 16, dtype=float).reshape(2, 16)
    grids = AttentionGrids.from_capture(per_layer, [1, 3], (4, 4))
    assert grids.grids.shape == (2, 4, 4)
    np.testing.assert_allclose(grids.grids.sum(axis=(1, 2)), 1.0)
    assert grids.grid(3)[0, 0] == pytest.approx(17 / per_layer[1].sum())
    with pytest.raises(ValueError, match="not captured"):
        grids.grid(0)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 255)).save(buffer, "PNG")
    return buffer.getvalue()


def test_uploads_decode_or_fail_in_words():
    image = load_image_bytes(_png(), "red.png")
    assert image.mode == "RGB" and image.size == (20, 10)
    with pytest.raises(ImageInputError, match="notes.txt is not an image"):
        load_image_bytes(b"just some text", "notes.txt")
    with pytest.raises(ImageInputError, match="empty"):
        load_image_bytes(b"", "blank.png")
    with pytest.raises(ImageInputError, match="limit is 100 pixels"):
        load_image_bytes(_png(), "red.png", max_pixels=100)


def _decision(action, confidence, accepted, *, raw=0.6, threshold_raw=None, sc=None, before=None):
    evidence = {"threshold": 0.75, "threshold_raw": threshold_raw, "gray_zone": [0.7, 0.8], "raw_probe_score": raw,
                "route_before_self_consistency": before or action}
    return SimpleNamespace(action=action, confidence=confidence, accepted=accepted, certified=threshold_raw is not None,
                           route="answer" if accepted else "human_review", self_consistency=sc, evidence=evidence)


def test_routing_reason_says_which_rule_decided():
    assert "confidence 0.900 vs threshold 0.750: at or above" in routing_reason(_decision("generate", 0.9, True))
    certified = routing_reason(_decision("generate", 0.9, True, raw=0.9, threshold_raw=0.83))
    assert "risk-certified raw threshold 0.830" in certified and "certified rule" in certified
    assert routing_reason(_decision("fallback", 0.2, False)).endswith("below → human_review")
    sc = {"k": 5, "majority_answer": "yes", "agreement": 0.6, "min_agreement": 0.8}
    gray = routing_reason(_decision("self_consistency", 0.72, False, sc=sc))
    assert "5 answers" in gray and "agreement 0.60" in gray and "human_review" in gray
    assert "gray-zone action is fallback" in routing_reason(_decision("fallback", 0.72, False, before="gray_zone"))


def test_headline_quote_reads_the_shipped_report(tmp_path):
    report = REPO / "sample_data" / "reports" / "late_fusion" / "report.json"
    quote = headline_quote(report, "late_fusion/adversarial")
    assert quote.attention_auroc.startswith("0.") and "[" in quote.attention_auroc
    assert quote.probe_auroc != quote.attention_auroc
    with pytest.raises(ReportQuoteError, match="no headline row"):
        headline_quote(report, "late_fusion/nope")
    with pytest.raises(ReportQuoteError, match="cannot read"):
        headline_quote(tmp_path / "missing.json", "x")
