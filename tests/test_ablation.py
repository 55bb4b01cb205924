"""Per-call dimension ablation hooks (thread isolation, exact zero/mean values), choosing dims, the probe to follow."""

import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vlmrel_core.engine.capture import TokenLayout, capture
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.run import run_batch
from vlmrel_core.interventions import ablation, study

QUESTIONS = ["is there a red circle in the image?", "how many squares are there?", "what colour is the cross?"]


def _hook_counts(loaded):
    layers = loaded.adapter.decoder_layers(loaded.model)
    return [len(layer._forward_hooks) for layer in layers]


def _inputs_and_layout(loaded, n=3):
    images = [render_scene(make_scene(i)) for i in range(n)]
    inputs = loaded.adapter.prepare_inputs(loaded.processor, images, QUESTIONS[:n])
    layout = TokenLayout.from_inputs(inputs["input_ids"], inputs["attention_mask"], loaded.adapter.image_token_id(loaded.model))
    return images, inputs, layout


# ------------------------------------------------------------------------------------------ hooks and guard


def test_hooks_are_removed_after_the_block_even_on_error(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    images = [render_scene(make_scene(0))]
    plain = run_batch(loaded, images, QUESTIONS[:1], max_new_tokens=2)
    before = _hook_counts(loaded)
    with ablation.ablate_dimensions(loaded, 1, range(0, 128, 2)):
        assert sum(_hook_counts(loaded)) == sum(before) + 1
        inside = run_batch(loaded, images, QUESTIONS[:1], max_new_tokens=2)
    assert _hook_counts(loaded) == before
    assert not np.array_equal(inside.states["last_token"][:, 2], plain.states["last_token"][:, 2])
    with pytest.raises(RuntimeError, match="boom"):
        with ablation.ablate_dimensions(loaded, 1, [3]):
            raise RuntimeError("boom")
    assert _hook_counts(loaded) == before
    after = run_batch(loaded, images, QUESTIONS[:1], max_new_tokens=2)
    np.testing.assert_array_equal(after.states["last_token"], plain.states["last_token"])


@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_zeroed_dims_are_exactly_zero_in_the_captured_layer_output(tiny_loaded, family):
    loaded = tiny_loaded[family]
    _, inputs, layout = _inputs_and_layout(loaded)
    dims = [0, 5, 17, 127]
    with torch.no_grad():
        with capture(loaded.model, loaded.adapter, layout) as plain:
            loaded.model(**inputs)
        with ablation.ablate_dimensions(loaded, 1, dims), capture(loaded.model, loaded.adapter, layout) as ablated:
            loaded.model(**inputs)
    keep = np.setdiff1d(np.arange(128), dims)
    for pooling in ("last_token", "mean_all", "mean_image", "mean_text"):
        a, p = ablated.states[pooling].numpy(), plain.states[pooling].numpy()
        assert (a[:, 1, dims] == 0).all()
        np.testing.assert_array_equal(a[:, 0], p[:, 0])  # the layer before is untouched
        np.testing.assert_array_equal(a[:, 1][:, keep], p[:, 1][:, keep])  # other dims of the ablated layer too
        assert not np.allclose(a[:, 2], p[:, 2])  # and the change propagates downstream


def test_mean_mode_sets_the_given_means_and_applies_in_decode_steps(tiny_loaded):
    loaded = tiny_loaded["early_fusion"]
    _, inputs, layout = _inputs_and_layout(loaded)
    means = np.linspace(-2.0, 2.0, 128).astype(np.float32)
    dims = [1, 2, 64]
    with torch.no_grad(), ablation.ablate_dimensions(loaded, -2, dims, mode="mean", means=means), \
            capture(loaded.model, loaded.adapter, layout) as captured:
        loaded.model(**inputs)
    np.testing.assert_array_equal(captured.states["last_token"][:, 2, dims].numpy(), np.broadcast_to(means[dims], (3, 3)))
    np.testing.assert_allclose(captured.states["mean_all"][:, 2, dims].numpy(), np.broadcast_to(means[dims], (3, 3)), rtol=1e-6)

    # one value per ablated dim is accepted too; every call (prefill and each decode step) is ablated
    seen = []
    layer = loaded.adapter.decoder_layers(loaded.model)[2]
    handle = layer.register_forward_hook(lambda m, a, out: seen.append((out.shape[1], out[..., dims].clone())))
    try:
        with torch.no_grad(), ablation.ablate_dimensions(loaded, 2, dims, mode="mean", means=[7.0, 8.0, 9.0]):
            loaded.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert [s for s, _ in seen][1:] == [1, 1] and seen[0][0] > 1
    for _, values in seen:
        assert torch.equal(values, torch.tensor([7.0, 8.0, 9.0]).expand_as(values))


def test_concurrent_threads_on_one_model_never_see_each_others_ablation(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    images = [render_scene(make_scene(i)) for i in range(2)]
    dims = list(range(0, 128, 2))

    def plain_call():
        return run_batch(loaded, images, QUESTIONS[:2], max_new_tokens=3)

    def ablated_call():
        with ablation.ablate_dimensions(loaded, 0, dims):
            return run_batch(loaded, images, QUESTIONS[:2], max_new_tokens=3)

    before = _hook_counts(loaded)
    expected_plain, expected_ablated = plain_call(), ablated_call()
    assert not np.allclose(expected_plain.states["last_token"], expected_ablated.states["last_token"])
    results: dict[str, list] = {"plain": [], "ablated": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(name, fn):
        try:
            for _ in range(3):
                barrier.wait()
                results[name].append(fn())
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=("plain", plain_call)),
               threading.Thread(target=work, args=("ablated", ablated_call))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results["plain"]:
        assert got.answer_text == expected_plain.answer_text
        np.testing.assert_array_equal(got.states["last_token"], expected_plain.states["last_token"])
        np.testing.assert_array_equal(got.output["max_answer_prob"], expected_plain.output["max_answer_prob"])
    for got in results["ablated"]:
        assert got.answer_text == expected_ablated.answer_text
        np.testing.assert_array_equal(got.states["last_token"], expected_ablated.states["last_token"])
    assert _hook_counts(loaded) == before


# ------------------------------------------------------------------------------------------ planted direction


class _ToyDecoder(nn.Module):
    """Residual stream (n, 1, d) through two identity 'layers'; the answer reads one dimension's sign."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_planted_direction_is_top_ranked_and_ablating_it_drops_a_known_amount():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    d, planted, other = 16, 11, 4
    # existence questions are answered by the planted dim, count questions by another one
    types = np.array(["existence"] * 80 + ["count"] * 80)
    labels = np.concatenate([np.r_[np.ones(30), np.zeros(50)], np.r_[np.ones(40), np.zeros(40)]]).astype(bool)
    states = rng.normal(0.0, 1.0, (160, d))
    reads = np.where(types == "existence", planted, other)
    states[np.arange(160), reads] = np.where(labels, 2.0, -2.0) + rng.normal(0.0, 0.1, 160)

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0)).fit(states[:80], labels[:80])
    top = ablation.top_k_dimensions(probe[-1].coef_[0], 1)
    assert top.tolist() == [planted]

    toy = _ToyDecoder()
    loaded = SimpleNamespace(model=toy, adapter=SimpleNamespace(decoder_layers=lambda m: m.layers), hidden_size=d)
    x = torch.tensor(states, dtype=torch.float32).unsqueeze(1)

    def correctness():
        out = toy(x)[:, -1].numpy()
        return (out[np.arange(160), reads] > 0) == labels

    baseline = correctness()
    with ablation.ablate_dimensions(loaded, 0, top):
        ablated = correctness()
    with ablation.ablate_dimensions(loaded, 0, ablation.random_dimensions(d, k=1, seed=3, exclude=[planted, other])):
        control = correctness()
    assert baseline.all()
    effect = study.ablation_effect(baseline, ablated, types, n_boot=500, seed=1).set_index("question_type")
    # every existence "yes" flips to "no": -30/80 = -37.5 pp there, -30/160 = -18.75 pp overall, 0 on count
    assert effect.loc["existence", "delta_pp"] == pytest.approx(-37.5)
    assert effect.loc["all", "delta_pp"] == pytest.approx(-18.75)
    assert effect.loc["count", "delta_pp"] == 0.0 and effect.loc["count", "ci_low_pp"] == 0.0
    assert effect.loc["existence", "ci_low_pp"] < -37.5 < effect.loc["existence", "ci_high_pp"] < 0
    control_effect = study.ablation_effect(baseline, control, types, n_boot=200)
    assert (control_effect["delta_pp"] == 0).all()


def test_top_k_and_random_dimensions():
    w = np.array([0.1, -3.0, 2.0, 0.0, -2.0, 0.5])
    assert ablation.top_k_dimensions(w, 3).tolist() == [1, 2, 4]  # |w| desc, ties by lower index
    assert ablation.top_k_dimensions(w.reshape(1, -1), 0).tolist() == []
    assert ablation.top_k_dimensions(w, 2, feature_std=np.array([100.0, 1, 1, 1, 1, 1])).tolist() == [0, 1]
    r = ablation.random_dimensions(100, k=5, seed=1, exclude=[0, 1, 2])
    assert r.size == 5 and not set(r) & {0, 1, 2} and r.tolist() == ablation.random_dimensions(100, k=5, seed=1, exclude=[0, 1, 2]).tolist()
    assert ablation.random_dimensions(128, fraction=0.5, seed=0).size == 64
    assert np.unique(ablation.random_dimensions(128, fraction=1.0)).size == 128
    with pytest.raises(ValueError, match="k must be"):
        ablation.top_k_dimensions(w, 7)
    with pytest.raises(ValueError, match="fraction"):
        ablation.random_dimensions(10, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        ablation.random_dimensions(10, fraction=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        ablation.random_dimensions(10, k=2, fraction=0.5)


def test_bad_ablation_inputs_raise_clear_errors(tiny_loaded):
    loaded = tiny_loaded["late_fusion"]
    before = _hook_counts(loaded)
    cases = [
        (dict(layer=4, dims=[0]), "out of range for a decoder with 4 layers"),
        (dict(layer=-5, dims=[0]), "out of range"),
        (dict(layer=0, dims=[128]), r"out of range for hidden size 128"),
        (dict(layer=0, dims=[-1]), "out of range"),
        (dict(layer=0, dims=[3, 3]), "duplicate"),
        (dict(layer=0, dims=[0.5]), "integer"),
        (dict(layer=0, dims=[0], mode="half"), "unknown ablation mode"),
        (dict(layer=0, dims=[0], mode="mean"), "needs the per-dimension means"),
        (dict(layer=0, dims=[0, 1], mode="mean", means=[1.0, 2.0, 3.0]), "expected 128"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            with ablation.ablate_dimensions(loaded, **kwargs):
                pass
    assert _hook_counts(loaded) == before


# ------------------------------------------------------------------------------------------ the probe, layers, CLI


def test_ablation_probe_layers_and_cli(tiny_loaded, tiny_model_dirs, tiny_dataset, tmp_path, capsys):
    from safetensors.numpy import save_file

    from vlmrel_core.cli.main import main
    from vlmrel_core.analysis.probes import fit_probe

    loaded = tiny_loaded["late_fusion"]
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 2
    states = rng.normal(size=(60, 128))
    states[:, 9] += 3.0 * labels  # planted: dim 9 carries the label
    probe = fit_probe(states, labels, groups=np.arange(60) // 2, c_grid=(1.0,), n_folds=3, kind="single_layer",
                      layers=[2], pooling="last_token", model_fingerprint=loaded.fingerprint).save(tmp_path / "probe")
    weights = ablation.load_ablation_probe(probe, loaded)
    assert weights.layer == 2 and ablation.top_k_dimensions(weights.weights, 1).tolist() == [9]
    assert ablation.load_ablation_probe(probe / "probe.safetensors", loaded).layer == 2

    out = tmp_path / "ablate.csv"
    rc = main(["ablate", "--model", str(tiny_model_dirs["late_fusion"]), "--data", str(tiny_dataset), "--weights", str(probe),
               "--k", "2", "--limit", "4", "--n-boot", "50", "--mask-fraction", "0", "--random-fraction", "0", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = pd.read_csv(out)
    assert set(table["condition"]) == {"top_k", "random_k"} and set(table["layer"]) == {2} and set(table["k"]) == {2}

    # a probe of another model is refused, through the library and the CLI
    early = tiny_loaded["early_fusion"]
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        ablation.load_ablation_probe(probe, early)
    rc = main(["ablate", "--model", str(tiny_model_dirs["early_fusion"]), "--data", str(tiny_dataset), "--weights", str(probe),
               "--out", str(out)])
    assert rc == 2 and "fingerprint mismatch" in capsys.readouterr().err

    # only probes saved by vlmrel are read (checksummed); bare weight files, .npy or pickle never
    coef = np.zeros((1, 128), dtype=np.float32)
    coef[0, [7, 8, 9]] = [3.0, -2.0, 1.0]
    save_file({"coef": coef}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="bare weight files"):
        ablation.load_ablation_probe(tmp_path / "w.safetensors", loaded)
    np.save(tmp_path / "w.npy", coef)
    with pytest.raises(ValueError, match="bare weight files"):
        ablation.load_ablation_probe(tmp_path / "w.npy")
    with pytest.raises(ValueError, match="not a saved probe"):
        ablation.load_ablation_probe(tmp_path, loaded)
    concat = fit_probe(np.concatenate([states, states], axis=1), labels, groups=np.arange(60) // 2, c_grid=(1.0,),
                       n_folds=3, kind="concat_layers", layers=[1, 2], hidden_size=128, pooling="last_token",
                       model_fingerprint=loaded.fingerprint).save(tmp_path / "concat")
    with pytest.raises(ValueError, match="single-layer probe"):
        ablation.load_ablation_probe(concat, loaded)

    # the layer to ablate: the probe's, unless given (once, or once per model); a different one warns
    probes = {"late": weights}
    assert ablation.ablation_layers(probes, {"late": 4}) == ({"late": 2}, [])
    assert ablation.ablation_layers(probes, {"late": 4}, [-2]) == ({"late": -2}, [])
    layers, warnings = ablation.ablation_layers(probes, {"late": 4}, [1])
    assert layers == {"late": 1} and len(warnings) == 1 and "probe of layer 2, ablating layer 1" in warnings[0]
    with pytest.raises(ValueError, match="once per model"):
        ablation.ablation_layers(probes, {"late": 4}, [1, 2])
