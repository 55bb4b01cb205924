"""Independent analysis tasks (probe fits, per-run feature extraction) run over worker processes with joblib.

Why processes and not threads: a probe fit is many small L-BFGS steps whose time is mostly Python in scikit-learn
and scipy, so threads would queue on the GIL. Why results do not depend on ``n_jobs``: every task is a pure
function of its arguments (its own fixed seed, BLAS limited to one thread while fitting), so a task run in a
worker returns exactly what it returns in this process; ``n_jobs=1`` runs the same tasks in order, here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from vlmrel_core.progress import Progress, report


def resolve_n_jobs(n_jobs: int | None) -> int:
    """Worker count: ``None`` or -1 = every usable core, -2 = all but one (joblib's convention), else ``n_jobs``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_jobs is None or n_jobs == -1:
        return max(1, cores)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a positive int, -1 (all cores) or another negative count from the end, got {n_jobs!r}")
    return n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)


def run_tasks(
    function: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    n_jobs: int | None = 1,
    *,
    progress: Progress | None = None,
    stage: str = "",
    cost: Sequence[float] | None = None,
) -> list[Any]:
    """``[function(*task) for task in tasks]``, over ``n_jobs`` worker processes (loky) when that is more than one.

    ``cost`` (one relative weight per task) starts the heaviest tasks first, so two uneven runs do not leave one
    worker idle at the end; results come back in the order of ``tasks`` whatever order they finish in.
    ``progress`` gets one step per finished task, staged ``stage``.
    """
    tasks = list(tasks)
    workers = min(resolve_n_jobs(n_jobs), len(tasks))
    report(progress, 0, len(tasks), stage)
    if workers <= 1:
        results = []
        for i, task in enumerate(tasks):
            results.append(function(*task))
            report(progress, i + 1, len(tasks), stage)
        return results
    from joblib import Parallel, delayed

    order = list(range(len(tasks)))
    if cost is not None:
        if len(cost) != len(tasks):
            raise ValueError(f"{len(cost)} costs for {len(tasks)} tasks")
        order.sort(key=lambda i: -float(cost[i]))
    results_by_index: dict[int, Any] = {}
    runner = Parallel(n_jobs=workers, backend="loky", return_as="generator_unordered")
    jobs = (delayed(_indexed)(function, i, tasks[i]) for i in order)
    for done, (index, result) in enumerate(runner(jobs), start=1):
        results_by_index[index] = result
        report(progress, done, len(tasks), stage)
    return [results_by_index[i] for i in range(len(tasks))]


def _indexed(function: Callable[..., Any], index: int, task: tuple[Any, ...]) -> tuple[int, Any]:
    return index, function(*task)
