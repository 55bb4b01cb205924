"""Paths and JSON files named by users: confined to a base folder unless explicitly allowed, read with the file named.

Why confinement: a gate bundle's YAML (``probe.path``, ``calibration_file``, the model path) and a dataset's
image paths were followed anywhere on disk, so a bundle or JSONL from someone else could make vlmrel read any
file. A path must resolve (symlinks followed) inside its base folder unless the config says
``allow_external_paths: true`` (or the CLI gets ``--allow-external-paths``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmrel_core.validation.errors import InputError, excerpt

MAX_JSON_BYTES = 256 * 1024 * 1024


def resolve_inside(base_dir: str | Path, path: str | Path, what: str, allow_external: bool = False) -> Path:
    """``path`` (relative to ``base_dir`` unless absolute) resolved; refused when it leaves ``base_dir``."""
    text = str(path)
    if "\x00" in text:
        raise InputError(f"{what}: path contains a NUL byte")
    base = Path(base_dir).resolve()
    candidate = Path(text).expanduser() if allow_external else Path(text)
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not allow_external and not resolved.is_relative_to(base):
        raise InputError(f"{what}: {excerpt(text, 120)} points outside {base}; "
                         "set allow_external_paths: true in the config (or --allow-external-paths) to allow it")
    return resolved


def read_text_file(path: str | Path, what: str, max_bytes: int) -> str:
    """A UTF-8 text file (BOM allowed) read whole only after its size is checked; `InputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise InputError(f"{what} {path} is {size:,} bytes; the limit is {max_bytes:,}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {err.start}); is it the right file?") from None


def read_json_file(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file's content; not found / too large / not UTF-8 / not JSON are `InputError` naming the file."""
    text = read_text_file(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise InputError(f"{what} {path}: JSON nested too deeply") from None
