"""The README runs as written: every `vlmrel` command in its bash blocks is executed, in order, on a fresh folder.

Why: a README that drifts from the CLI is the first thing a newcomer meets. Each command runs as written except
that data-sized options are capped so the suite stays fast: ``--limit`` is added where the subcommand takes it (and
``--n-boot`` and ``--n-permutations`` lowered), never a path or a flag changed. A block the suite must not run (a 27-minute training, a
real hub checkpoint) is preceded by ``<!-- readme-test: skip — reason -->`` and its reason is checked to be
stated. The first block's install / dashboard / test lines are checked for what they name (the extra exists, the
app file exists, the test command is the one `.ci/run` calls), since running them inside pytest would recurse.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmrel_core.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROW_LIMIT = 200  # enough rows for grouped splits with both classes; ~4 s of extraction per command
N_BOOT = 100
N_PERMUTATIONS = 5
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\s*[—-]+\s*(?P<reason>[^>]*?)\s*-->")


def readme_blocks(text: str) -> list[tuple[list[list[str]], str | None]]:
    """(commands as argv lists, skip reason) for each ```bash block; continuation lines joined, comments dropped."""
    blocks: list[tuple[list[list[str]], str | None]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            previous = "\n".join(lines[max(0, i - 2):i])
            skip = SKIP_MARK.search(previous)
            body: list[str] = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            joined = "\n".join(body).replace("\\\n", " ")
            commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
            blocks.append(([c for c in commands if c], skip.group("reason") if skip else None))
        i += 1
    return blocks


def _subcommand_options(subcommand: str) -> set[str]:
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse keeps subparsers here; no public accessor
        if subcommand in action.choices:
            return {opt for a in action.choices[subcommand]._actions for opt in a.option_strings}
    raise AssertionError(f"README names `vlmrel {subcommand}`, which the CLI does not have")


def capped(argv: list[str]) -> list[str]:
    """The command as written, with data-size caps added where the subcommand takes them."""
    options = _subcommand_options(argv[1])
    out = list(argv)
    if "--limit" in options and "--limit" not in out:
        out += ["--limit", str(ROW_LIMIT)]
    if "--n-boot" in options and "--n-boot" not in out:
        out += ["--n-boot", str(N_BOOT)]
    if "--n-permutations" in options and "--n-permutations" not in out:
        out += ["--n-permutations", str(N_PERMUTATIONS)]
    return out


def test_readme_first_block_is_the_whole_setup() -> None:
    commands, skip = readme_blocks(README.read_text())[0]
    assert skip is None
    assert len(commands) == 3, commands
    install, dashboard, tests = commands
    assert install[:3] == ["pip", "install", "-e"] and install[3] == ".[test]"
    assert dashboard == ["streamlit", "run", "app.py"] and (ROOT / "app.py").is_file()
    assert tests == ["python", "-m", "pytest"]
    assert "python3 -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_skipped_blocks_state_why() -> None:
    for commands, skip in readme_blocks(README.read_text()):
        if skip is not None:
            assert len(skip) > 10, f"a skipped README block needs a reason: {commands}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLMREL_SAMPLE_DATA": str(ROOT / "sample_data")}
    ran = 0
    for commands, skip in readme_blocks(README.read_text())[1:]:
        if skip is not None:
            continue
        for argv in commands:
            command = shlex.join(argv)
            if argv[0] != "vlmrel":
                assert argv[0] in {"python", "pip"}, f"README command not covered by this test: {command}"
                if argv[0] == "python" and argv[1].endswith(".py"):
                    assert (ROOT / argv[1]).is_file(), f"README names a missing script: {command}"
                continue
            full = [sys.executable, "-m", "vlmrel_core.cli.main", *capped(argv)[1:]]
            started = time.perf_counter()
            done = subprocess.run(full, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            print(f"{time.perf_counter() - started:6.1f} s  {command}")  # shown with -s: where the README's time goes
            assert done.returncode == 0, f"`{command}` failed as written:\n{done.stderr[-3000:]}"
            ran += 1
    assert ran >= 8, f"only {ran} README commands ran"
