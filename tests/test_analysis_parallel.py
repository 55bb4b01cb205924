"""Analysis tasks over worker processes: results in task order whatever the cost order, and clear n_jobs errors."""

import os

import pytest

from vlmrel_core.analysis.parallel import resolve_n_jobs, run_tasks


def _power(base: int, exponent: int) -> tuple[int, int]:
    return base**exponent, os.getpid()


def test_run_tasks_keeps_task_order_and_reports_each_finished_task():
    tasks = [(b, 2) for b in range(6)]
    calls = []
    serial = run_tasks(_power, tasks, 1, progress=lambda d, t, s: calls.append((d, t, s)), stage="fits")
    parallel = run_tasks(_power, tasks, 2, cost=[1, 5, 2, 9, 0, 3])  # heaviest first, results still in task order
    assert [r[0] for r in serial] == [r[0] for r in parallel] == [0, 1, 4, 9, 16, 25]
    assert {r[1] for r in serial} == {os.getpid()} and os.getpid() not in {r[1] for r in parallel}
    assert calls == [(i, 6, "fits") for i in range(7)]
    with pytest.raises(ValueError, match="costs"):
        run_tasks(_power, tasks, 2, cost=[1])


def test_resolve_n_jobs():
    cores = len(os.sched_getaffinity(0))
    assert resolve_n_jobs(None) == resolve_n_jobs(-1) == cores
    assert resolve_n_jobs(3) == 3 and resolve_n_jobs(-cores - 5) == 1
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_jobs"):
            resolve_n_jobs(bad)
