"""Data-parallel extraction: ranks write one run that equals a single-process run; a killed rank loses nothing.

These start real processes (`accelerate launch` on CPU with gloo, and `vlmrel extract --num-processes`), each
loading the tiny model, so they take tens of seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from vlmrel_core.engine.extract import extract
from vlmrel_core.engine.parallel import DataParallel, _free_port
from vlmrel_core.engine.store import RunReader, merge_rank_manifests

TENSORS = ("states.last_token", "states.mean_all", "states.mean_image", "states.mean_text", "lens_logodds", "attention_image")


def _questions(tiny_dataset: Path, tmp_path: Path, n: int) -> Path:
    """The first n rows of the tiny split, in a JSONL beside nothing else (image root given separately)."""
    lines = tiny_dataset.read_text().splitlines()
    assert len(lines) >= n
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines[:n]) + "\n")
    return path


def _cli_args(model_dir: Path, data: Path, image_root: Path, out: Path, batch: int, shard: int) -> list[str]:
    return ["extract", "--model", str(model_dir), "--data", str(data), "--image-root", str(image_root),
            "--out", str(out), "--batch-size", str(batch), "--shard-size", str(shard), "--threads", "1",
            "--max-new-tokens", "4"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _assert_same_run(reference: Path, other: Path) -> None:
    a, b = RunReader(reference), RunReader(other)
    assert a.manifest.identity() == b.manifest.identity()
    pd.testing.assert_frame_equal(a.rows, b.rows)
    for name in TENSORS:
        np.testing.assert_allclose(a.tensor(name), b.tensor(name), atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def reference(tiny_loaded, tiny_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """A single-process run of 16 questions (batch 2) to compare data-parallel runs with."""
    root = tmp_path_factory.mktemp("parallel")
    data = _questions(tiny_dataset, root, 16)
    extract(tiny_loaded["late_fusion"], data, root / "single", image_root=tiny_dataset.parent, batch_size=2,
            shard_size=4, max_new_tokens=4)
    return data, root / "single"


def test_block_split_is_disjoint_and_covers_everything():
    blocks = [range(23)[DataParallel(rank=r, world_size=3).block(23)] for r in range(3)]
    assert [len(b) for b in blocks] == [7, 8, 8]
    assert sorted(i for b in blocks for i in b) == list(range(23))


def test_accelerate_launch_two_cpu_ranks_equals_single_process(reference, tiny_model_dirs, tiny_dataset, tmp_path):
    data, single = reference
    out = tmp_path / "accelerate"
    # accelerate's --cpu runs ONE process unless MPI is set up; --multi_gpu starts the ranks through torchrun,
    # which on a machine without GPUs are CPU processes (vlmrel's collectives use gloo either way)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "vlmrel_core.cli.main",
               *_cli_args(tiny_model_dirs["late_fusion"], data, tiny_dataset.parent, out, 2, 4)]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["n"] == 16  # rank 0 alone reports the merged run
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith("manifest.rank") or n.startswith(".lock")]
    assert {n.split("-")[1] for n in names if n.startswith("shard-")} == {"r000", "r001"}
    _assert_same_run(single, out)


def test_a_killed_rank_loses_nothing_finished_and_the_run_resumes(reference, tiny_model_dirs, tiny_dataset, tmp_path):
    data, single = reference
    out = tmp_path / "killed"
    args = _cli_args(tiny_model_dirs["late_fusion"], data, tiny_dataset.parent, out, 2, 2)
    launcher = subprocess.Popen([sys.executable, "-m", "vlmrel_core.cli.main", *args, "--num-processes", "2"],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank_manifest = out / "manifest.rank001.json"
    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None:
        if rank_manifest.is_file() and json.loads(rank_manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    assert launcher.poll() is None, "the job finished before a rank could be killed"
    pid = int((out / ".lock.rank001").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    finished = json.loads(rank_manifest.read_text())["shards"]
    assert finished and all((out / f"{s['name']}.parquet").is_file() for s in finished)
    stamps = {s["name"]: (out / f"{s['name']}.safetensors").stat().st_mtime_ns for s in finished}
    # resume with the same command: finished shards are kept, not recomputed
    done = subprocess.run([sys.executable, "-m", "vlmrel_core.cli.main", *args, "--num-processes", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {n: (out / f"{n}.safetensors").stat().st_mtime_ns for n in stamps} == stamps
    _assert_same_run(single, out)


def test_single_process_resume_merges_leftover_rank_manifests(reference, tiny_loaded, tiny_dataset, tmp_path):
    """A data-parallel run cut off before its merge is finished by an ordinary extraction into the same folder."""
    data, single = reference
    out = tmp_path / "leftover"
    shutil.copytree(single, out)
    manifest = json.loads((out / "manifest.json").read_text())
    tail = manifest["shards"][2:]
    manifest["shards"] = manifest["shards"][:2]
    for i, shard in enumerate(tail):  # pretend rank 1 wrote the last shards and died before the merge
        for ext in ("parquet", "safetensors"):
            (out / f"{shard['name']}.{ext}").rename(out / f"shard-r001-{i:05d}.{ext}")
        shard["name"] = f"shard-r001-{i:05d}"
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "manifest.rank001.json").write_text(json.dumps(dict(manifest, shards=tail)))
    extract(tiny_loaded["late_fusion"], data, out, image_root=tiny_dataset.parent, batch_size=2, shard_size=4,
            max_new_tokens=4)
    assert not (out / "manifest.rank001.json").exists()
    _assert_same_run(single, out)
    assert merge_rank_manifests(out).shards == RunReader(out).manifest.shards  # idempotent


def test_block_align_keeps_whole_units_in_one_rank():
    blocks = [range(50)[DataParallel(rank=r, world_size=2).block(50, align=20)] for r in range(2)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 20), (20, 50)]  # 3 units of 20 (the last short): 1 + 2
    assert sorted(i for b in blocks for i in b) == list(range(50))
    short = [len(range(5)[DataParallel(rank=r, world_size=2).block(5, align=20)]) for r in range(2)]
    assert sorted(short) == [0, 5]  # fewer rows than one window: one rank has them all


def _gate_rows(path: Path) -> list[dict]:
    """Decision rows without the per-process timings (the only fields a rank may legitimately change)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["evidence"].pop("timings")
        row["evidence"].pop("time_multiplier")
    return rows


