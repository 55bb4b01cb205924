"""The one error type of bad user input (images, questions, JSONL, YAML, paths, model folders).

Why one type: the CLI, the batch paths, the library API and the app all catch exactly this and show its message
(one readable line, no traceback); anything else that escapes is a bug, not bad input. It subclasses ValueError so
callers that already catch ValueError keep working.
"""

from __future__ import annotations

import os

EXCERPT_CHARS = 80


class InputError(ValueError):
    """Input that vlmrel refuses, with a short user-facing reason (it names the file and line when there is one)."""


def excerpt(text: object, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable quote of user input for an error message (never the whole 200k-character input)."""
    value = str(text)
    shown = value if len(value) <= limit else value[:limit] + f"… ({len(value):,} characters)"
    return ascii(shown)[1:-1] if not shown.isprintable() else shown


def check_int_range(name: str, value: int, low: int, high: int) -> int:
    """``value`` when ``low <= value <= high``, else `InputError` naming the setting and its range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name} must be an integer from {low:,} to {high:,}, got {excerpt(value, 40)}")
    return value


def int_setting(name: str, default: int, minimum: int = 1) -> int:
    """An integer setting from the environment variable ``name`` (``default`` when unset), refused in words when it
    is not a whole number or is below ``minimum`` (a typo in a setting must not silently fall back)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name} must be a whole number, got {excerpt(raw, 40)!r}") from None
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return value
