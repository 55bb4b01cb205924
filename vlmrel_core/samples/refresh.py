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


def refresh_family(
    root: str | Path, family: str, drift_data: dict[str, Path], self_consistency_k: int = 10,
    self_consistency_rows: int = 600, threads: int | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One embedded model: model card, extraction caches, report, gate bundle, drift checks and a live gate run."""
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
    card = write_model_card(model_dir, data_dir)
    log(f"[{family}] model card: {card['accuracy']}")
    loaded = load_vlm(model_dir, attn_implementation="eager")
    run_dirs: dict[str, Path] = {}
    for name in POPE_RUNS + ("open_questions",):
        out = catalog.run_dir(family, name, check=False)
        shutil.rmtree(out, ignore_errors=True)
        run_dirs[name] = extract(loaded, catalog.dataset(name), out, batch_size=32, shard_size=512)
        log(f"[{family}] extracted {name}")
    sc_out = catalog.run_dir(family, SELF_CONSISTENCY_RUN, check=False)
    shutil.rmtree(sc_out, ignore_errors=True)
    run_dirs[SELF_CONSISTENCY_RUN] = extract(
        loaded, catalog.dataset("adversarial"), sc_out, batch_size=32, shard_size=160, attentions=False,
        limit=self_consistency_rows, self_consistency_k=self_consistency_k,
    )
    for name, path in drift_data.items():
        out = catalog.run_dir(family, f"drift_{name}", check=False)
        shutil.rmtree(out, ignore_errors=True)
        run_dirs[f"drift_{name}"] = extract(loaded, path, out, batch_size=32, shard_size=512, attentions=False)
    log(f"[{family}] extracted self-consistency and drift runs")

    report_dir = catalog.report_dir(family, check=False)
    shutil.rmtree(report_dir, ignore_errors=True)
    report = build_report([run_dirs[n] for n in POPE_RUNS] + [run_dirs[SELF_CONSISTENCY_RUN]])
    write_report(report, report_dir)
    log(f"[{family}] report written")

    gate_dir = catalog.gate_dir(family, check=False)
    shutil.rmtree(gate_dir, ignore_errors=True)
    build = build_gate_from_run(run_dirs["adversarial"], gate_dir, risk_target=0.1, delta=0.1,
                                model_path=str(model_dir))
    components = build.components()  # the bundle just written, in memory: no second parse of gate.yaml
    drift = {
        name: drift_between_runs(components, run_dirs["adversarial"], run_dirs[f"drift_{name}"], recalibrate_on_alert=True)
        for name in drift_data
    }
    write_json(catalog.gate_file(family, "drift.json", check=False), drift)
    live = _live_gate_run(components.gate(loaded), drift_data["in_domain"])
    write_json(catalog.gate_file(family, "live_run.json", check=False), live)
    log(f"[{family}] gate bundle and drift checks written")
    return json.loads(json.dumps({"accuracy": card["accuracy"], "gate": build.report, "drift": drift, "live": live}, default=str))


def _refresh_family_in_worker(root: str, family: str, drift_data: dict[str, Path], k: int, rows: int, threads: int | None) -> dict[str, Any]:
    """A spawn worker: logs flushed line by line so both families' progress interleaves readably."""
    return refresh_family(root, family, drift_data, k, rows, threads, log=lambda line: print(line, flush=True))


def refresh_sample_data(
    root: str | Path | None = None,
    families: Sequence[str] = FAMILIES,
    self_consistency_k: int = 10,
    self_consistency_rows: int = 600,
    drift_images: int = DRIFT_IMAGES,
    parallel: bool = False,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every family's bundle (one process per family when ``parallel``), then the cross-family ablation tables.

    The ablation tables compare late and early fusion side by side, so they are written only after both families'
    probes come from this refresh; refreshing one family alone leaves them as they were and says so.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown demo families {unknown}; expected some of {FAMILIES}")
    root = Path(cli_path(SampleCatalog.locate(check=False).root)) if root is None else Path(root)
    drift_data = write_drift_data(root, drift_images)
    if parallel and len(families) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(len(families)) as pool:
            results = pool.starmap(_refresh_family_in_worker, [
                (str(root), family, drift_data, self_consistency_k, self_consistency_rows, threads) for family in families])
        summary = dict(zip(families, results))
    else:
        summary = {family: refresh_family(root, family, drift_data, self_consistency_k, self_consistency_rows, threads, log)
                   for family in families}
    summary_path = SampleCatalog(root).refresh_summary(check=False)  # merged, so one family can be refreshed on its own
    merged = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    merged.update(summary)
    summary_path.write_text(json.dumps(merged, indent=1))
    if set(families) == set(FAMILIES):
        write_ablation_tables(root)
        log("ablation tables written (late vs early fusion)")
    else:
        log("ablation tables left as they were: they compare both families, refresh both to rewrite them")
    return summary
