"""The comparison report: every signal and control in the paper's Table-7 shape, the claims they support, transfer.

Why built here and written in `report_io`: the report is the product's scientific claim, so it is built headless
from extraction runs with fixed seeds, every number held-out and every comparison carrying its CI; the dashboard
only reads what `report_io.write_report` writes. Raw and per-layer signal scoring live in `layer_signals`, table
formatting in `tables`.

Conventions (stated again in every written report):
* Every signal is oriented so that higher = more likely correct *before* its AUROC is taken; signals where lower
  raw values mean "correct" (entropies, cluster count, ΔH_s) are negated and marked so. Nothing is flipped after
  looking at the data.
* Raw (unfitted) signals are scored on the same held-out rows as the probes and controls, so all rows of one
  table are paired.
* AUROC is invariant to monotone calibration (temperature, isotonic); calibrated scores are never listed as
  separate signals or gains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vlmrel_core.analysis.claims import Claim, make_claim
from vlmrel_core.analysis.controls import N_PERMUTATIONS, ControlSuite, ScoredSignal, evaluate_scores, run_controls
from vlmrel_core.analysis.ensemble import EnsembleResult, fit_ensembles
from vlmrel_core.analysis.layer_signals import (
    AS_IS, FITTED, NEGATED, attention_signal_arrays, layer_signal_table, raw_signals,
)
from vlmrel_core.analysis.probes import DEFAULT_C_GRID
from vlmrel_core.analysis.splits import GROUPINGS, SplitError, SplitSpec, make_split
from vlmrel_core.analysis.sweep import LayerSweep, sweep_layers
from vlmrel_core.analysis.tables import format_estimate, row_estimate
from vlmrel_core.analysis.transfer import TransferResult, TransferRun, run_transfer_task, transfer_tasks
from vlmrel_core.analysis.parallel import resolve_n_jobs, run_tasks
from vlmrel_core.engine.store import RunReader
from vlmrel_core.progress import Progress, report as report_progress, scaled


def run_name(reader: RunReader) -> str:
    """"<model>/<split>": the model directory's name and the split file the run was extracted from."""
    rows = reader.rows
    splits = rows["split"].dropna().unique() if "split" in rows.columns else []
    split = str(splits[0]) if len(splits) == 1 else Path(reader.manifest.dataset_path).stem
    model = Path(reader.manifest.model_source.rstrip("/")).name or reader.manifest.family
    return f"{model}/{split}"


# --------------------------------------------------------------------------------------------------- run report


@dataclass
class RunReport:
    """Everything computed for one extraction run (one model × one split file)."""

    name: str
    run_dir: str
    manifest: dict[str, Any]
    n: int
    accuracy: float
    sweeps: dict[str, LayerSweep] = field(repr=False)
    ensembles: dict[str, EnsembleResult] = field(repr=False)
    controls: dict[str, ControlSuite] = field(repr=False)
    table7: pd.DataFrame = field(repr=False)
    layer_signals: pd.DataFrame = field(repr=False)
    claim: Claim
    notes: list[str] = field(default_factory=list)


def _signal_row(run: str, grouping: str, key: str, signal: ScoredSignal, orientation: str) -> dict[str, Any]:
    record = {"run": run, "grouping": grouping, "key": key}
    record.update(signal.to_dict())
    record.update(orientation=orientation, n_test=int(signal.test_scores.size))
    return record


def _orientation_of(signal: ScoredSignal) -> str:
    if signal.kind in ("probe", "control", "fusion") or signal.C is not None:
        return FITTED
    return NEGATED if signal.name.startswith("−") else AS_IS



@dataclass
class _RunInputs:
    """What every grouping of one run shares: its name, splits and attention features (computed once per run)."""

    run_dir: str
    name: str
    manifest: dict[str, Any]
    n: int
    accuracy: float
    splits: dict[str, Any]
    attention: dict[str, tuple[dict[str, np.ndarray] | None, str]]
    notes: list[str]


