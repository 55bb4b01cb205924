import json
import os
import subprocess
import sys
import time

import pytest

from vlmrel_core.cli.main import build_parser, main


def test_help_works_offline():
    done = subprocess.run([sys.executable, "-m", "vlmrel_core.cli.main", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("extract", "generate-data", "train-demo-models", "info"):
        assert command in done.stdout


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model starts loading: input errors must be found first."""
    import vlmrel_core.engine.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_vlm", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert " object at 0x" not in err and "BytesIO" not in err
    return err


def test_bad_model_path_fails_at_once_naming_folder_and_cache(tmp_path, tiny_dataset, capsys):
    build_parser()  # the analysis/gate command modules import scikit-learn etc.; time the command, not those imports
    started = time.time()
    code = main(["extract", "--model", str(tmp_path / "no_model"), "--data", str(tiny_dataset), "--out", str(tmp_path / "o")])
    assert code == 2 and time.time() - started < 5
    err = _error(capsys)
    assert f"no local folder {tmp_path / 'no_model'}" in err and "not in the HF cache at" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["data", "image_root", "bad_line", "shard_size"])
def test_extract_input_errors_come_before_the_model_loads(case, tmp_path, tiny_model_dirs, tiny_dataset, no_model_load, capsys):
    args = {"--model": str(tiny_model_dirs["late_fusion"]), "--data": str(tiny_dataset), "--out": str(tmp_path / "o")}
    extra: list[str] = []
    expected = {
        "data": f"dataset file not found: {tmp_path / 'missing.jsonl'}",
        "image_root": f"image root not found: {tmp_path / 'imgs'}",
        "bad_line": "line 2: not valid JSON",
        "shard_size": "--shard-size (6) must be a multiple of --batch-size (4)",
    }[case]
    if case == "data":
        args["--data"] = str(tmp_path / "missing.jsonl")
    elif case == "image_root":
        extra = ["--image-root", str(tmp_path / "imgs")]
    elif case == "bad_line":
        bad = tiny_dataset.parent / "bad_line.jsonl"
        bad.write_text(tiny_dataset.read_text().splitlines()[0] + "\n{oops\n")
        args["--data"] = str(bad)
    else:
        extra = ["--batch-size", "4", "--shard-size", "6"]
    code = main(["extract", *[x for kv in args.items() for x in kv], *extra])
    assert code == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_extract_into_a_folder_in_use_fails_before_the_model_loads(tmp_path, tiny_model_dirs, tiny_dataset, no_model_load, capsys):
    from vlmrel_core.engine.store import run_lock

    out = tmp_path / "o"
    with run_lock(out):
        before = sorted(p.name for p in out.iterdir())
        code = main(["extract", "--model", str(tiny_model_dirs["late_fusion"]), "--data", str(tiny_dataset), "--out", str(out)])
        assert sorted(p.name for p in out.iterdir()) == before
    assert code == 2
    assert f"is in use by process {os.getpid()} since" in _error(capsys)


def test_other_commands_check_their_inputs(tmp_path, no_model_load, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "not an extraction run" in _error(capsys)
    assert main(["evaluate-demo-models", "--models", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert f"dataset folder not found: {tmp_path / 'none'}" in _error(capsys)
    assert main(["refresh-sample-data", "--root", str(tmp_path / "nowhere")]) == 2
    assert "sample data folder not found" in _error(capsys)
    assert main(["refresh-sample-data", "--root", str(tmp_path), "--families", "mid_fusion"]) == 2
    assert "unknown demo families" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_extract_then_info(tmp_path, tiny_model_dirs, tiny_dataset, capsys):
    code = main(["extract", "--model", str(tiny_model_dirs["late_fusion"]), "--data", str(tiny_dataset),
                 "--out", str(tmp_path / "run"), "--limit", "8", "--batch-size", "4", "--shard-size", "4", "--layers", "0,-1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 8
    assert main(["info", str(tmp_path / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [0, 3] and info["n_rows"] == 8
