"""validation.questions: refusals, token cap, and special-token text read as text by the real processors."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SAMPLES
from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.questions import (
    check_question_tokens,
    neutralize_special_tokens,
    prepare_question,
    special_token_strings,
    validate_question,
)


@pytest.mark.parametrize("text, message", [
    ("", "empty"), (" \n\t", "only whitespace"), ("a\x00b", "control character '\\\\x00'"),
    ("x" * 1001, "1,001 characters long"), ("a \udcff b", "not valid UTF-8"), (b"\xff\xfe", "not valid UTF-8"),
    (None, "must be text"),
])
def test_refusals(text, message):
    with pytest.raises(InputError, match=message):
        validate_question(text)


def test_refused_characters_are_exactly_surrogates_and_controls_other_than_tab_and_newlines():
    """The one-regex scan refuses the same characters as a per-character Unicode category check would."""
    import unicodedata

    from vlmrel_core.validation.questions import _REFUSED_CHARS

    expected = {c for c in range(0x110000)
                if unicodedata.category(chr(c)) == "Cs" or (unicodedata.category(chr(c)) == "Cc" and chr(c) not in "\t\n\r")}
    assert {c for c in range(0x110000) if _REFUSED_CHARS.match(chr(c))} == expected
    with pytest.raises(InputError, match="control character '\\\\x07' at position 3"):
        validate_question("abc\x07def\x00")


def test_accepted_questions_are_stripped():
    assert validate_question("  is there a cat?\n") == "is there a cat?"
    assert validate_question("il y a un chat ? 🐱\tok".encode()) == "il y a un chat ? 🐱\tok"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=2000) | st.binary(max_size=200))
def test_any_input_is_accepted_or_refused_with_input_error(text):
    start = time.perf_counter()
    try:
        result = validate_question(text)
    except InputError:
        pass
    else:
        assert result and result == result.strip()
    assert time.perf_counter() - start < 1.0


@pytest.fixture(scope="module", params=["late_fusion", "early_fusion"])
def processor(request):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(SAMPLES.model_dir(request.param))


def test_image_token_in_a_question_is_tokenised_as_text(processor):
    tokenizer = processor.tokenizer
    question = "is there a <image> red circle?"
    assert "<image>" in special_token_strings(processor)
    safe = neutralize_special_tokens(question, processor)
    as_text = tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer(safe, add_special_tokens=False)["input_ids"] == as_text
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id not in tokenizer(safe, add_special_tokens=False)["input_ids"]
    assert neutralize_special_tokens("is there a red circle?", processor) == "is there a red circle?"


def test_prepared_question_builds_a_prompt_with_one_image(processor):
    from PIL import Image

    from vlmrel_core.engine.adapters import adapter_for_model_type

    family = "llava" if "Llava" in type(processor).__name__ else "paligemma"
    adapter = adapter_for_model_type(family)
    image = Image.new("RGB", (32, 32))
    plain = adapter.prepare_inputs(processor, [image], ["is there a red circle?"])
    hostile = adapter.prepare_inputs(processor, [image], [prepare_question("is there a <image> red circle?", processor)])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (hostile["input_ids"] == image_id).sum() == (plain["input_ids"] == image_id).sum()


def test_token_cap(processor):
    check_question_tokens("is there a cat?", processor.tokenizer, 10)
    with pytest.raises(InputError, match="tokens long; the limit for this model is 10"):
        check_question_tokens("is " * 11, processor.tokenizer, 10)
