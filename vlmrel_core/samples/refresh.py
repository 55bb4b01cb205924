"""`vlmrel refresh-sample-data`: regenerate everything shipped under sample_data/ from the embedded models.

Why one command: the caches, reports and gate bundles the dashboard reads must come from the shipped models by a
path anyone can rerun, never be edited by hand. Model weights are NOT retrained here (`train-demo-models` does
that, deliberately, since every re-commit of a binary stays in git history).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from vlmrel_core.io import write_json
from vlmrel_core.progress import Progress, report
from vlmrel_core.samples.catalog import (
    ABLATION_TABLES, FAMILIES, POPE_SPLITS, SELF_CONSISTENCY_RUN, SampleCatalog, cli_path,
)

POPE_RUNS: tuple[str, ...] = POPE_SPLITS
DRIFT_IMAGES = 200


def write_drift_data(root: Path, n_images: int = DRIFT_IMAGES) -> dict[str, Path]:
    """An in-domain adversarial split on fresh image ids and a shifted one (palette, noise, blur, smaller shapes)."""
    from vlmrel_core.data.shapes import write_split
    from vlmrel_core.data.shifted import write_shifted_split

    catalog = SampleCatalog(Path(root))
    drift_dir = catalog.drift_dir(check=False)
    in_domain = write_split(drift_dir, "adversarial", n_images=n_images, first_image_id=500_000,
                            file_name=catalog.drift_dataset("in_domain", check=False).name)
    shifted = write_shifted_split(drift_dir, "adversarial", n_images=n_images, kind="all")
    target = catalog.drift_dataset("shifted", check=False)
    if Path(shifted) != target:
        Path(shifted).replace(target)
    return {"in_domain": in_domain, "shifted": target}


def _live_gate_run(gate: Any, data_path: Path) -> dict[str, Any]:
    """The gate answering fresh questions end to end: routing shares, accuracy kept, measured cost multiplier."""
    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.gate.batch import gate_dataset

    result = gate_dataset(gate, load_vqa_jsonl(data_path), batch_size=32)
    return {"data": str(data_path), **result.summary()}


def write_ablation_tables(root: Path, n_questions: int = 800) -> list[Path]:
    """Late vs early fusion side by side: top-5 probe dims, random-5, random 50% of dims, and patch masking."""
    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.interventions.ablation import load_ablation_probe
    from vlmrel_core.interventions.study import run_ablation_study
    from vlmrel_core.engine.loading import load_vlm

    catalog = SampleCatalog(Path(root))
    loaded, layers, weights = {}, {}, {}
    for family in FAMILIES:
        loaded[family] = load_vlm(catalog.model_dir(family), attn_implementation="eager")
        probe = load_ablation_probe(catalog.report_probe_dir(family, "adversarial"), loaded[family])
        layers[family], weights[family] = probe.layer, probe.weights
    written = []
    catalog.ablation_dir(check=False).mkdir(parents=True, exist_ok=True)
    for split in ABLATION_TABLES:
        samples = load_vqa_jsonl(catalog.dataset(split))[:n_questions]
        table = run_ablation_study(loaded, samples, layers, weights, ks=(5,), random_fraction=0.5, mask_fraction=0.3)
        out = catalog.ablation_table(split, check=False)
        table.to_csv(out, index=False)
        written.append(out)
    return written


FAMILY_STAGES: tuple[str, ...] = (
    "model card", *(f"extract {name}" for name in POPE_RUNS + ("open_questions",)), "extract self-consistency",
    "extract drift runs", "report", "gate bundle, drift checks and live run",
)
STAGE_UNITS = 100  # bar units per stage, so an extraction's questions move the bar inside its stage


def _stage(progress: Progress | None, index: int, family: str, stage: str) -> Progress | None:
    """Report the start of stage ``index`` of a family and return a sub-bar for the work inside it."""
    report(progress, index * STAGE_UNITS, len(FAMILY_STAGES) * STAGE_UNITS, f"[{family}] {stage}")
    if progress is None:
        return None

    def sub(done: int, total: int, detail: str = "") -> None:
        fraction = done / total if total else 1.0
        progress(index * STAGE_UNITS + int(fraction * (STAGE_UNITS - 1)), len(FAMILY_STAGES) * STAGE_UNITS,
                 f"[{family}] {stage} {done}/{total}")

    return sub


def check_sample_root(root: str | Path, families: Sequence[str] = FAMILIES) -> Path:
    """Every input a refresh reads, checked before any model loads (the embedded models and the POPE splits)."""
    from vlmrel_core.validation.files import require_dir, require_file
    from vlmrel_core.engine.loading import resolve_model_source

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown demo families {unknown}; expected some of {FAMILIES}")
    root = require_dir(root, "sample data folder")
    for name in POPE_RUNS + ("open_questions",):
        require_file(root / "shapes_pope" / f"{name}.jsonl", "POPE split")
    for family in families:
        resolve_model_source(root / "models" / family)
    return root


def refresh_family(
    root: str | Path, family: str, drift_data: dict[str, Path], self_consistency_k: int = 10,
    self_consistency_rows: int = 600, threads: int | None = None, log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One embedded model: model card, extraction caches, report, gate bundle, drift checks and a live gate run.

    ``progress`` runs over `FAMILY_STAGES` (STAGE_UNITS each); extractions move it question by question.
    """
    from vlmrel_core.demo_models.pipeline import write_model_card
    from vlmrel_core.engine.extract import extract
    from vlmrel_core.gate.drift_runs import drift_between_runs
    from vlmrel_core.gate.fit import build_gate_from_run
    from vlmrel_core.io import write_json
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.analysis.report import build_report
    from vlmrel_core.analysis.report_io import write_report

    if threads:
        import torch

        torch.set_num_threads(threads)
    root = Path(root)
    catalog = SampleCatalog(root)
    data_dir = catalog.pope_dir()
    model_dir = catalog.model_dir(family)
    stage = iter(range(len(FAMILY_STAGES)))
    _stage(progress, next(stage), family, "model card")
    card = write_model_card(model_dir, data_dir)
    log(f"[{family}] model card: {card['accuracy']}")
    loaded = load_vlm(model_dir, attn_implementation="eager")
    run_dirs: dict[str, Path] = {}
    for name in POPE_RUNS + ("open_questions",):
        sub = _stage(progress, next(stage), family, f"extract {name}")
        out = catalog.run_dir(family, name, check=False)
        shutil.rmtree(out, ignore_errors=True)
        run_dirs[name] = extract(loaded, catalog.dataset(name), out, batch_size=32, shard_size=512, progress=sub)
        log(f"[{family}] extracted {name}")
    sub = _stage(progress, next(stage), family, "extract self-consistency")
    sc_out = catalog.run_dir(family, SELF_CONSISTENCY_RUN, check=False)
    shutil.rmtree(sc_out, ignore_errors=True)
    run_dirs[SELF_CONSISTENCY_RUN] = extract(
        loaded, catalog.dataset("adversarial"), sc_out, batch_size=32, shard_size=160, attentions=False,
        limit=self_consistency_rows, self_consistency_k=self_consistency_k, progress=sub,
    )
    sub = _stage(progress, next(stage), family, "extract drift runs")
    for i, (name, path) in enumerate(drift_data.items()):
        out = catalog.run_dir(family, f"drift_{name}", check=False)
        shutil.rmtree(out, ignore_errors=True)
        run_dirs[f"drift_{name}"] = extract(loaded, path, out, batch_size=32, shard_size=512, attentions=False)
        report(sub, i + 1, len(drift_data))
    log(f"[{family}] extracted self-consistency and drift runs")

    _stage(progress, next(stage), family, "report")
    report_dir = catalog.report_dir(family, check=False)
    shutil.rmtree(report_dir, ignore_errors=True)
    report_ = build_report([run_dirs[n] for n in POPE_RUNS] + [run_dirs[SELF_CONSISTENCY_RUN]])
    write_report(report_, report_dir)
    log(f"[{family}] report written")

    _stage(progress, next(stage), family, "gate bundle, drift checks and live run")
    gate_dir = catalog.gate_dir(family, check=False)
    clear_gate_bundle(gate_dir)
    build = build_gate_from_run(run_dirs["adversarial"], gate_dir, risk_target=0.1, delta=0.1,
                                model_path=str(model_dir))
    components = build.components()  # the bundle just written, in memory: no second parse of gate.yaml
    drift = {
        name: drift_between_runs(components, run_dirs["adversarial"], run_dirs[f"drift_{name}"], recalibrate_on_alert=True)
        for name in drift_data
    }
    write_json(catalog.gate_file(family, "drift.json", check=False), json.loads(json.dumps(drift, default=str)))
    live = _live_gate_run(components.gate(loaded), drift_data["in_domain"])
    write_json(catalog.gate_file(family, "live_run.json", check=False), json.loads(json.dumps(live, default=str)))
    log(f"[{family}] gate bundle and drift checks written")
    report(progress, len(FAMILY_STAGES) * STAGE_UNITS, len(FAMILY_STAGES) * STAGE_UNITS, f"[{family}] done")
    return json.loads(json.dumps({"accuracy": card["accuracy"], "gate": build.report, "drift": drift, "live": live}, default=str))


