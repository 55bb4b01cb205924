"""Cost of `vlmrel report`: seconds per probe fit, and the README's report built at the CLI's default ``--n-jobs``.

The README's report is `vlmrel report runs/late_random runs/late`: the late-fusion model's random and adversarial
caches (3,200 questions, 98 probe fits) at the CLI's defaults (n_boot 1000, 20 permutations, every core); here the
shipped caches in sample_data/runs/late_fusion stand in for the README's fresh extractions. Target on 2 cores: <= 60 s.

Prints the machine's load (the CPU is shared: only ratios of interleaved rounds mean anything) and the CPU seconds of
all processes, workers included (the work, which a busy machine does not hide as it hides wall time).

    python benchmarks/bench_report.py          # s per fit_probe call, then the README report once (~1-2 min)
    python benchmarks/bench_report.py --full   # README report at n_jobs=1 and at --n-jobs, interleaved over
                                               # --rounds: fit count, s per fit, ratio, identical numbers checked
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from contextlib import contextmanager
from typing import Iterator


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the worker processes, once shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def stop_workers() -> None:
    """Shut joblib's reusable worker pool down, so their CPU time is counted and the next build starts them anew."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


@contextmanager
def counted_fits() -> Iterator[list[int]]:
    """Count `fit_probe` calls made in this process (every module that calls it holds its own reference)."""
    from vlmrel_core.analysis import controls, probes, transfer

    original = probes.fit_probe
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    modules = (probes, controls, transfer)
    for module in modules:
        module.fit_probe = counting
    try:
        yield count
    finally:
        for module in modules:
            module.fit_probe = original


def seconds_per_fit(run_dir: str, n_layers: int = 8) -> float:
    """Mean seconds of a `fit_run_probe` on single layers of ``run_dir`` (image split), as the layer sweep fits them."""
    from vlmrel_core.analysis.probes import fit_run_probe, resolve_split
    from vlmrel_core.engine.store import RunReader

    reader = RunReader(run_dir)
    split = resolve_split(reader, None)
    keys = [(p, l) for p in reader.manifest.poolings for l in reader.manifest.layers][:n_layers]
    states = {key: reader.states(key[0], [key[1]]) for key in keys}
    fit_run_probe(reader, keys[0][0], [keys[0][1]], split, layer_states=states[keys[0]])  # folds cached, imports
    started = time.perf_counter()
    for pooling, layer in keys:
        fit_run_probe(reader, pooling, [layer], split, layer_states=states[(pooling, layer)])
    return (time.perf_counter() - started) / len(keys)


def timed_build(runs: list[str], n_jobs: int, options: dict) -> tuple[object, float, float]:
    from vlmrel_core.analysis.report import build_report

    started, cpu = time.perf_counter(), cpu_seconds()
    report = build_report(runs, n_jobs=n_jobs, **options)
    wall = time.perf_counter() - started
    stop_workers()
    return report, wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also build at n_jobs=1: fit count, ratio, identical numbers")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of (n_jobs=1, --n-jobs) with --full")
    parser.add_argument("--n-jobs", type=int, default=-1, help="workers of the parallel build (-1: every core, the CLI's default)")
    args = parser.parse_args()

    from vlmrel_core.analysis.parallel import resolve_n_jobs
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    runs = [str(catalog.run_dir("late_fusion", n)) for n in ("random", "adversarial")]
    options = dict(n_boot=1000, n_permutations=20)  # the CLI's defaults
    workers = resolve_n_jobs(args.n_jobs)
    print(f"runs: {runs}  options: {options}  cores: {os.cpu_count()}  n_jobs {args.n_jobs} -> {workers} worker(s)  "
          f"load (1/5/15 min): {load()}", flush=True)
    per_fit = seconds_per_fit(runs[0])
    print(f"fit_probe (grouped 5-fold CV over the C grid + refit), random run, one layer: {per_fit:.3f} s per fit   "
          f"load {load()}", flush=True)
    settings = (1, args.n_jobs) if args.full else (args.n_jobs,)
    times: dict[int, list[float]] = {n: [] for n in settings}
    tables: dict[int, tuple] = {}
    n_fits = 0
    for _ in range(args.rounds if args.full else 1):
        for n_jobs in settings:
            with counted_fits() as count:
                report, wall, cpu = timed_build(runs, n_jobs, options)
            if n_jobs == 1:
                n_fits = count[0]
            times[n_jobs].append(wall)
            tables[n_jobs] = (report.table7, report.transfer, report.sweeps, report.layer_signals)
            print(f"  README report, n_jobs={n_jobs}: {wall:6.1f} s wall, {cpu:6.1f} CPU s (all processes)   "
                  f"load {load()}", flush=True)
    best = {n: min(t) for n, t in times.items()}
    print(f"README report at n_jobs={args.n_jobs}: {best[args.n_jobs]:.1f} s (target <= 60 s on 2 cores)")
    if args.full:
        same = all(a.equals(b) for a, b in zip(tables[1], tables[args.n_jobs]))  # type: ignore[union-attr]
        print(f"probe fits (fit_probe calls): {n_fits}   n_jobs=1: {best[1]:.1f} s ({best[1] / n_fits:.2f} s per fit)   "
              f"ratio {best[1] / best[args.n_jobs]:.2f}x   identical numbers: {same}")


if __name__ == "__main__":
    main()
