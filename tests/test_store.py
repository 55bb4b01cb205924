import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from vlmrel_core.engine.extract import extract
from vlmrel_core.engine.store import (
    CacheError, RunInUseError, RunManifest, RunReader, RunWriter, ensure_run_dir_free, read_manifest, run_lock,
)


def _manifest(**overrides) -> RunManifest:
    fields = dict(
        model_source="m", model_type="llava", family="llava", fusion="late", model_fingerprint="abc", n_layers=2,
        hidden_size=3, layers=[0, 1], poolings=["last_token"], attentions=False, attn_implementation="eager",
        dtype="float32", dataset_path="d.jsonl", dataset_hash="h", n_samples=4,
        answer_tokens={"yes_ids": [1], "no_ids": [2]}, normalization="lenient", max_new_tokens=4,
    )
    fields.update(overrides)
    return RunManifest(**fields)


def _shard(ids):
    rows = pd.DataFrame({"sample_id": ids, "correct": [1] * len(ids)})
    return rows, {"states.last_token": np.random.default_rng(0).normal(size=(len(ids), 2, 3)).astype(np.float16)}


def test_write_read_roundtrip_and_resume(tmp_path):
    writer = RunWriter(tmp_path, _manifest())
    writer.write_shard(*_shard(["a", "b"]))
    writer.write_shard(*_shard(["c"]))
    again = RunWriter(tmp_path, _manifest())
    assert again.done_ids() == {"a", "b", "c"}
    reader = RunReader(tmp_path)
    assert list(reader.rows["sample_id"]) == ["a", "b", "c"]
    assert reader.states("last_token").shape == (3, 2, 3)
    assert reader.states("last_token", layers=[1]).shape == (3, 1, 3)
    with pytest.raises(CacheError, match="not extracted"):
        reader.states("mean_image")
    with pytest.raises(CacheError, match="layers \\[5\\]"):
        reader.states("last_token", layers=[5])


def test_states_read_one_pooling_and_the_chosen_layers_only(tmp_path, monkeypatch):
    """Layers come out in the order asked (non-contiguous too) equal to a full read; the other tensors of a shard
    (another pooling, attention maps) are never read, so a probe on one layer never loads the whole cache."""
    import safetensors

    manifest = _manifest(layers=[0, 1, 2, 3], poolings=["last_token", "mean_all"], n_layers=4)
    writer = RunWriter(tmp_path, manifest)
    rng = np.random.default_rng(1)
    for ids in (["a", "b"], ["c"]):
        rows = pd.DataFrame({"sample_id": ids, "correct": [1] * len(ids)})
        writer.write_shard(rows, {f"states.{p}": rng.normal(size=(len(ids), 4, 3)).astype(np.float16)
                                  for p in ("last_token", "mean_all")})
    reader = RunReader(tmp_path)
    full = reader.states("last_token")
    np.testing.assert_array_equal(reader.states("last_token", layers=[3, 0]), full[:, [3, 0]])
    requested: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            requested.append(name)
            return self.file.get_tensor(name)

        def get_slice(self, name):
            requested.append(name)
            return self.file.get_slice(name)

    monkeypatch.setattr("vlmrel_core.engine.store.safe_open", Recording)
    reader.states("mean_all", layers=[2])
    assert requested == ["states.mean_all", "states.mean_all"]  # one tensor per shard, nothing else


def test_a_different_extraction_is_refused(tmp_path):
    RunWriter(tmp_path, _manifest())
    with pytest.raises(CacheError, match="model_fingerprint"):
        RunWriter(tmp_path, _manifest(model_fingerprint="other"))


def test_orphaned_partial_shard_is_removed(tmp_path):
    writer = RunWriter(tmp_path, _manifest())
    writer.write_shard(*_shard(["a"]))
    (tmp_path / "shard-00001.parquet").write_bytes(b"half written")
    (tmp_path / "shard-00001.safetensors.tmp").write_bytes(b"half written")
    RunWriter(tmp_path, _manifest())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.parquet", "shard-00000.safetensors"]