@dataclass
class _GroupingResult:
    sweep: LayerSweep
    ensemble: EnsembleResult
    suite: ControlSuite
    rows: list[dict[str, Any]]
    layer_table: pd.DataFrame | None


def _run_inputs(run_dir: str | Path, test_fraction: float, seed: int, groupings: Sequence[str]) -> _RunInputs:
    reader = RunReader(run_dir)
    rows = reader.rows
    notes: list[str] = []
    splits = {}
    for grouping in groupings:
        try:
            splits[grouping] = make_split(rows, SplitSpec(grouping, test_fraction, 0.0, seed))  # type: ignore[arg-type]
        except SplitError as err:
            notes.append(f"{grouping}-grouped split skipped: {err}")
    if not splits:
        raise SplitError(f"{run_dir}: no split could be made ({'; '.join(notes)})")
    needed = np.unique(np.concatenate([s.test for s in splits.values()]))
    attention_result = attention_signal_arrays(reader, needed)
    position = {int(r): i for i, r in enumerate(needed)}
    attention: dict[str, tuple[dict[str, np.ndarray] | None, str]] = {}
    for grouping, split in splits.items():
        if attention_result is None:
            attention[grouping] = (None, "")
        else:
            local = np.array([position[int(r)] for r in split.test])
            attention[grouping] = ({k: v[local] for k, v in attention_result[0].items()}, attention_result[1])
    manifest = reader.manifest
    return _RunInputs(
        run_dir=str(run_dir), name=run_name(reader),
        manifest={"model_source": manifest.model_source, "model_fingerprint": manifest.model_fingerprint,
                  "family": manifest.family, "fusion": manifest.fusion, "n_layers": manifest.n_layers,
                  "hidden_size": manifest.hidden_size, "dataset_path": manifest.dataset_path,
                  "dataset_hash": manifest.dataset_hash, "answer_tokens": manifest.answer_tokens},
        n=len(rows), accuracy=float(rows["correct"].mean()), splits=splits, attention=attention, notes=notes,
    )


