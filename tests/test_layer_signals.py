import numpy as np

from report_fixtures import runs  # noqa: F401 (pytest fixture)
from vlmrel_core.analysis.layer_signals import attention_signal_arrays, lens_signal_arrays, run_layer_signals
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader


def test_per_layer_arrays_have_one_column_per_layer(runs):
    reader = RunReader(runs[0])
    test = make_split(reader.rows, SplitSpec("image", 0.3, 0.0, 0)).test
    arrays, note = attention_signal_arrays(reader, test)
    n_layers = len(reader.manifest.layers)
    assert arrays["spatial_entropy"].shape == (test.size, n_layers)
    assert arrays["delta_spatial_entropy"].shape == (test.size, n_layers - 1)
    assert arrays["mean_map.entropy"].shape == (test.size,) and isinstance(note, str)
    lens = lens_signal_arrays(reader)
    assert lens["abs_margin"].shape == (len(reader.rows), n_layers) and (lens["abs_margin"] >= 0).all()
    labels = reader.rows["label"].astype(str).str.lower().to_numpy()
    yes = labels == "yes"
    np.testing.assert_allclose(lens["truth_margin"][yes], lens["abs_margin"][yes] * np.sign(lens["truth_margin"][yes]))


def test_layer_signals_cover_attention_and_logit_lens(runs):
    reader = RunReader(runs[0])
    test = make_split(reader.rows, SplitSpec("image", 0.3, 0.0, 0)).test
    part = run_layer_signals(reader, test, n_boot=50)
    signals = set(part["signal"])
    assert {"−attention entropy", "−H_s", "−C_k", "−ΔH_s", "lens |yes/no log-odds|", "lens truth margin"} <= signals
    assert set(part.loc[part["signal"] == "−ΔH_s", "layer"]) == {1, 2}
    truth = part[part["signal"] == "lens truth margin"]
    assert truth["note"].str.contains("ground-truth label").all()
    assert set(part.loc[part["signal"] == "−H_s", "orientation"]) == {"negated"}
    assert (part["auroc_low"] <= part["auroc"]).all() and (part["auroc"] <= part["auroc_high"]).all()
