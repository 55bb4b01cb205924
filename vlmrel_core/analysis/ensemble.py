"""Multi-layer probes: one probe on the concatenated last-k layers, and the mean of per-layer probes' scores.

Why both: concatenation lets one probe weigh layers against each other; the mean-score ensemble (late fusion) needs
no new fit when the sweep already has the per-layer probes. Each is reported with a held-out AUROC CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from vlmrel_core.analysis.metrics import Estimate, auroc_ci
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, Probe, ProbeError, fit_run_probe, load_probe, resolve_split
from vlmrel_core.analysis.splits import Split, SplitSpec, labels_of
from vlmrel_core.analysis.sweep import LayerSweep
from vlmrel_core.engine.store import RunReader
from vlmrel_core.io import atomic_write_text

ENSEMBLE_JSON = "ensemble.json"


@dataclass
class MeanScoreEnsemble:
    """Late fusion over layers: the mean of per-layer probes' P(correct). Members share one pooling."""

    members: list[Probe]

    @property
    def layers(self) -> list[int]:
        return [m.info.layers[0] for m in self.members]

    def score(self, states: np.ndarray) -> np.ndarray:
        """states: (n, k, d) with the k member layers in `layers` order."""
        array = np.asarray(states)
        if array.ndim != 3 or array.shape[1] != len(self.members):
            raise ProbeError(f"expected states of shape (n, {len(self.members)}, d) for layers {self.layers}, got {array.shape}")
        return np.mean([m.score(array[:, i]) for i, m in enumerate(self.members)], axis=0)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for member in self.members:
            name = f"layer-{member.info.layers[0]:03d}"
            member.save(directory / name)
            names.append(name)
        atomic_write_text(directory / ENSEMBLE_JSON, json.dumps({"kind": "mean_score", "members": names}, indent=1))
        return directory


def load_ensemble(
    directory: str | Path, expected_fingerprint: str | None = None, expected_hidden_size: int | None = None
) -> MeanScoreEnsemble:
    """Load a saved mean-score ensemble; every member is checked like `load_probe`."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / ENSEMBLE_JSON).read_text())
        names = [str(n) for n in spec["members"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProbeError(f"{directory} is not a saved probe ensemble: {err}") from err
    if any("/" in n or n.startswith(".") for n in names):
        raise ProbeError(f"{directory / ENSEMBLE_JSON} names members outside its directory")
    return MeanScoreEnsemble([load_probe(directory / n, expected_fingerprint, expected_hidden_size) for n in names])


@dataclass
class EnsembleResult:
    """The two multi-layer variants on one split: concatenated last-k states, and mean of per-layer scores."""

    pooling: str
    layers: list[int]
    concat: Probe
    mean_score: MeanScoreEnsemble
    concat_auroc: Estimate
    mean_score_auroc: Estimate
    concat_test_scores: np.ndarray = field(repr=False)
    mean_score_test_scores: np.ndarray = field(repr=False)


def fit_ensembles(
    reader: RunReader,
    pooling: str,
    split: Split | SplitSpec | None = None,
    k: int = 5,
    seed: int = 0,
    *,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    sweep: LayerSweep | None = None,
) -> EnsembleResult:
    """Both ensembles over the last ``k`` extracted layers (fewer if the run has fewer), held-out AUROC with CI.

    Member probes of the mean-score ensemble are taken from ``sweep`` when it was run on the same split.
    """
    split = resolve_split(reader, split)
    manifest = reader.manifest
    layers = list(manifest.layers)[-k:]
    states = reader.states(pooling, layers)  # the ensemble's layers only
    y_test = labels_of(reader.rows)[split.test]
    concat = fit_run_probe(reader, pooling, layers, split, seed, c_grid=c_grid, layer_states=states)
    test_states = states[split.test]
    concat_scores = concat.score(test_states)
    reuse = sweep is not None and np.array_equal(sweep.split.test, split.test)
    members = [
        sweep.probes[(pooling, l)] if reuse and (pooling, l) in sweep.probes
        else fit_run_probe(reader, pooling, [l], split, seed, c_grid=c_grid, layer_states=states[:, i : i + 1])
        for i, l in enumerate(layers)
    ]
    ensemble = MeanScoreEnsemble(members)
    mean_scores = ensemble.score(test_states)
    return EnsembleResult(
        pooling, layers, concat, ensemble,
        auroc_ci(y_test, concat_scores, n_boot=n_boot, seed=seed),
        auroc_ci(y_test, mean_scores, n_boot=n_boot, seed=seed),
        concat_scores, mean_scores,
    )
