"""Questions from users: refused when empty, binary, absurdly long or not text; special-token text neutralised.

Why: an empty question was answered (early fusion served "yellow" as certified), a 200k-character one ran the
model on a truncated prompt, and the literal text ``<image>`` in a question was read as an image placeholder
("number of <image> tokens ... 51 tokens and 1 images"). User text must only ever be read as text.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from vlmrel_core.validation.errors import InputError, excerpt

MAX_QUESTION_CHARS = 1000
DEFAULT_MAX_QUESTION_TOKENS = 256
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}
# U+2060 WORD JOINER: invisible, not a special token anywhere, and breaks the exact match of an added token.
_JOINER = "\u2060"
# Surrogates (category Cs: undecodable bytes) and the control characters (category Cc: U+0000-U+001F and
# U+007F-U+009F, fixed by Unicode) other than tab and newlines: the characters a question may not contain.
_REFUSED_CHARS = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def validate_question(text: str | bytes, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """The question stripped of surrounding whitespace, or `InputError` saying what is wrong with it."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"the question is not valid UTF-8 text (byte {err.start})") from None
    if not isinstance(text, str):
        raise InputError(f"the question must be text, got {type(text).__name__}")
    refused = _REFUSED_CHARS.search(text)  # one regex scan: a per-character category lookup cost ~0.1 ms a question
    if refused is not None:
        position, char = refused.start(), refused.group()
        if unicodedata.category(char) == "Cs":
            raise InputError(f"the question is not valid UTF-8 text (undecodable byte at character {position})")
        raise InputError(f"the question contains a control character {ascii(char)} at position {position}")
    stripped = text.strip()
    if not stripped:
        raise InputError("the question is empty" if not text else "the question is only whitespace")
    if len(stripped) > max_chars:
        raise InputError(f"the question is {len(stripped):,} characters long; the limit is {max_chars:,} "
                         f"({excerpt(stripped, 40)})")
    return stripped


def question_token_limit(loaded: Any) -> int:
    """Tokens a question may take: the default, capped at a quarter of the decoder's context (image tokens and
    the prompt template need the rest)."""
    config = loaded.model.config.get_text_config()
    context = getattr(config, "max_position_embeddings", None)
    return min(DEFAULT_MAX_QUESTION_TOKENS, int(context) // 4) if context else DEFAULT_MAX_QUESTION_TOKENS


def check_question_tokens(question: str, tokenizer: Any, max_tokens: int) -> None:
    """Refuse a question whose tokens (read as plain text) exceed ``max_tokens``."""
    n_tokens = len(tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if n_tokens > max_tokens:
        raise InputError(f"the question is {n_tokens:,} tokens long; the limit for this model is {max_tokens:,}")


def special_token_strings(processor: Any) -> tuple[str, ...]:
    """Every string the tokenizer would read as one added/special token rather than as text, longest first.

    An added token is "special" for this purpose when tokenising it with ``split_special_tokens=True`` gives
    different tokens: that is exactly the set a user could smuggle in as markup (``<image>``, ``<|im_start|>``).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    cached = getattr(tokenizer, "_vlmrel_special_strings", None)
    if cached is not None:
        return cached
    candidates = set(getattr(tokenizer, "all_special_tokens", []) or [])
    candidates.update(getattr(tokenizer, "get_added_vocab", dict)().keys())
    for attr in ("image_token", "video_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token"):
        value = getattr(processor, attr, None)
        if isinstance(value, str):
            candidates.add(value)
    found = []
    for token in candidates:
        if len(token) < 2 or not token.strip():
            continue
        normal = tokenizer(token, add_special_tokens=False)["input_ids"]
        split = tokenizer(token, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if normal != split:
            found.append(token)
    result = tuple(sorted(found, key=len, reverse=True))
    try:
        tokenizer._vlmrel_special_strings = result
    except AttributeError:
        pass
    return result


def neutralize_special_tokens(question: str, processor: Any) -> str:
    """The question with every special-token string broken by an invisible word joiner after its first
    character, so the tokenizer reads ``<image>`` as the characters ``<``, ``image``, ``>`` and the processor
    counts no extra image placeholder. Text without such strings is returned unchanged."""
    for token in special_token_strings(processor):
        if token in question:
            question = question.replace(token, token[0] + _JOINER + token[1:])
    return question


def prepare_question(question: str | bytes, processor: Any, max_tokens: int = DEFAULT_MAX_QUESTION_TOKENS) -> str:
    """Validate a question, check its token length and neutralise special-token text: the one call every path that
    puts user text into a prompt (gate, extraction, interventions, self-consistency) goes through."""
    text = validate_question(question)
    check_question_tokens(text, getattr(processor, "tokenizer", processor), max_tokens)
    return neutralize_special_tokens(text, processor)
