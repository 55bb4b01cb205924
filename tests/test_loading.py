"""Model resolution: a local folder or an HF id in the local cache, answered at once and offline."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from vlmrel_core.engine.loading import ModelLoadError, load_vlm, resolve_model_source


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: resolution must never reach for the hub."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_model(cache, repo_id, model_dir):
    """Lay out a model the way huggingface_hub's cache does: refs/main -> snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_unknown_path_or_id_fails_at_once_offline_naming_both_places(tmp_path, hf_cache, no_network):
    for source in (str(tmp_path / "no_model"), "someone/not-cached-model"):
        started = time.time()
        with pytest.raises(ModelLoadError) as err:
            load_vlm(source)
        assert time.time() - started < 5  # was ~25 s of hub retries; no_network forbids any connection
        message = str(err.value)
        assert "no local folder" in message and f"not in the HF cache at {hf_cache}" in message
        assert " object at 0x" not in message


def test_a_folder_without_config_and_a_file_are_clear_errors(tmp_path, no_network):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        resolve_model_source(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_source(tmp_path / "weights.bin")


def test_a_cached_hub_id_loads_from_its_snapshot_offline(tiny_model_dirs, hf_cache, no_network):
    snapshot = _cache_model(hf_cache, "vlmrel-test/tiny-llava", tiny_model_dirs["late_fusion"])
    assert resolve_model_source("vlmrel-test/tiny-llava") == snapshot
    loaded = load_vlm("vlmrel-test/tiny-llava")
    assert loaded.source == "vlmrel-test/tiny-llava"
    assert loaded.fingerprint == load_vlm(tiny_model_dirs["late_fusion"]).fingerprint
