"""Read POPE / generic VQA JSONL (question_id, image, text|question, label|answer) with an image root.

Why strict: a malformed row or a missing image found halfway through a long extraction wastes hours, so every
row is validated up front and the error names the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, UnidentifiedImageError

TEXT_KEYS = ("text", "question", "prompt")
LABEL_KEYS = ("label", "answer", "gt_answer")


class DatasetError(ValueError):
    """A dataset file that cannot be used, with the file and line that broke it."""


@dataclass(frozen=True)
class VQASample:
    sample_id: str
    image_path: Path
    question: str
    label: str | None  # None only when read with require_label=False (unlabelled traffic for the gate)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def load_image(self) -> Image.Image:
        try:
            with Image.open(self.image_path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise DatasetError(f"cannot read image {self.image_path} of sample {self.sample_id}: {err}") from err


def _first(row: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def load_vqa_jsonl(
    path: str | Path, image_root: str | Path | None = None, check_images: bool = True, require_label: bool = True
) -> list[VQASample]:
    """Parse every row; image paths are relative to ``image_root`` (default: the JSONL's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    samples: list[VQASample] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            question = _first(row, TEXT_KEYS)
            label = _first(row, LABEL_KEYS)
            image = row.get("image")
            required = (("image", image), ("text/question", question)) + ((("label/answer", label),) if require_label else ())
            missing = [name for name, value in required if value is None]
            if missing:
                raise DatasetError(f"{where}: missing {', '.join(missing)}")
            if not isinstance(image, str) or not isinstance(question, str) or not question.strip():
                raise DatasetError(f"{where}: 'image' and the question must be non-empty strings")
            sample_id = str(row.get("question_id", f"line{line_no}"))
            if sample_id in seen:
                raise DatasetError(f"{where}: duplicate question_id {sample_id!r}")
            seen.add(sample_id)
            image_path = (root / image).resolve() if not Path(image).is_absolute() else Path(image)
            if check_images and not image_path.is_file():
                raise DatasetError(f"{where}: image not found: {image_path}")
            metadata = {k: v for k, v in row.items() if k not in ("image", "question_id") + TEXT_KEYS + LABEL_KEYS}
            label_text = None if label is None else str(label).strip().lower()
            samples.append(VQASample(sample_id, image_path, question.strip(), label_text, metadata))
    if not samples:
        raise DatasetError(f"{path}: no rows")
    return samples


def dataset_hash(path: str | Path, samples: list[VQASample]) -> str:
    """Hash of the JSONL bytes and each referenced image's bytes: a cache built on other data is detected."""
    digest = hashlib.sha256(Path(path).read_bytes())
    for image_path in sorted({s.image_path for s in samples}):
        if image_path.is_file():
            digest.update(image_path.read_bytes())
    return digest.hexdigest()[:16]
