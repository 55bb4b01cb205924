"""Check a job's input files and folders before any model loads, and say plainly what is wrong.

Why up front: loading a model takes seconds to minutes; a typo in a data path found only afterwards wastes that
time on every try. The CLI and the dashboard call the same checks, so both say the same thing. Messages name the
path (and line, via the dataset loader) and never show a Python object's repr.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmrel_core.data.loader import VQASample, load_vqa_jsonl


class InputError(ValueError):
    """A missing or unusable input file or folder, named in words."""


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is an existing file; else an InputError naming ``what`` and the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is an existing folder; else an InputError naming ``what`` and the path."""
    path = Path(path).expanduser()
    if path.is_file():
        raise InputError(f"{what} {path} is a file; expected a folder")
    if not path.is_dir():
        raise InputError(f"{what} not found: {path}")
    return path


def require_run_dir(path: str | Path) -> Path:
    """An extraction run folder (one holding manifest.json)."""
    from vlmrel_core.engine.store import MANIFEST

    folder = require_dir(path, "run folder")
    if not (folder / MANIFEST).is_file():
        raise InputError(f"{folder} is not an extraction run (no {MANIFEST}); run `vlmrel extract --out {folder}` first")
    return folder


def require_out_dir(path: str | Path) -> Path:
    """An output folder that may not exist yet, but whose nearest existing ancestor is a folder (not a file)."""
    path = Path(path).expanduser()
    if path.is_file():
        raise InputError(f"output folder {path} is a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"cannot create output folder {path}: {parent} is a file")
            break
    return path


def check_dataset(data_path: str | Path, image_root: str | Path | None = None) -> list[VQASample]:
    """Every row of a VQA JSONL parsed and every image found (the loader names file and line on failure)."""
    require_file(data_path, "dataset file")
    if image_root is not None:
        require_dir(image_root, "image root")
    return load_vqa_jsonl(data_path, image_root)


def read_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """An RGB image from a file path or uploaded bytes; errors name the file (``name`` for bytes), not a stream repr."""
    label = name or (str(source) if not isinstance(source, bytes) else "uploaded image")
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source).expanduser().open("rb")
    except OSError as err:
        raise InputError(f"cannot open image {label}: {err.strerror or 'unreadable'}") from err
    try:
        with handle, Image.open(handle) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise InputError(f"cannot read image {label}: not an image format PIL recognises") from err
    except OSError as err:
        raise InputError(f"cannot read image {label}: the file is damaged or truncated") from err
