"""Shared pieces of the gate tests: probes with a known output, gate configs, synthetic runs and bundles.

Probes with a known output are built by zeroing a fitted probe's weights (score = sigmoid(intercept)) and
calibrated with T = 1, so the gate's confidence is known exactly. Runs are synthetic `store.RunWriter` caches whose
correctness depends on one hidden dimension (known answers), stamped with a tiny model's fingerprint.

The fixtures ``late_run`` and ``late_bundle`` are module-scoped; a test module imports them by name.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

from vlmrel_core.analysis.probes import Probe, fit_probe
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.store import RunManifest, RunWriter
from vlmrel_core.gate.calibration import TemperatureScaler
from vlmrel_core.gate.config import parse_gate_config
from vlmrel_core.gate.fit import build_gate_from_run
from vlmrel_core.gate.runtime import ReliabilityGate

QUESTION = "is there a red circle in the image?"
FAST_C_GRID = (0.01, 1.0)


def constant_probe(loaded, p: float, layer: int = 3, pooling: str = "last_token") -> Probe:
    """A real `Probe` of ``loaded``'s hidden size and fingerprint whose score is ``p`` for every state."""
    d = loaded.hidden_size
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, d))
    y = np.tile([0, 1], 20)
    fitted = fit_probe(X, y, np.arange(40) // 2, c_grid=(1.0,), n_folds=2, kind="single_layer", pooling=pooling,
                       layers=[layer], hidden_size=d, model_fingerprint=loaded.fingerprint)
    return dataclasses.replace(fitted, coef=np.zeros(d), intercept=float(logit(p)))


def gate_config(loaded, threshold=0.72, gray=(0.65, 0.8), action="self_consistency_k3", layer=-1, **routing):
    data = {
        "reliability_monitor": {
            "architecture": f"{loaded.adapter.fusion}_fusion",
            "target_layer": layer,
            "probe": {"hidden_dim": loaded.hidden_size, "dropout": 0.1, "calibration_method": "temperature_scaling",
                      "temperature": 1.0},
            "routing": {"confidence_threshold": threshold, "fallback_strategy": "human_review",
                        "gray_zone_action": action, **({"gray_zone_bounds": list(gray)} if gray else {}), **routing},
        }
    }
    return parse_gate_config(data)


def make_gate(loaded, p: float, **kwargs) -> ReliabilityGate:
    return ReliabilityGate(loaded, constant_probe(loaded, p), TemperatureScaler(score_kind="prob", temperature=1.0),
                           gate_config(loaded, **kwargs))


class CallCounter:
    """Counts every top-level model call with a plain forward pre-hook (independent of vlmrel's own counting)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


def write_synthetic_run(run_dir, fingerprint, *, n=600, d=128, n_layers=4, signal=3.0, seed=0, shift=0.0,
                        model_source="m", fusion="late", dataset_hash="h0"):
    """States N(1, 1) (a common direction, as real hidden states have); P(correct) = sigmoid(signal·(x0 − 1) + 1)
    at the last layer. ``shift`` moves half the dimensions up and half down (direction and confidence change)."""
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(n, n_layers, d)) + 1.0
    states[:, :, : d // 2] += shift
    states[:, :, d // 2 :] -= shift
    z = signal * (states[:, -1, 0] - 1.0) + 1.0
    correct = (rng.uniform(size=n) < expit(z)).astype(int)
    p = expit(0.5 * z + rng.normal(size=n))
    rows = pd.DataFrame({
        "sample_id": [str(i) for i in range(n)], "image_id": np.arange(n) // 2, "correct": correct,
        "max_answer_prob": 0.5 + 0.5 * p, "top1_prob": p, "mean_token_logprob": np.log(np.clip(p, 1e-3, 1)),
        "top1_top2_margin": np.abs(rng.normal(size=n)) + z.clip(0), "token_entropy": rng.uniform(0, 2, size=n),
    })
    manifest = RunManifest(
        model_source=str(model_source), model_type="llava", family="llava", fusion=fusion, model_fingerprint=fingerprint,
        n_layers=n_layers, hidden_size=d, layers=list(range(n_layers)), poolings=["last_token"], attentions=False,
        attn_implementation="eager", dtype="float32", dataset_path="d.jsonl", dataset_hash=dataset_hash, n_samples=n,
        answer_tokens={"yes_ids": [1], "no_ids": [2]}, normalization="lenient", max_new_tokens=8,
    )
    RunWriter(run_dir, manifest).write_shard(rows, {"states.last_token": states.astype(np.float16)})
    return run_dir


@pytest.fixture(scope="module")
def late_run(tmp_path_factory, tiny_loaded, tiny_model_dirs):
    root = tmp_path_factory.mktemp("gate_runs")
    return write_synthetic_run(root / "late", tiny_loaded["late_fusion"].fingerprint,
                               model_source=tiny_model_dirs["late_fusion"])


@pytest.fixture(scope="module")
def late_bundle(tmp_path_factory, late_run):
    out = tmp_path_factory.mktemp("bundle") / "late_gate"
    return build_gate_from_run(late_run, out, layer=3, risk_target=0.2, delta=0.1, gray_zone=(0.0, 1.0),
                               gray_zone_action="self_consistency_k3", c_grid=FAST_C_GRID)


def scene_images(n, start=0):
    return [render_scene(make_scene(i)) for i in range(start, start + n)]


def without_timings(decision):
    data = decision.to_dict()
    data["evidence"].pop("timings")
    data["evidence"].pop("time_multiplier")
    if data["self_consistency"]:
        data["self_consistency"].pop("seconds")
    return data