def test_gate_batch_mode_num_processes_equals_single_process_per_block(tiny_model_dirs, tiny_dataset, tmp_path, capsys):
    """`vlmrel gate --data --num-processes 2`: two ranks, each a block of whole drift windows, merged in order; each
    rank's block decides exactly as a single gate process started on that block (replicas: window state per rank)."""
    import yaml

    from gate_helpers import write_synthetic_run
    from vlmrel_core.cli.main import main
    from vlmrel_core.engine.loading import load_vlm

    fingerprint = load_vlm(tiny_model_dirs["late_fusion"]).fingerprint
    run = write_synthetic_run(tmp_path / "run", fingerprint, model_source=tiny_model_dirs["late_fusion"])
    bundle = tmp_path / "bundle"
    assert main(["build-gate", str(run), "--out", str(bundle), "--layer", "3", "--threshold", "0.6",
                 "--gray-zone", "none"]) == 0
    config_path = bundle / "gate.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["reliability_monitor"]["monitoring"]["window"] = 10  # windows of 10 and 20: blocks of whole 20s
    if config["reliability_monitor"].get("novelty"):
        config["reliability_monitor"]["novelty"]["window"] = 20
    config_path.write_text(yaml.safe_dump(config))
    lines = tiny_dataset.read_text().splitlines()
    assert len(lines) == 24  # rank 0: rows 0-19, rank 1: rows 20-23
    blocks = {"all": lines, "first": lines[:20], "second": lines[20:]}
    for name, block in blocks.items():
        (tmp_path / f"{name}.jsonl").write_text("\n".join(block) + "\n")
    capsys.readouterr()

    def args(name: str) -> list[str]:
        return ["gate", "--config", str(config_path), "--data", str(tmp_path / f"{name}.jsonl"), "--image-root",
                str(tiny_dataset.parent), "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / f"{name}.out")]

    for name in ("first", "second"):
        assert main(args(name)) == 0
    capsys.readouterr()
    done = subprocess.run([sys.executable, "-m", "vlmrel_core.cli.main", *args("all"), "--num-processes", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # rank 0 alone prints, once
    assert summary["num_processes"] == 2 and summary["n"] == 24
    merged = _gate_rows(tmp_path / "all.out")
    assert merged == _gate_rows(tmp_path / "first.out") + _gate_rows(tmp_path / "second.out")
    assert summary["accuracy_all"] == sum(row["correct"] for row in merged) / 24
    assert not list(tmp_path.glob("all.out.rank*"))  # the per-rank parts are merged and removed
