"""`collector`: full collections wait during a `vlmrel` process's start-up, start-up's heap is frozen when the
command's progress bar opens, everything is frozen at exit; in-process `main()` leaves the collector alone."""

import gc
import json
import subprocess
import sys

import pytest

from vlmrel_core import collector


@pytest.fixture
def restored_collector():
    thresholds = gc.get_threshold()
    yield
    collector._saved_thresholds = None
    gc.set_threshold(*thresholds)
    gc.unfreeze()  # back into the oldest generation: this test process collects as before


def test_full_collections_wait_until_start_up_settles(restored_collector):
    original = gc.get_threshold()
    young, middle, _ = original
    collector.defer_full_collections()
    collector.defer_full_collections()  # a second call keeps the first call's saved thresholds
    assert gc.get_threshold() == (young, middle, collector._DEFERRED_FULL_THRESHOLD)
    frozen_before = gc.get_freeze_count()
    assert collector.settle_startup_heap() is True
    assert gc.get_threshold() == original
    assert gc.get_freeze_count() > frozen_before
    assert collector.settle_startup_heap() is False  # once per process


def test_settling_without_deferring_changes_nothing(restored_collector):
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    assert collector.settle_startup_heap() is False
    assert (gc.get_threshold(), gc.get_freeze_count()) == (thresholds, frozen)


def test_the_process_entry_point_settles_at_the_progress_bar_and_freezes_at_exit(tmp_path):
    """A fresh interpreter runs `cli()` on a command with a progress bar: no full collection before the bar opens,
    the thresholds are the interpreter's own afterwards and the heap is frozen; `main()` in the same way freezes
    nothing."""
    code = """
import gc, json, sys
from vlmrel_core.cli import main as cli_main
from vlmrel_core.cli import progress_bar
seen = {}
opened = progress_bar.command_progress
def watched(*args, **kwargs):
    seen.setdefault("threshold_at_bar", gc.get_threshold())
    seen.setdefault("full_collections_before_bar", gc.get_stats()[2]["collections"] - seen["full_at_start"])
    return opened(*args, **kwargs)
progress_bar.command_progress = watched  # the commands import it when they run
defaults = gc.get_threshold()
seen["full_at_start"] = gc.get_stats()[2]["collections"]
entry = cli_main.cli if sys.argv[1] == "cli" else cli_main.main
code = entry(["generate-data", "--out", sys.argv[2], "--splits", "random", "--n-images", "2"])
seen.update(code=code, restored=gc.get_threshold() == defaults, frozen=gc.get_freeze_count())
print(json.dumps(seen))
"""
    results = {}
    for entry in ("cli", "main"):
        done = subprocess.run([sys.executable, "-c", code, entry, str(tmp_path / entry)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        results[entry] = json.loads(done.stdout.strip().splitlines()[-1])
    cli_run, main_run = results["cli"], results["main"]
    assert cli_run["code"] == main_run["code"] == 0
    assert cli_run["threshold_at_bar"][2] == collector._DEFERRED_FULL_THRESHOLD
    assert cli_run["full_collections_before_bar"] == 0
    assert cli_run["restored"] and cli_run["frozen"] > 0
    assert main_run["threshold_at_bar"][2] != collector._DEFERRED_FULL_THRESHOLD
    assert main_run["restored"] and main_run["frozen"] == 0
