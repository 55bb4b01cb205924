"""validation.paths and validation.models: confinement, JSON files named in errors, safetensors-only folders."""

import pytest

from vlmrel_core.validation.errors import InputError, check_int_range, excerpt
from vlmrel_core.validation.models import check_model_folder
from vlmrel_core.validation.paths import read_json_file, resolve_inside


def test_confinement(tmp_path):
    (tmp_path / "inner").mkdir()
    assert resolve_inside(tmp_path, "inner", "probe.path") == (tmp_path / "inner").resolve()
    for escape in ("../x", "/etc/passwd", "inner/../../x"):
        with pytest.raises(InputError, match="points outside"):
            resolve_inside(tmp_path, escape, "probe.path")
    assert resolve_inside(tmp_path, "/etc/passwd", "probe.path", allow_external=True).name == "passwd"
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(InputError, match="points outside"):
        resolve_inside(tmp_path, "link/passwd", "probe.path")  # symlinks are followed


def test_json_files_name_the_file(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(InputError, match="calibration.json is not UTF-8"):
        read_json_file(path, "calibration file")
    path.write_text("{oops")
    with pytest.raises(InputError, match="calibration.json is not valid JSON"):
        read_json_file(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_json_file(path) == {"a": 1}
    with pytest.raises(InputError, match="not found"):
        read_json_file(tmp_path / "nope.json")


def test_model_folder_must_hold_safetensors(tmp_path):
    check_model_folder("org/some-model")  # an HF id: left to the loader
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="only pickled weights"):
        check_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_model_folder(tmp_path)


def test_small_helpers():
    assert excerpt("x" * 500, 10).startswith("xxxxxxxxxx…")
    assert check_int_range("k", 5, 0, 64) == 5
    with pytest.raises(InputError, match="k must be an integer from 0 to 64"):
        check_int_range("k", 100_000, 0, 64)
