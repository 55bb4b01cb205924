"""Input checks that run before any model loads: plain messages naming the path, never an object repr."""

from __future__ import annotations

import pytest

from vlmrel_core.engine.inputs import (
    InputError, check_dataset, read_image, require_dir, require_file, require_out_dir, require_run_dir,
)


def test_missing_and_wrong_kind_paths_are_named(tmp_path):
    with pytest.raises(InputError, match=f"dataset file not found: {tmp_path / 'x.jsonl'}"):
        require_file(tmp_path / "x.jsonl", "dataset file")
    with pytest.raises(InputError, match="is a folder; expected a file"):
        require_file(tmp_path, "dataset file")
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="is a file; expected a folder"):
        require_dir(tmp_path / "f", "image root")
    with pytest.raises(InputError, match="image root not found"):
        require_dir(tmp_path / "nowhere", "image root")
    with pytest.raises(InputError, match="not an extraction run"):
        require_run_dir(tmp_path)
    with pytest.raises(InputError, match="is a file"):
        require_out_dir(tmp_path / "f" / "run")
    assert require_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"


def test_dataset_errors_name_the_file_and_line(tmp_path, tiny_dataset):
    assert len(check_dataset(tiny_dataset)) == 24
    bad = tiny_dataset.parent / "bad.jsonl"
    bad.write_text(tiny_dataset.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{bad}, line 2: not valid JSON"):
        check_dataset(bad)
    with pytest.raises(InputError, match="image root not found"):
        check_dataset(tiny_dataset, tmp_path / "no_images")


def test_unreadable_images_name_the_file_not_a_stream(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for source, name in ((broken, None), (b"not a png", "upload.png")):
        with pytest.raises(InputError) as err:
            read_image(source, name)
        message = str(err.value)
        assert (str(broken) if name is None else "upload.png") in message
        assert "BytesIO" not in message and " object at 0x" not in message
    with pytest.raises(InputError, match="cannot open image"):
        read_image(tmp_path / "missing.png")
