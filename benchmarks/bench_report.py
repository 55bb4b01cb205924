"""Cost of `vlmrel report`: the same report built with its probe fits in this process (``n_jobs=1``) and over worker
processes (``n_jobs=2``), measured side by side in one run, with identical numbers checked.

Prints, per setting and round: wall seconds, seconds per probe fit (a `fit_probe` call: grouped 5-fold CV over the
C grid, then the refit; counted in the ``n_jobs=1`` build) and the ratio n_jobs=1 / n_jobs=2, plus the machine's
load (the CPU is shared: only the ratio of interleaved rounds means anything), and the CPU seconds of all
processes (workers included: the work split, not the wall time, is what a busy machine can show). Target on 2 cores: the README's
report (the shipped random + adversarial caches, `--full`) in <= 60 s.

    python benchmarks/bench_report.py                 # shipped late_fusion/random, n_boot 200, 5 permutations (~1 min)
    python benchmarks/bench_report.py --full          # random + adversarial at the CLI's defaults (n_boot 1000, 20)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="random + adversarial (3,200 rows) at n_boot 1000, 20 permutations")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of (n_jobs=1, n_jobs=2)")
    parser.add_argument("--n-jobs", type=int, default=2, help="workers of the parallel build")
    args = parser.parse_args()

    from vlmrel_core.analysis.report import build_report
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    names = ("random", "adversarial") if args.full else ("random",)
    runs = [catalog.run_dir("late_fusion", n) for n in names]
    options = dict(n_boot=1000, n_permutations=20) if args.full else dict(n_boot=200, n_permutations=5)
    print(f"runs: {[str(r) for r in runs]}  options: {options}  cores: {os.cpu_count()}  "
          f"load (1/5/15 min): {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with counted_fits() as count:
        build_report(runs[:1], n_boot=20, n_permutations=2, transfer=False, n_jobs=1)  # warm-up: imports, page cache
    tables: dict[int, object] = {}
    times: dict[int, list[float]] = {1: [], args.n_jobs: []}
    n_fits = 0
    for _ in range(args.rounds):
        for n_jobs in (1, args.n_jobs):
            with counted_fits() as count:
                started, cpu = time.perf_counter(), cpu_seconds()
                report = build_report(runs, n_jobs=n_jobs, **options)
                times[n_jobs].append(time.perf_counter() - started)
                stop_workers()
                cpu = cpu_seconds() - cpu
            if n_jobs == 1:
                n_fits = count[0]
            tables[n_jobs] = (report.table7, report.transfer, report.sweeps)
            print(f"  n_jobs={n_jobs}: {times[n_jobs][-1]:6.1f} s wall, {cpu:6.1f} CPU s (all processes)   "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    same = all(a.equals(b) for a, b in zip(tables[1], tables[args.n_jobs]))  # type: ignore[arg-type]
    serial, parallel = min(times[1]), min(times[args.n_jobs])
    print(f"probe fits (fit_probe calls): {n_fits}")
    print(f"n_jobs=1: {serial:.1f} s ({serial / n_fits:.2f} s per fit)   n_jobs={args.n_jobs}: {parallel:.1f} s "
          f"({parallel / n_fits:.2f} s per fit)   ratio {serial / parallel:.2f}x   identical numbers: {same}")


if __name__ == "__main__":
    main()
