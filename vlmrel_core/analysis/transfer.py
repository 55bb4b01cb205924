"""Does a probe trained on one distribution still work on another? In-domain vs transfer AUROC on the same rows.

Why paired: the in-domain probe and the transferred probe are scored on exactly the same held-out target rows, so
their difference has a paired CI and a difference in AUROC is not a difference in test sets.

Test rows: the target's image-grouped test split. The in-domain probe trains on the target's training images;
the transferred probe trains on every source row whose image is *not* among the target's test images (the
random / popular / adversarial files share one image pool, so without this exclusion a transfer probe would have
seen the test images). For two image-id ranges of one run the ranges are disjoint, so the source is all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmrel_core.analysis.metrics import Estimate, auroc_ci, auroc_gain_ci
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, Probe, fit_probe, training_data_hash
from vlmrel_core.analysis.splits import SplitError, group_keys, holdout_indices, labels_of, range_halves
from vlmrel_core.engine.store import CacheError, RunReader


@dataclass(frozen=True)
class TransferResult:
    """One source → target comparison of a probe at a fixed pooling and layer."""

    kind: str  # "across runs" | "image-id range"
    source: str
    target: str
    pooling: str
    layer: int
    in_domain: Estimate
    transfer: Estimate
    transfer_minus_in_domain: Estimate
    n_train_source: int
    n_train_target: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "source": self.source, "target": self.target, "pooling": self.pooling,
            "layer": self.layer,
            "in_domain_auroc": self.in_domain.value, "in_domain_low": self.in_domain.low,
            "in_domain_high": self.in_domain.high,
            "transfer_auroc": self.transfer.value, "transfer_low": self.transfer.low, "transfer_high": self.transfer.high,
            "difference": self.transfer_minus_in_domain.value, "difference_low": self.transfer_minus_in_domain.low,
            "difference_high": self.transfer_minus_in_domain.high,
            "n_train_source": self.n_train_source, "n_train_target": self.n_train_target, "n_test": self.n_test,
        }


def transfer_probe(
    source_X: np.ndarray, source_y: np.ndarray, source_groups: np.ndarray,
    target_X: np.ndarray, target_y: np.ndarray, target_groups: np.ndarray,
    *, kind: str, source: str, target: str, pooling: str, layer: int,
    test_fraction: float = 0.3, seed: int = 0, n_boot: int = 1000, c_grid: Sequence[float] = DEFAULT_C_GRID,
    in_domain_probe: Probe | None = None,
) -> TransferResult:
    """In-domain (target-trained) and transferred (source-trained) probes on the same held-out target rows.

    ``in_domain_probe`` (e.g. the target's image-split sweep probe at this pooling and layer) is used instead of a
    refit when it was fitted on exactly the target's training rows (training-data hash), seed and C grid; image
    keys are the groups of both, so the refit would return the same probe.
    """
    target_train, target_test = holdout_indices(target_y, target_groups, test_fraction, seed)
    test_groups = set(target_groups[target_test].tolist())
    source_train = np.flatnonzero(~np.isin(source_groups, list(test_groups)))
    if source_train.size == 0:
        raise SplitError(f"every {source} row shares an image with the {target} test rows; nothing to train on")
    if _fitted_on(in_domain_probe, target_X[target_train], target_y[target_train], seed, c_grid):
        in_domain = in_domain_probe
    else:
        in_domain = fit_probe(target_X[target_train], target_y[target_train], target_groups[target_train], seed,
                              c_grid=c_grid)
    transferred = fit_probe(source_X[source_train], source_y[source_train], source_groups[source_train], seed, c_grid=c_grid)
    y_test = target_y[target_test]
    in_scores = in_domain.score(target_X[target_test])
    out_scores = transferred.score(target_X[target_test])
    return TransferResult(
        kind, source, target, pooling, layer,
        auroc_ci(y_test, in_scores, n_boot=n_boot, seed=seed),
        auroc_ci(y_test, out_scores, n_boot=n_boot, seed=seed),
        auroc_gain_ci(y_test, out_scores, in_scores, n_boot=n_boot, seed=seed),
        int(source_train.size), int(target_train.size), int(target_test.size),
    )


def _fitted_on(probe: Probe | None, X: np.ndarray, y: np.ndarray, seed: int, c_grid: Sequence[float]) -> bool:
    return (probe is not None and probe.info.seed == seed and probe.info.c_grid == [float(c) for c in c_grid]
            and probe.info.training_data_hash == training_data_hash(np.asarray(X, dtype=np.float64), y))


def transfer_across_runs(
    source: RunReader, target: RunReader, pooling: str, layer: int, *, source_name: str, target_name: str,
    test_fraction: float = 0.3, seed: int = 0, n_boot: int = 1000, c_grid: Sequence[float] = DEFAULT_C_GRID,
    in_domain_probe: Probe | None = None,
) -> TransferResult:
    """Probe trained on one run (e.g. the random split) tested on another run of the same model (e.g. adversarial)."""
    a, b = source.manifest, target.manifest
    if a.model_fingerprint != b.model_fingerprint:
        raise ValueError(f"transfer needs one model: {source_name} is {a.model_fingerprint!r}, {target_name} is {b.model_fingerprint!r}")
    return transfer_probe(
        source.states(pooling, [layer])[:, 0], labels_of(source.rows), group_keys(source.rows, "image"),
        target.states(pooling, [layer])[:, 0], labels_of(target.rows), group_keys(target.rows, "image"),
        kind="across runs", source=source_name, target=target_name, pooling=pooling, layer=layer,
        test_fraction=test_fraction, seed=seed, n_boot=n_boot, c_grid=c_grid, in_domain_probe=in_domain_probe,
    )


def transfer_image_ranges(
    reader: RunReader, pooling: str, layer: int, *, run_name: str,
    test_fraction: float = 0.3, seed: int = 0, n_boot: int = 1000, c_grid: Sequence[float] = DEFAULT_C_GRID,
) -> list[TransferResult]:
    """Image-id range A → B and B → A within one run (A, B = lower / upper half of the distinct image ids)."""
    rows = reader.rows
    a, b, description = range_halves(rows)
    X = reader.states(pooling, [layer])[:, 0]
    y = labels_of(rows)
    groups = group_keys(rows, "image")
    lower, upper = description.split(" | ")
    names = {"A": f"{run_name} images {lower.split(' ', 1)[1]}", "B": f"{run_name} images {upper}"}
    results = []
    for (src_key, src), (tgt_key, tgt) in ((("A", a), ("B", b)), (("B", b), ("A", a))):
        results.append(transfer_probe(
            X[src], y[src], groups[src], X[tgt], y[tgt], groups[tgt],
            kind="image-id range", source=names[src_key], target=names[tgt_key], pooling=pooling, layer=layer,
            test_fraction=test_fraction, seed=seed, n_boot=n_boot, c_grid=c_grid,
        ))
    return results


@dataclass(frozen=True)
class TransferRun:
    """What the transfer table needs of one run's report: where it is, its model, its chosen probe and sweep."""

    name: str
    run_dir: str | Path
    model_fingerprint: str
    chosen: Any  # sweep.LayerResult: the CV-selected (pooling, layer) on the image split
    image_sweep: Any = None  # sweep.LayerSweep on the image split, whose probes serve as in-domain probes


@dataclass(frozen=True)
class TransferTask:
    """One entry of the transfer table: a run pair (``target`` set) or one run's image-id ranges."""

    source: TransferRun
    target: TransferRun | None
    in_domain_probe: Probe | None
    options: dict[str, Any]
    cost: float


def transfer_tasks(runs: Sequence[TransferRun], **options: Any) -> list[TransferTask]:
    """Every ordered pair of runs of one model, then each source's image-id ranges, in the report's order."""
    tasks = []
    sizes = {i: float(len(RunReader(r.run_dir).rows)) for i, r in enumerate(runs)}
    for i, source in enumerate(runs):
        key = (source.chosen.pooling, source.chosen.layer)
        for j, target in enumerate(runs):
            if i == j or source.model_fingerprint != target.model_fingerprint:
                continue
            probe = target.image_sweep.probes.get(key) if target.image_sweep is not None else None
            tasks.append(TransferTask(source, target, probe, options, sizes[i] * (1 if probe is not None else 2)))
        tasks.append(TransferTask(source, None, None, options, 2 * sizes[i]))
    return tasks


def run_transfer_task(task: TransferTask) -> tuple[list[TransferResult], str]:
    """(results, note): a skipped pair or range gives no result and a note saying why."""
    source, target, pooling, layer = task.source, task.target, task.source.chosen.pooling, task.source.chosen.layer
    try:
        if target is not None:
            return [transfer_across_runs(RunReader(source.run_dir), RunReader(target.run_dir), pooling, layer,
                                         source_name=source.name, target_name=target.name,
                                         in_domain_probe=task.in_domain_probe, **task.options)], ""
        return transfer_image_ranges(RunReader(source.run_dir), pooling, layer, run_name=source.name, **task.options), ""
    except (ValueError, CacheError) as err:
        if target is not None:
            return [], f"transfer {source.name} → {target.name} skipped: {err}"
        return [], f"image-range transfer in {source.name} skipped: {err}"


__all__ = ["TransferResult", "TransferRun", "TransferTask", "transfer_probe", "transfer_across_runs",
           "transfer_image_ranges", "transfer_tasks", "run_transfer_task"]
