import json
import subprocess
import sys

from vlmrel_core.cli.main import main


def test_help_works_offline():
    done = subprocess.run([sys.executable, "-m", "vlmrel_core.cli.main", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("extract", "generate-data", "train-demo-models", "info"):
        assert command in done.stdout


def test_bad_model_path_is_a_clear_error(tmp_path, tiny_dataset, capsys):
    code = main(["extract", "--model", str(tmp_path / "no_model"), "--data", str(tiny_dataset), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "cannot read a model config" in capsys.readouterr().err


def test_extract_then_info(tmp_path, tiny_model_dirs, tiny_dataset, capsys):
    code = main(["extract", "--model", str(tiny_model_dirs["late_fusion"]), "--data", str(tiny_dataset),
                 "--out", str(tmp_path / "run"), "--limit", "8", "--batch-size", "4", "--shard-size", "4", "--layers", "0,-1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 8
    assert main(["info", str(tmp_path / "run")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [0, 3] and info["n_rows"] == 8
