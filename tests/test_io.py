"""`vlmrel_core.io.read_json_and_tensors`: every way a saved (JSON, safetensors) pair can be broken is one clear
error of the caller's type naming the file — the novelty statistics and the shipped layer probes load through it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from vlmrel_core.io import read_json_and_tensors


class PairError(ValueError):
    pass


def _pair(folder, meta="{\"a\": 1}", tensors=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.json").write_text(meta)
    if tensors:
        save_file({"x": np.arange(3, dtype=np.float32)}, str(folder / "t.safetensors"))
    return folder


def test_a_good_pair_reads_back(tmp_path):
    meta, tensors = read_json_and_tensors(_pair(tmp_path / "ok"), "m.json", "t.safetensors", PairError)
    assert meta == {"a": 1} and tensors["x"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "t.safetensors").unlink(), "no t.safetensors"),
    (lambda d: (d / "m.json").write_text("{oops"), "m.json is not valid JSON"),
    (lambda d: (d / "m.json").write_text(json.dumps([1, 2])), "holds a JSON list, not an object"),
    (lambda d: (d / "m.json").write_bytes(b"\xff\xfe{"), "m.json is not valid JSON"),
    (lambda d: (d / "t.safetensors").write_bytes((d / "t.safetensors").read_bytes()[:20]), "not a readable safetensors"),
    (lambda d: (d / "t.safetensors").write_bytes(b"\x80\x04pickle"), "not a readable safetensors"),
])
def test_a_broken_pair_is_one_error_of_the_callers_type(tmp_path, break_it, message):
    folder = _pair(tmp_path / "broken")
    break_it(folder)
    with pytest.raises(PairError, match=message):
        read_json_and_tensors(folder, "m.json", "t.safetensors", PairError)


def test_damaged_novelty_statistics_are_a_novelty_error(tmp_path):
    from vlmrel_core.gate.novelty import NoveltyError, NoveltyModel

    _pair(tmp_path / "nov", meta=json.dumps({"schema_version": 1}), tensors=False)
    (tmp_path / "nov" / "novelty.json").write_text((tmp_path / "nov" / "m.json").read_text())
    (tmp_path / "nov" / "novelty.safetensors").write_bytes(b"truncated")
    with pytest.raises(NoveltyError, match="novelty.safetensors is not a readable safetensors"):
        NoveltyModel.load(tmp_path / "nov")
