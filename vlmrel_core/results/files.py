"""Reading one artifact file: JSON objects and CSV tables, with errors that name the file.

Why here: every results loader reads JSON or CSV written by the library; one place turns a missing file, bad
JSON, a missing column or a failed validation into a `ResultsError` naming the path, instead of a KeyError.
Only JSON, YAML (safe), CSV, parquet and safetensors are read; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


class LooseModel(BaseModel):
    """Base of every result schema: writers may add keys later; the ones read are required and typed."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ResultsError(ValueError):
    """An artifact that cannot be read back as the library wrote it; the message names the file."""


def require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{what} not found: {path}")
    return path


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    path = require_file(path, what)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def validate(model: type[ModelT], data: Any, path: str | Path, where: str = "") -> ModelT:
    """``model.model_validate(data)``; a failure lists each bad field and names the file."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        fields = "; ".join(f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ResultsError(f"{path} is not a valid {model.__name__}: {fields}") from None


def read_csv_table(
    path: str | Path, what: str, required: Iterable[str], *, allow_empty: bool = False, bool_columns: Iterable[str] = ()
) -> pd.DataFrame:
    """A CSV the library wrote, checked for its columns; booleans parsed from their 'True'/'False' text."""
    path = require_file(path, what)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        if allow_empty:
            return pd.DataFrame(columns=list(required))
        raise ResultsError(f"{path} is empty; expected a {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} is not a readable CSV: {err}") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ResultsError(f"{path} is not a {what}: missing columns {missing}; it has {list(frame.columns)}")
    if frame.empty and not allow_empty:
        raise ResultsError(f"{path} has no rows; expected a {what}")
    for column in bool_columns:
        values = frame[column]
        if values.dtype != bool:
            text = values.astype(str).str.strip().str.lower()
            bad = sorted(set(text) - {"true", "false"})
            if bad:
                raise ResultsError(f"{path}: column {column!r} must be True/False, found {bad[:3]}")
            frame[column] = text == "true"
    return frame