def _grouping_report(
    run: RunReader | str, name: str, grouping: str, split: Any, attention: dict[str, np.ndarray] | None,
    attention_note: str, with_layer_table: bool, options: dict[str, Any], progress: Progress | None = None,
    sweep: LayerSweep | None = None,
) -> _GroupingResult:
    """Sweep, ensembles, controls and Table-7 rows of one run on one split (a task of its own: no shared state).

    ``sweep``: this split's layer sweep when already fitted (the parallel plan fits it pooling by pooling).
    ``progress`` runs 0..1000 over this grouping.
    """
    reader = run if isinstance(run, RunReader) else RunReader(run)
    seed, n_boot, c_grid = options["seed"], options["n_boot"], options["c_grid"]

    def step(fraction: float, stage: str) -> None:
        report_progress(progress, int(round(fraction * 1000)), 1000, stage)

    if sweep is None:
        sweep = sweep_layers(reader, options["poolings"], split, seed=seed, n_boot=n_boot, c_grid=c_grid,
                             progress=scaled(progress, 0.0, 0.6))
    selected = sweep.selected()
    step(0.6, "ensembles")
    ensemble = fit_ensembles(reader, selected.pooling, split, options["ensemble_k"], seed, n_boot=n_boot,
                             c_grid=c_grid, sweep=sweep)
    step(0.7, "controls")
    suite = run_controls(reader, split, sweep.probes[(selected.pooling, selected.layer)], seed=seed,
                         n_boot=n_boot, c_grid=c_grid, n_permutations=options["n_permutations"])
    y_test = reader.rows["correct"].astype(np.int64).to_numpy()[split.test]
    step(0.9, "signals")
    table = []
    for key, signal in raw_signals(reader, split.test, attention, attention_note, n_boot=n_boot, seed=seed):
        table.append(_signal_row(name, grouping, key, signal, _orientation_of(signal)))
    best = sweep.best()
    probe_rows = [
        ("probe_selected", suite.signals["probe"]),
        ("probe_best_on_test", evaluate_scores(f"probe ({best.pooling} L{best.layer}), best on test", "probe",
                        "layer chosen by held-out AUROC", y_test, sweep.test_scores[(best.pooling, best.layer)],
                        "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed,
                        note="layer chosen on these test rows: optimistic, descriptive only")),
        ("probe_concat", evaluate_scores(f"probe ({ensemble.pooling} last {len(ensemble.layers)} layers concatenated)", "probe",
                        "one probe on the concatenated states", y_test, ensemble.concat_test_scores,
                        "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed, C=ensemble.concat.info.C)),
        ("probe_mean_score", evaluate_scores(f"probe ({ensemble.pooling} last {len(ensemble.layers)} layers, mean score)", "probe",
                        "mean of the per-layer probes' P(correct)", y_test, ensemble.mean_score_test_scores,
                        "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed)),
    ]
    for key, signal in probe_rows:
        table.append(_signal_row(name, grouping, key, signal, FITTED))
    for key in ("answer_only", "item_control", "shuffled_label_probe", "no_model", "output_model", "fusion"):
        table.append(_signal_row(name, grouping, key, suite.signals[key], FITTED))
    layer_table = None
    if with_layer_table:
        layer_table = layer_signal_table(reader, split.test, attention, attention_note, sweep,
                                         n_boot=n_boot, seed=seed).assign(run=name, grouping=grouping)
    step(1.0, "done")
    return _GroupingResult(sweep, ensemble, suite, table, layer_table)


def _grouping_tasks(inputs: _RunInputs, options: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One `_grouping_report` argument tuple per split; the per-layer table on the image split (else the first)."""
    return [
        (inputs.run_dir, inputs.name, grouping, split, *inputs.attention[grouping],
         grouping == "image" or "image" not in inputs.splits, options)
        for grouping, split in inputs.splits.items()
    ]


def _assemble(inputs: _RunInputs, results: Sequence[_GroupingResult]) -> RunReport:
    groupings = list(inputs.splits)
    sweeps = {g: r.sweep for g, r in zip(groupings, results)}
    controls = {g: r.suite for g, r in zip(groupings, results)}
    layer_tables = [r.layer_table for r in results if r.layer_table is not None]
    return RunReport(
        name=inputs.name, run_dir=inputs.run_dir, manifest=inputs.manifest, n=inputs.n, accuracy=inputs.accuracy,
        sweeps=sweeps, ensembles={g: r.ensemble for g, r in zip(groupings, results)}, controls=controls,
        table7=pd.DataFrame([row for r in results for row in r.rows]),
        layer_signals=pd.concat(layer_tables, ignore_index=True) if layer_tables else pd.DataFrame(),
        claim=make_claim(inputs.name, controls), notes=inputs.notes,
    )


def build_run_report(
    run_dir: str | Path,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    test_fraction: float = 0.3,
    poolings: Sequence[str] | None = None,
    ensemble_k: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    groupings: Sequence[str] = GROUPINGS,
    n_permutations: int = N_PERMUTATIONS,
    n_jobs: int | None = 1,
    progress: Progress | None = None,
) -> RunReport:
    """Sweep, ensembles, controls, raw signals and per-layer signals for one run, on image- and item-grouped splits.

    ``n_jobs`` > 1 runs the groupings in worker processes (`parallel.run_tasks`; the numbers do not change).
    ``progress`` runs 0..1000 over the run; stages name the grouping and step ("image: layer 3/8 last_token",
    "image: ensembles", "image: controls", "image: signals").
    """
    options = dict(seed=seed, n_boot=n_boot, poolings=poolings, ensemble_k=ensemble_k, c_grid=c_grid,
                   n_permutations=n_permutations)
    inputs = _run_inputs(run_dir, test_fraction, seed, groupings)
    tasks = _grouping_tasks(inputs, options)
    if resolve_n_jobs(n_jobs) > 1 and len(tasks) > 1:
        return _assemble(inputs, run_tasks(_grouping_report, tasks, n_jobs, progress=scaled(progress, 0.0, 1.0),
                                           stage="groupings"))
    reader = RunReader(run_dir)
    share = 1.0 / len(tasks)
    results = []
    for g_index, task in enumerate(tasks):
        sub = scaled(progress, g_index * share, (g_index + 1) * share)
        results.append(_grouping_report(reader, *task[1:], progress=_prefixed(sub, f"{task[2]}: ") if sub else None))
    return _assemble(inputs, results)


def _prefixed(progress: Progress, prefix: str) -> Progress:
    """``progress`` with ``prefix`` put before every stage (which grouping or run a sub-step belongs to)."""
    def update(done: int, total: int, stage: str = "") -> None:
        progress(done, total, prefix + stage)

    return update


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """All runs' results plus the cross-run transfer table and the settings that reproduce them."""

    runs: list[RunReport]
    transfer: pd.DataFrame
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def table7(self) -> pd.DataFrame:
        return pd.concat([r.table7 for r in self.runs], ignore_index=True)

    @property
    def gains(self) -> pd.DataFrame:
        frames = [s.gains_frame().assign(run=r.name) for r in self.runs for s in r.controls.values()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def sweeps(self) -> pd.DataFrame:
        frames = [s.to_frame().assign(run=r.name, grouping=g) for r in self.runs for g, s in r.sweeps.items()]
        return pd.concat(frames, ignore_index=True)

    @property
    def layer_signals(self) -> pd.DataFrame:
        frames = [r.layer_signals for r in self.runs if not r.layer_signals.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def claims(self) -> list[Claim]:
        return [r.claim for r in self.runs]

    def headline(self) -> pd.DataFrame:
        """Per run and grouping: probe vs max-prob vs item control vs attention H_s vs fusion (AUROC [CI])."""
        wanted = {"probe (CV-selected layer)": "probe_selected", "max-prob": "max_answer_prob",
                  "item control": "item_control", "attention H_s": "attention_spatial_entropy", "fusion": "fusion"}
        records = []
        table = self.table7
        for (run, grouping), part in table.groupby(["run", "grouping"], sort=False):
            record: dict[str, Any] = {"run": run, "grouping": grouping}
            for label, key in wanted.items():
                hit = part[part["key"] == key]
                record[label] = format_estimate(row_estimate(hit.iloc[0], "auroc")) if len(hit) else "—"
            records.append(record)
        return pd.DataFrame(records)


def build_report(
    run_dirs: str | Path | Sequence[str | Path],
    *,
    seed: int = 0,
    n_boot: int = 1000,
    test_fraction: float = 0.3,
    poolings: Sequence[str] | None = None,
    ensemble_k: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    transfer: bool = True,
    n_permutations: int = N_PERMUTATIONS,
    n_jobs: int | None = 1,
    progress: Progress | None = None,
) -> Report:
    """The full report for one or several runs (e.g. one model's random / popular / adversarial caches).

    Transfer: for every ordered pair of runs of the same model (fingerprint), the source's CV-selected probe
    (pooling, layer on the image split) is trained on the source and tested on the target; and within each run,
    image-id range A → B and B → A. The in-domain probe of a pair is the target's sweep probe, not a refit.
    ``n_jobs`` > 1 (-1: every core) fits over worker processes (`_build_in_workers`); the numbers equal
    ``n_jobs=1``'s. ``progress`` runs 0..1000: 90% over the runs, 10% over the transfer (in workers: 10% features,
    55% sweeps, 35% the rest with the transfer).
    """
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not dirs:
        raise ValueError("build_report needs at least one run directory")
    options = dict(seed=seed, n_boot=n_boot, test_fraction=test_fraction, poolings=poolings, ensemble_k=ensemble_k,
                   c_grid=c_grid)
    runs: list[RunReport] = []
    transferred: list[tuple[list[TransferResult], str]] | None = None
    if resolve_n_jobs(n_jobs) > 1:
        task_options = {**{k: v for k, v in options.items() if k != "test_fraction"}, "n_permutations": n_permutations}
        runs, transferred = _build_in_workers(dirs, task_options, test_fraction, transfer, n_jobs, progress)
    else:
        for i, run_dir in enumerate(dirs):
            run_progress = scaled(progress, 0.9 * i / len(dirs), 0.9 * (i + 1) / len(dirs))
            if run_progress is not None and len(dirs) > 1:
                run_progress = _prefixed(run_progress, f"run {i + 1}/{len(dirs)} ")
            runs.append(build_run_report(run_dir, n_permutations=n_permutations, progress=run_progress,
                                         **options))  # type: ignore[arg-type]
    for run, name in zip(runs, _distinct_names([r.name for r in runs])):
        if name != run.name:  # two runs with one name (same model, same split file) stay distinguishable
            run.name = name
            run.claim.run = run.name
            run.table7 = run.table7.assign(run=run.name)  # the tables carry the run's name too
            if not run.layer_signals.empty:
                run.layer_signals = run.layer_signals.assign(run=run.name)
    results_table: list[TransferResult] = []
    notes: list[str] = []
    if transfer:
        if transferred is None:
            report_progress(progress, 900, 1000, "transfer")
            tasks = _transfer_tasks([r.name for r in runs], [r.run_dir for r in runs],
                                    [r.manifest["model_fingerprint"] for r in runs], [r.sweeps for r in runs],
                                    test_fraction, task_options=options)
            transferred = run_tasks(run_transfer_task, [(t,) for t in tasks], 1, stage="transfer",
                                    progress=scaled(progress, 0.9, 1.0))
        for found, note in transferred:
            results_table.extend(found)
            if note:
                notes.append(note)
    settings = {**options, "c_grid": list(c_grid), "poolings": None if poolings is None else list(poolings),
                "n_permutations": n_permutations,
                "run_dirs": [str(d) for d in dirs], "ci": "95% percentile bootstrap"}
    report_progress(progress, 1000, 1000, "done")
    return Report(runs, pd.DataFrame([r.to_dict() for r in results_table]), settings, notes)


# --------------------------------------------------------------------------------------------------- in workers

#: Relative cost of a grouping's work after its sweep (ensembles, controls, signals), in the transfer tasks' unit
#: (rows × probe fits): measured ~9 fits' worth per row on the shipped runs.
_REST_COST_PER_ROW = 9.0


def _distinct_names(names: Sequence[str]) -> list[str]:
    """``names`` with a second, third ... equal name suffixed "#2", "#3" (same model, same split file)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _transfer_tasks(names: Sequence[str], run_dirs: Sequence[str], fingerprints: Sequence[str],
                    sweeps: Sequence[dict[str, LayerSweep]], test_fraction: float, task_options: dict[str, Any]) -> list:
    """The transfer table's tasks: each run's CV-selected probe on its image split (else its first split)."""
    return transfer_tasks(
        [TransferRun(name, run_dir, fingerprint, (s.get("image") or next(iter(s.values()))).selected(), s.get("image"))
         for name, run_dir, fingerprint, s in zip(names, run_dirs, fingerprints, sweeps)],
        test_fraction=test_fraction, seed=task_options["seed"], n_boot=task_options["n_boot"],
        c_grid=task_options["c_grid"])


def _sweep_part(run_dir: str, split: Any, pooling: str, options: dict[str, Any]) -> LayerSweep:
    """One pooling's layer sweep on one split: a worker task (`_merged_sweep` joins a split's poolings in order)."""
    return sweep_layers(RunReader(run_dir), [pooling], split, seed=options["seed"], n_boot=options["n_boot"],
                        c_grid=options["c_grid"])


def _merged_sweep(parts: Sequence[LayerSweep]) -> LayerSweep:
    """The sweep over all poolings from its per-pooling parts (each fit is independent: the same numbers)."""
    first = parts[0]
    return LayerSweep([r for p in parts for r in p.results], first.split, first.model_fingerprint, first.run_dir,
                      {k: v for p in parts for k, v in p.probes.items()},
                      {k: v for p in parts for k, v in p.test_scores.items()})


def _call(function: Any, *args: Any) -> Any:
    return function(*args)


def _build_in_workers(
    dirs: Sequence[str | Path], options: dict[str, Any], test_fraction: float, transfer: bool, n_jobs: int | None,
    progress: Progress | None,
) -> tuple[list[RunReport], list[tuple[list[TransferResult], str]] | None]:
    """`build_report` over worker processes, in three waves of independent tasks, each heaviest first.

    1. each run's splits and attention features; 2. every (run, split, pooling) layer sweep, so that no worker is
    left with one long run at the end; 3. every (run, split)'s ensembles, controls and signals together with the
    transfer table, which needs only the image sweeps. Each task is a pure function of its arguments, so the
    numbers equal the in-process build's.
    """
    readers = [RunReader(d) for d in dirs]
    sizes = [len(reader.rows) for reader in readers]
    inputs = run_tasks(_run_inputs, [(d, test_fraction, options["seed"], GROUPINGS) for d in dirs], n_jobs,
                       cost=sizes, progress=scaled(progress, 0.0, 0.1), stage="attention features")
    per_run = [_grouping_tasks(i, options) for i in inputs]
    sweep_tasks, sweep_costs, sweep_keys = [], [], []
    for r, (run_dir, tasks) in enumerate(zip(dirs, per_run)):
        poolings = options["poolings"] if options["poolings"] is not None else readers[r].manifest.poolings
        for t, task in enumerate(tasks):
            for pooling in poolings:
                sweep_tasks.append((str(run_dir), task[3], pooling, options))
                sweep_costs.append(sizes[r])
                sweep_keys.append((r, t))
    parts: dict[tuple[int, int], list[LayerSweep]] = {}
    for key, part in zip(sweep_keys, run_tasks(_sweep_part, sweep_tasks, n_jobs, cost=sweep_costs,
                                               progress=scaled(progress, 0.1, 0.65), stage="layer sweeps")):
        parts.setdefault(key, []).append(part)
    sweeps = {key: _merged_sweep(found) for key, found in parts.items()}
    calls = [(_grouping_report, *task, None, sweeps[(r, t)])
             for r, tasks in enumerate(per_run) for t, task in enumerate(tasks)]
    costs = [_REST_COST_PER_ROW * sizes[r] for r, tasks in enumerate(per_run) for _ in tasks]
    n_groupings = len(calls)
    if transfer:
        tasks = _transfer_tasks(
            _distinct_names([i.name for i in inputs]), [i.run_dir for i in inputs],
            [i.manifest["model_fingerprint"] for i in inputs],
            [{task[2]: sweeps[(r, t)] for t, task in enumerate(per_run[r])} for r in range(len(inputs))],
            test_fraction, options)
        calls += [(run_transfer_task, task) for task in tasks]
        costs += [task.cost for task in tasks]
    results = run_tasks(_call, calls, n_jobs, cost=costs, progress=scaled(progress, 0.65, 1.0),
                        stage="ensembles, controls, signals, transfer")
    runs, offset = [], 0
    for run_inputs, tasks in zip(inputs, per_run):
        runs.append(_assemble(run_inputs, results[offset:offset + len(tasks)]))
        offset += len(tasks)
    return runs, (results[n_groupings:] if transfer else None)
