"""The layer sweep: one held-out probe per (pooling, layer), the best layer, the plateau and the CV-selected probe.

Why separate from `probes`: a probe is one fitted object; the sweep is the experiment over layers that the report,
the gate and the dashboard read. Choosing a layer by test AUROC is optimistic, so the sweep also records the layer
chosen by grouped CV on the training split (`LayerSweep.selected`), which every downstream comparison uses.

sweep.csv (written by `write_sweep` and, with ``run`` and ``grouping`` appended, by `report_io.write_report`) has
one row per pooling × layer and these columns, in this order (stable: add new ones at the end, never rename):

* ``pooling`` (str), ``layer`` (int, 0-based decoder layer)
* ``auroc``, ``auroc_low``, ``auroc_high`` (float): held-out AUROC and its row-bootstrap 95% CI
* ``cv_auroc`` (float, NaN if undefined): grouped-CV AUROC on the training split at the chosen C
* ``C`` (float): the chosen inverse regularisation strength
* ``n_train``, ``n_test`` (int): rows in the split's training and test parts
* ``best_of_pooling`` (bool): highest held-out AUROC of its pooling (descriptive only)
* ``in_plateau`` (bool): held-out AUROC CI upper bound >= the pooling's best point estimate
* ``cv_selected`` (bool): the one (pooling, layer) chosen by training-split CV over all poolings
* report only: ``run`` (str, "<model>/<split>"), ``grouping`` ("image" | "item")

sweep.json holds `LayerSweep.to_dict` (keys run_dir, model_fingerprint, split, results, best, best_overall,
plateau, plateau_overall, cv_selected, plateau_rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vlmrel_core.analysis.metrics import Estimate, auroc_ci
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, Probe, ProbeError, fit_run_probe, resolve_split
from vlmrel_core.analysis.splits import Split, SplitSpec, labels_of
from vlmrel_core.analysis.tables import markdown_table, sweep_display
from vlmrel_core.engine.store import RunReader
from vlmrel_core.io import atomic_write_text
from vlmrel_core.progress import Progress, report


@dataclass(frozen=True)
class LayerResult:
    """One (pooling, layer) probe: held-out AUROC with its 95% CI, and how it was fitted."""

    pooling: str
    layer: int
    auroc: Estimate
    cv_auroc: float
    C: float
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling, "layer": self.layer, "auroc": self.auroc.value, "auroc_low": self.auroc.low,
            "auroc_high": self.auroc.high, "cv_auroc": self.cv_auroc, "C": self.C, "n_train": self.n_train,
            "n_test": self.n_test,
        }


@dataclass
class LayerSweep:
    """Per layer × pooling held-out probe AUROC on one split, with the fitted probes and their test scores."""

    results: list[LayerResult]
    split: Split
    model_fingerprint: str
    run_dir: str
    probes: dict[tuple[str, int], Probe] = field(default_factory=dict, repr=False)
    test_scores: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def poolings(self) -> list[str]:
        return list(dict.fromkeys(r.pooling for r in self.results))

    def _of(self, pooling: str | None) -> list[LayerResult]:
        chosen = [r for r in self.results if pooling is None or r.pooling == pooling]
        if not chosen:
            raise ProbeError(f"the sweep has no results for pooling {pooling!r}; it has {self.poolings}")
        return chosen

    def best(self, pooling: str | None = None) -> LayerResult:
        """Highest held-out AUROC point estimate (of one pooling, or over all); ties go to the earlier layer.

        Descriptive only: choosing by test AUROC and then quoting it is optimistic. Use `selected` to pick the probe
        that other comparisons (controls, transfer) use.
        """
        return max(self._of(pooling), key=lambda r: (r.auroc.value, -r.layer))

    def plateau(self, pooling: str | None = None) -> list[LayerResult]:
        """The layers statistically indistinguishable from the best one, by a one-sided CI rule.

        Precisely: with b = `best(pooling)`, the plateau is every result r (of that pooling; over all poolings
        when pooling is None) whose held-out AUROC 95% CI upper bound r.auroc.high >= b.auroc.value, the best
        layer's point estimate. It always contains b. The CIs are the row bootstrap of `metrics.auroc_ci` on the
        same test rows. Choose a layer from the plateau (e.g. the earliest, or `selected`), not the argmax.
        """
        top = self.best(pooling).auroc.value
        return [r for r in self._of(pooling) if r.auroc.high >= top]

    def selected(self, pooling: str | None = None) -> LayerResult:
        """The probe chosen without test data: highest grouped-CV AUROC on the training split (ties: later layer)."""
        return max(self._of(pooling), key=lambda r: (r.cv_auroc, r.layer))

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([r.to_dict() for r in self.results])
        best = {p: self.best(p).layer for p in self.poolings}
        plateaus = {p: {r.layer for r in self.plateau(p)} for p in self.poolings}
        selected = self.selected()
        frame["best_of_pooling"] = [best[p] == l for p, l in zip(frame["pooling"], frame["layer"])]
        frame["in_plateau"] = [l in plateaus[p] for p, l in zip(frame["pooling"], frame["layer"])]
        frame["cv_selected"] = [(p, l) == (selected.pooling, selected.layer) for p, l in zip(frame["pooling"], frame["layer"])]
        return frame

    def to_dict(self) -> dict[str, Any]:
        overall, selected = self.best(), self.selected()
        return {
            "run_dir": self.run_dir,
            "model_fingerprint": self.model_fingerprint,
            "split": self.split.summary(),
            "results": [r.to_dict() for r in self.results],
            "best": {p: self.best(p).to_dict() for p in self.poolings},
            "best_overall": overall.to_dict(),
            "plateau": {p: [r.layer for r in self.plateau(p)] for p in self.poolings},
            "plateau_overall": [[r.pooling, r.layer] for r in self.plateau()],
            "cv_selected": selected.to_dict(),
            "plateau_rule": "layers whose held-out AUROC 95% CI upper bound >= the best layer's point estimate",
        }


def sweep_layers(
    reader: RunReader,
    poolings: Sequence[str] | None = None,
    split: Split | SplitSpec | None = None,
    *,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    progress: Progress | None = None,
) -> LayerSweep:
    """Fit one probe per (pooling, layer) on the training rows and score the held-out rows.

    ``poolings`` / ``layers`` default to everything the run extracted; ``split`` defaults to an image-grouped
    SplitSpec(). Memory: one layer of one pooling, (n, 1, d) float32, at a time. ``progress`` gets one step per
    fitted probe, with stage "layer i/n <pooling>".
    """
    split = resolve_split(reader, split)
    manifest = reader.manifest
    poolings = list(poolings) if poolings is not None else list(manifest.poolings)
    layers = list(layers) if layers is not None else list(manifest.layers)
    y = labels_of(reader.rows)
    y_test = y[split.test]
    results: list[LayerResult] = []
    probes: dict[tuple[str, int], Probe] = {}
    scores: dict[tuple[str, int], np.ndarray] = {}
    total = len(poolings) * len(layers)
    report(progress, 0, total, "loading states")
    for p_index, pooling in enumerate(poolings):
        for l_index, layer in enumerate(layers):
            layer_states = reader.states(pooling, [layer])  # one layer in memory at a time, never the whole cache
            probe = fit_run_probe(reader, pooling, [layer], split, seed, c_grid=c_grid, layer_states=layer_states)
            test_score = probe.score(layer_states[split.test, 0])
            estimate = auroc_ci(y_test, test_score, n_boot=n_boot, seed=seed)
            probe.info.metrics.update({"test_auroc": estimate.to_dict(), "n_test": int(split.test.size)})
            cv = probe.info.cv_auroc
            results.append(LayerResult(pooling, layer, estimate, float("nan") if cv is None else cv, probe.info.C,
                                       int(split.train.size), int(split.test.size)))
            probes[(pooling, layer)] = probe
            scores[(pooling, layer)] = test_score
            report(progress, p_index * len(layers) + l_index + 1, total, f"layer {l_index + 1}/{len(layers)} {pooling}")
    return LayerSweep(results, split, manifest.model_fingerprint, str(reader.run_dir), probes, scores)


def write_sweep(sweep: LayerSweep, out_dir: str | Path) -> list[Path]:
    """sweep.csv (one row per pooling × layer, columns in the module docstring), sweep.json and sweep.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = sweep.to_frame()
    atomic_write_text(out / "sweep.csv", frame.to_csv(index=False))
    atomic_write_text(out / "sweep.json", json.dumps(sweep.to_dict(), indent=1))
    summary = sweep.to_dict()
    lines = [
        f"# Layer sweep: {sweep.run_dir}",
        "",
        f"Split: {sweep.split.spec.grouping}-grouped, n_train={sweep.split.train.size}, n_test={sweep.split.test.size}, "
        f"seed={sweep.split.spec.seed}. Held-out AUROC with row-bootstrap 95% CI.",
        f"Plateau rule: {summary['plateau_rule']}.",
        f"Best overall (by test AUROC, descriptive): {sweep.best().pooling} layer {sweep.best().layer}; "
        f"selected by training-split CV (used elsewhere): {sweep.selected().pooling} layer {sweep.selected().layer}.",
        "",
        markdown_table(sweep_display(frame)),
    ]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return [out / "sweep.csv", out / "sweep.json", out / "sweep.md"]