GATE_STAGES: tuple[str, ...] = ("gate bundle", "drift checks", "live gate run")


def refresh_family_gate(
    root: str | Path, family: str, threads: int | None = None, log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One family's gate bundle, drift.json and live_run.json from the runs already shipped (no extraction).

    Why separate: the gate's statistics (novelty, drift windows) change more often than the extraction caches;
    rebuilding only the bundles leaves every cache, report and ablation table byte-for-byte as shipped. The gate
    is fitted exactly as `refresh_family` fits it, on the shipped adversarial run.
    """
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.gate.drift_runs import drift_between_runs
    from vlmrel_core.gate.fit import build_gate_from_run

    if threads:
        import torch

        torch.set_num_threads(threads)
    catalog = SampleCatalog(Path(root))
    model_dir = catalog.model_dir(family)
    adversarial = catalog.run_dir(family, "adversarial")
    drift_names = ("in_domain", "shifted")
    drift_runs = {name: catalog.run_dir(family, f"drift_{name}") for name in drift_names}
    in_domain_data = catalog.drift_dataset("in_domain")
    units = len(GATE_STAGES) * STAGE_UNITS
    report(progress, 0, units, f"[{family}] gate bundle")
    gate_dir = catalog.gate_dir(family, check=False)
    clear_gate_bundle(gate_dir)
    build = build_gate_from_run(adversarial, gate_dir, risk_target=0.1, delta=0.1, model_path=str(model_dir))
    components = build.components()
    log(f"[{family}] gate bundle written")
    report(progress, STAGE_UNITS, units, f"[{family}] drift checks")
    drift = {name: drift_between_runs(components, adversarial, run, recalibrate_on_alert=True)
             for name, run in drift_runs.items()}
    write_json(catalog.gate_file(family, "drift.json", check=False), json.loads(json.dumps(drift, default=str)))
    log(f"[{family}] drift checks written")
    report(progress, 2 * STAGE_UNITS, units, f"[{family}] live gate run")
    live = _live_gate_run(components.gate(load_vlm(model_dir, attn_implementation="eager")), in_domain_data)
    write_json(catalog.gate_file(family, "live_run.json", check=False), json.loads(json.dumps(live, default=str)))
    log(f"[{family}] live gate run written")
    report(progress, units, units, f"[{family}] done")
    return json.loads(json.dumps({"gate": build.report, "drift": drift, "live": live}, default=str))


GATE_FILES: tuple[str, ...] = ("gate.yaml", "probe", "calibration.json", "report.json", "novelty", "drift.json",
                               "live_run.json")


def clear_gate_bundle(gate_dir: Path) -> None:
    """Remove what a refresh rewrites, and nothing else: other tools keep their own files in the bundle folder."""
    for name in GATE_FILES:
        path = Path(gate_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def refresh_gates(
    root: str | Path | None = None, families: Sequence[str] = FAMILIES, threads: int | None = None,
    log: Callable[[str], None] = print, progress: Progress | None = None,
) -> dict[str, Any]:
    """`refresh-sample-data --only gates`: every family's gate bundle, drift checks and live run, one after the
    other, from the shipped runs. The refresh summary's ``gate``/``drift``/``live`` entries are updated in place."""
    root = check_sample_root(Path(cli_path(SampleCatalog.locate(check=False).root)) if root is None else root, families)
    catalog = SampleCatalog(root)
    for family in families:  # every shipped input checked before the first bundle is deleted
        catalog.run_dir(family, "adversarial")
        for name in ("in_domain", "shifted"):
            catalog.run_dir(family, f"drift_{name}")
    catalog.drift_dataset("in_domain")
    units = len(GATE_STAGES) * STAGE_UNITS
    summary = {}
    for i, family in enumerate(families):
        offset = i * units

        def sub(done: int, total: int, stage: str = "", offset: int = offset) -> None:
            report(progress, offset + int(done * units / total) if total else offset, len(families) * units, stage)

        summary[family] = refresh_family_gate(root, family, threads, log, progress=sub if progress else None)
    summary_path = catalog.refresh_summary(check=False)
    merged = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for family, result in summary.items():
        merged.setdefault(family, {}).update(result)
    write_json(summary_path, merged)
    report(progress, len(families) * units, len(families) * units, "done")
    return summary


def _refresh_family_in_worker(
    root: str, family: str, drift_data: dict[str, Path], k: int, rows: int, threads: int | None, events: Any
) -> dict[str, Any]:
    """A spawn worker: log lines and progress go to the parent through ``events`` (a manager queue)."""

    def progress(done: int, total: int, stage: str = "") -> None:
        events.put(("progress", family, done, total, stage))

    return refresh_family(root, family, drift_data, k, rows, threads,
                          log=lambda line: events.put(("log", family, line)), progress=progress)


class _CombinedProgress:
    """Several families' bars (each 0..total) summed onto one parent bar with a fixed start offset."""

    def __init__(self, progress: Progress | None, families: Sequence[str], offset: int, grand_total: int):
        self.progress, self.offset, self.grand_total = progress, offset, grand_total
        self.done = {family: 0 for family in families}

    def update(self, family: str, done: int, total: int, stage: str = "") -> None:
        self.done[family] = int(done * len(FAMILY_STAGES) * STAGE_UNITS / total) if total else 0
        report(self.progress, self.offset + sum(self.done.values()), self.grand_total, stage)

    def for_family(self, family: str) -> Progress:
        return lambda done, total, stage="": self.update(family, done, total, stage)


def _refresh_in_parallel(
    root: Path, families: Sequence[str], drift_data: dict[str, Path], k: int, rows: int, threads: int | None,
    combined: _CombinedProgress, log: Callable[[str], None],
) -> list[dict[str, Any]]:
    import multiprocessing as mp
    import queue

    context = mp.get_context("spawn")
    with context.Manager() as manager, context.Pool(len(families)) as pool:
        events = manager.Queue()
        pending = pool.starmap_async(_refresh_family_in_worker, [
            (str(root), family, drift_data, k, rows, threads, events) for family in families])
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if pending.ready():
                    break
                continue
            if event[0] == "progress":
                combined.update(*event[1:])
            else:
                log(event[2])
        return pending.get()


def refresh_sample_data(
    root: str | Path | None = None,
    families: Sequence[str] = FAMILIES,
    self_consistency_k: int = 10,
    self_consistency_rows: int = 600,
    drift_images: int = DRIFT_IMAGES,
    parallel: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every family's bundle (one process per family when ``parallel``), then the cross-family ablation tables.

    The ablation tables compare late and early fusion side by side, so they are written only after both families'
    probes come from this refresh; refreshing one family alone leaves them as they were and says so. ``progress``
    runs over every stage of every family (a refresh takes minutes), with the stage's name.
    """
    root = check_sample_root(Path(cli_path(SampleCatalog.locate(check=False).root)) if root is None else root, families)
    both = set(families) == set(FAMILIES)
    family_units = len(FAMILY_STAGES) * STAGE_UNITS
    grand_total = STAGE_UNITS + len(families) * family_units + (STAGE_UNITS if both else 0)
    report(progress, 0, grand_total, "drift data")
    drift_data = write_drift_data(root, drift_images)
    combined = _CombinedProgress(progress, families, STAGE_UNITS, grand_total)
    report(progress, STAGE_UNITS, grand_total, "drift data written")
    if parallel and len(families) > 1:
        results = _refresh_in_parallel(root, families, drift_data, self_consistency_k, self_consistency_rows, threads,
                                       combined, log)
        summary = dict(zip(families, results))
    else:
        summary = {family: refresh_family(root, family, drift_data, self_consistency_k, self_consistency_rows, threads,
                                          log, progress=combined.for_family(family))
                   for family in families}
    summary_path = SampleCatalog(root).refresh_summary(check=False)  # merged, so one family can be refreshed on its own
    merged = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    merged.update(summary)
    write_json(summary_path, merged)
    if both:
        report(progress, grand_total - STAGE_UNITS, grand_total, "ablation tables")
        write_ablation_tables(root)
        log("ablation tables written (late vs early fusion)")
    else:
        log("ablation tables left as they were: they compare both families, refresh both to rewrite them")
    report(progress, grand_total, grand_total, "done")
    return summary
