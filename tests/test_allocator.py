"""`allocator.keep_freed_memory`: applied on glibc unless the user tuned malloc or opted out; the effect (fewer page
faults in a loop of tensor allocations) measured in a fresh interpreter."""

import os
import platform
import subprocess
import sys

import pytest

from vlmrel_core.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("environ", [
    {"VLMREL_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.arena_max=2"},
])
def test_user_settings_and_the_opt_out_are_left_alone(environ):
    assert keep_freed_memory(environ) is False


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_tunables_of_other_glibc_parts_do_not_turn_it_off():
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is True


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_forward_passes_reuse_freed_memory_instead_of_faulting_it_back():
    """Five forward passes of the embedded model in a fresh interpreter: tens of thousands of minor page faults
    with glibc's defaults (measured 21k-34k), a few at most once the thresholds are fixed (measured 1-1,900)."""
    code = """
import resource, sys, torch
from vlmrel_core.allocator import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory({})
from vlmrel_core.data.loader import load_images, load_vqa_jsonl
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.interventions.live_fast import prepare_batch
from vlmrel_core.samples.catalog import sample_catalog
catalog = sample_catalog()
loaded = load_vlm(catalog.model_dir("late_fusion"))
samples = load_vqa_jsonl(catalog.dataset("adversarial"))[:16]
inputs = prepare_batch(loaded, load_images(samples), [s.question for s in samples])
with torch.inference_mode():
    loaded.model(**inputs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        loaded.model(**inputs)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "VLMREL_KEEP"))}
    faults = {}
    for mode in ("off", "on"):
        result = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=environ)
        assert result.returncode == 0, result.stderr[-2000:]
        faults[mode] = int(result.stdout.strip().splitlines()[-1])
    assert faults["on"] * 5 < faults["off"], faults


def test_only_the_process_entry_point_sets_malloc(monkeypatch, tmp_path):
    """`cli()` (the `vlmrel` process) fixes malloc's thresholds; `main()` called inside another program does not."""
    from vlmrel_core import allocator, collector
    from vlmrel_core.cli import main as cli_main

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(collector, "defer_full_collections", lambda: None)  # this test process's collector stays
    monkeypatch.setattr(collector, "skip_exit_collection", lambda: None)
    assert cli_main.main(["info", str(tmp_path / "no_run")]) == 2
    assert calls == []
    assert cli_main.cli(["info", str(tmp_path / "no_run")]) == 2
    assert calls == ["malloc"]
