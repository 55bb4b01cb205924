"""Issue 17's attacker / careless-user inputs, each through the library and the CLI (and the app where it takes
the input): the expected outcome is written beside each case in tests/hostile_cases.py ("works" or a clear error
with its message). Every CLI error is one line with exit status 2 and no traceback, and no file is changed or left
behind (the shipped bundles included)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_cases import CASES, REPO, Case, prepare  # noqa: E402

from vlmrel_core.validation.errors import InputError  # noqa: E402


def _snapshot(*folders: Path) -> dict[str, str]:
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _cli(argv: list) -> tuple[int, str, str]:
    from vlmrel_core.cli.main import main

    args = [os.fsdecode(a) if isinstance(a, bytes) else a for a in argv]  # what Python makes of non-UTF-8 argv
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    return code, "", ""


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case.needs_model and os.environ.get("VLMREL_FAST_HOSTILE"):
        pytest.skip("model-loading case skipped by VLMREL_FAST_HOSTILE")
    scenario = prepare(case, tmp_path)
    shipped = REPO / "sample_data" / "gates"
    before = _snapshot(tmp_path, shipped)

    # the library call that takes the same input
    if scenario.library is not None:
        if case.expect == "works":
            assert scenario.library() is not None
        else:
            with pytest.raises(InputError, match=case.message):
                scenario.library()

    # the CLI
    capsys.readouterr()
    code, _, _ = _cli(scenario.argv)
    captured = capsys.readouterr()
    if case.expect == "works":
        assert code == 0, captured.err
    else:
        assert code == 2, captured.err
        assert "Traceback" not in captured.err
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert lines and len(lines[-1]) < 600, captured.err
        import re

        assert re.search(case.message, captured.err), captured.err
        if not captured.err.startswith("usage:"):  # one readable line of ours (model-loading bars aside)
            ours = [line for line in lines if line.startswith("vlmrel")]
            assert len(ours) == 1 and ours[0] == lines[-1], captured.err
    for path in scenario.must_not_exist:
        if case.expect == "error":
            assert not path.exists(), f"{path} left behind"
    after = _snapshot(tmp_path, shipped)
    created = set(after) - set(before)
    if case.expect == "error":
        assert not created, f"files left behind: {sorted(created)}"
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"files changed: {changed}"


def test_the_suite_covers_at_least_forty_cases_of_every_kind() -> None:
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} >= {"image", "question", "jsonl", "yaml", "probe", "model"}
    assert len({c.name for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def app():
    pytest.importorskip("streamlit.testing.v1")
    from streamlit.testing.v1 import AppTest

    test = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    test.run()
    assert not test.exception
    return test


@pytest.mark.parametrize("question, expected", [
    ("   ", "only whitespace"),
    ("is there\x07 a circle?", "control character"),
])
def test_app_refuses_bad_questions_with_an_error_box(app, question, expected):
    app.text_input(key="question").set_value(question).run()
    assert not app.exception
    assert any(expected in e.value for e in app.error), [e.value for e in app.error]
    assert app.button(key="ask").disabled  # nothing reaches the model


def test_app_cannot_ask_an_empty_question(app):
    app.text_input(key="question").set_value("").run()
    assert not app.exception and not app.error
    assert app.button(key="ask").disabled


def test_app_reads_image_token_text_as_text(app):
    app.text_input(key="question").set_value("is there a <image> red circle?").run()
    app.button(key="ask").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any(m.label == "Answer" for m in app.metric), [m.label for m in app.metric]


def test_app_upload_path_uses_the_library_validation():
    """The uploader's reader is the library's (AppTest cannot drive st.file_uploader): a header bomb is refused."""
    from hostile_cases import png_bytes

    from vlmrel_core.validation.images import load_image

    source = (REPO / "pages" / "inspect.py").read_text()
    assert "load_image(upload.getvalue(), upload.name)" in source
    with pytest.raises(InputError, match="decompression bomb|limit is"):
        load_image(png_bytes(14000, 14000, rows=1), name="upload.png")
