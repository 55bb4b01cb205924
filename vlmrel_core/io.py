"""Small file helpers every writer shares: atomic writes and numpy-aware JSON.

Why atomic: a reader (the dashboard, a resumed extraction, a concurrent gate) must see either the old file or the
new one, never a half-written one; `os.replace` is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and an atomic rename (fsynced)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays (the only non-JSON values our results hold)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Atomically write ``data`` as JSON (numpy-aware)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=json_default))


def read_json_and_tensors(
    directory: str | Path, json_name: str, tensors_name: str, error: type[Exception]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A JSON description and its safetensors arrays saved side by side (novelty statistics, shipped layer probes),
    read with every failure raised as ``error`` naming the file: missing, not JSON, not a JSON object, or damaged
    tensors. Safetensors only: nothing is ever unpickled."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    meta_path, tensor_path = directory / json_name, directory / tensors_name
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise error(f"{directory}: expected {json_name} and {tensors_name} (no {path.name})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{meta_path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise error(f"{meta_path} holds a JSON {type(meta).__name__}, not an object")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as err:  # safetensors raises its own error types for truncated or edited files
        raise error(f"{tensor_path} is not a readable safetensors file ({err})") from err
    return meta, tensors