def test_damaged_files_are_clear_errors_not_crashes(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "evil": "__reduce__"}))
    with pytest.raises(CacheError, match="not a valid vlmrel manifest"):
        read_manifest(tmp_path)
    good = tmp_path / "good"
    writer = RunWriter(good, _manifest())
    writer.write_shard(*_shard(["a"]))
    (good / "shard-00000.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CacheError, match="cannot read"):
        RunReader(good).states("last_token")
    with pytest.raises(CacheError, match="not an extraction run"):
        read_manifest(tmp_path / "nowhere")


def _count_prefill_questions(model):
    """A forward pre-hook counting model calls and the questions of every prefill (the call that carries the whole
    prompt; later generate steps carry one token)."""
    counter = {"questions": 0, "calls": 0}

    def hook(module, args, kwargs):
        counter["calls"] += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            counter["questions"] += int(ids.shape[0])

    return counter, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_extract_resumes_after_a_kill_equal_to_an_uninterrupted_run_without_recomputing(
    tmp_path, tiny_model_dirs, tiny_loaded, tiny_dataset
):
    """SIGKILL mid-run, then resume: rows identical and states equal to an uninterrupted run (float tolerance), and
    the resumed run feeds the model only the questions of unfinished shards (counted with a forward hook)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlmrel_core.cli.main", "extract", "--model", str(tiny_model_dirs["late_fusion"]),
           "--data", str(tiny_dataset), "--out", str(out), "--batch-size", "4", "--shard-size", "4", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "manifest.json").exists() and read_manifest(out).shards:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(read_manifest(out).shards)
    assert 1 <= finished_before < 6, "the kill should land mid-run"
    before = {name: (out / f"{name}.safetensors").read_bytes() for name in (s.name for s in read_manifest(out).shards)}

    loaded = tiny_loaded["late_fusion"]
    counter, handle = _count_prefill_questions(loaded.model)
    try:
        extract(loaded, tiny_dataset, out, batch_size=4, shard_size=4)  # the kill released the lock with the process
    finally:
        handle.remove()
    assert counter["questions"] == 24 - 4 * finished_before, "finished shards must not be recomputed"
    for name, data in before.items():
        assert (out / f"{name}.safetensors").read_bytes() == data, f"{name} was rewritten"

    fresh = extract(loaded, tiny_dataset, tmp_path / "fresh", batch_size=4, shard_size=4)
    resumed, uninterrupted = RunReader(out), RunReader(fresh)
    assert len(resumed.rows) == 24 and resumed.rows["sample_id"].is_unique
    pd.testing.assert_frame_equal(resumed.rows, uninterrupted.rows, check_exact=False, rtol=1e-4, atol=1e-6)
    for pooling in resumed.manifest.poolings:
        np.testing.assert_allclose(resumed.states(pooling), uninterrupted.states(pooling), atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(resumed.tensor("attention_image"), uninterrupted.tensor("attention_image"), atol=1e-5)
    np.testing.assert_allclose(resumed.tensor("lens_logodds"), uninterrupted.tensor("lens_logodds"), atol=1e-4)


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_a_second_extraction_into_a_locked_folder_fails_at_once_and_changes_nothing(tmp_path, tiny_loaded, tiny_dataset):
    """Two writers in one folder: the second is refused before it reads or writes anything, naming the holder."""
    out = tmp_path / "run"
    loaded = tiny_loaded["late_fusion"]
    extract(loaded, tiny_dataset, out, batch_size=4, shard_size=4, limit=4)
    with run_lock(out):
        snapshot = _snapshot(out)
        counter, handle = _count_prefill_questions(loaded.model)
        try:
            started = time.time()
            with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()} since 20"):
                extract(loaded, tiny_dataset, out, batch_size=4, shard_size=4, limit=4)
        finally:
            handle.remove()
        assert time.time() - started < 5 and counter["calls"] == 0
        with pytest.raises(RunInUseError, match="in use by process"):
            ensure_run_dir_free(out)
        assert _snapshot(out) == snapshot
    ensure_run_dir_free(out)  # released when the holder's block ends
    extract(loaded, tiny_dataset, out, batch_size=4, shard_size=4, limit=4)
    assert len(RunReader(out).rows) == 4
    assert not (out / ".lock").exists(), "a finished extraction leaves no lock file"


def test_the_lock_is_released_when_its_process_is_killed(tmp_path):
    """flock dies with the process: a SIGKILLed holder leaves no stale lock."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vlmrel_core.engine.store import run_lock\n"
         "with run_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunInUseError, match=f"in use by process {holder.pid}"):
        ensure_run_dir_free(out)
    holder.kill()
    holder.wait()
    ensure_run_dir_free(out)
    with run_lock(out):
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())


def test_pitfall_answer_token_set_and_attention_implementation_are_recorded_in_the_manifest(tmp_path, tiny_loaded, tiny_dataset):
    """The yes/no token set is fixed per adapter and recorded; eager attention (for maps) is said in the manifest."""
    loaded = tiny_loaded["early_fusion"]
    manifest = RunReader(extract(loaded, tiny_dataset, tmp_path / "r", batch_size=4, shard_size=4, limit=4)).manifest
    assert manifest.answer_tokens == loaded.adapter.answer_tokens(loaded.tokenizer).to_dict()
    assert loaded.tokenizer.convert_ids_to_tokens(manifest.answer_tokens["yes_ids"]) == ["yes"]
    assert manifest.attentions and manifest.attn_implementation == "eager"


def test_extract_in_process_matches_dataset(tmp_path, tiny_loaded, tiny_dataset):
    run_dir = extract(tiny_loaded["early_fusion"], tiny_dataset, tmp_path / "r", batch_size=4, shard_size=8, limit=8)
    reader = RunReader(run_dir)
    rows = reader.rows
    assert len(rows) == 8
    assert {"answer", "correct", "label", "max_answer_prob", "top1_top2_margin", "question_type", "asked_object", "image_std"} <= set(rows.columns)
    assert set(rows["label"]) <= {"yes", "no"}
    assert reader.states("mean_image").shape == (8, 4, 128)
    assert reader.tensor("attention_image").shape == (8, 4, 64)
    assert reader.tensor("lens_logodds").shape == (8, 4)
    assert reader.manifest.fusion == "early" and reader.manifest.attn_implementation == "eager"


def test_extract_with_self_consistency_stores_agreement(tmp_path, tiny_loaded, tiny_dataset):
    run_dir = extract(tiny_loaded["late_fusion"], tiny_dataset, tmp_path / "sc", batch_size=4, shard_size=4, limit=4,
                      attentions=False, self_consistency_k=3)
    rows = RunReader(run_dir).rows
    assert set(rows["sc_k"]) == {3}
    assert rows["sc_agreement"].between(1 / 3, 1.0).all()
    assert RunReader(run_dir).manifest.self_consistency_k == 3


def test_tiny_attention_weights_survive_the_cache(tmp_path, tiny_loaded, tiny_dataset):
    """Image attention of ~1e-6 per token (a last token attending to text) must not be flushed to zero."""
    run_dir = extract(tiny_loaded["late_fusion"], tiny_dataset, tmp_path / "att", batch_size=4, shard_size=4, limit=4)
    reader = RunReader(run_dir)
    assert reader.tensor("attention_image", np.float64).dtype == np.float64
    stored = next(reader.iter_tensor("attention_image"))
    assert stored.dtype == np.float32
