"""Read POPE / generic VQA JSONL (question_id, image, text|question, label|answer) with an image root.

Why strict: a malformed row or a missing image found halfway through a long extraction wastes hours, so every
row is validated up front and the error names the file and line: encoding (a UTF-8 BOM is accepted), JSON, the
question (`validation.questions`), the image header (`validation.images`: size cap, format), image paths confined
to the image root (unless ``allow_external_paths``), and the label against the row's answer set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from vlmrel_core.engine.answers import NUMBER_WORDS, normalize_answer
from vlmrel_core.validation.errors import InputError, excerpt
from vlmrel_core.validation.images import check_image_header, load_image
from vlmrel_core.validation.paths import resolve_inside
from vlmrel_core.validation.questions import validate_question

TEXT_KEYS = ("text", "question", "prompt")
LABEL_KEYS = ("label", "answer", "gt_answer")


class DatasetError(InputError):
    """A dataset file that cannot be used, with the file and line that broke it."""


@dataclass(frozen=True)
class VQASample:
    sample_id: str
    image_path: Path
    question: str
    label: str | None  # None only when read with require_label=False (unlabelled traffic for the gate)
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def load_image(self) -> Image.Image:
        """The validated RGB image (pixel cap, format, mode conversion: `validation.images.load_image`)."""
        try:
            return load_image(self.image_path).image
        except InputError as err:
            raise DatasetError(f"cannot read image {self.image_path} of sample {self.sample_id}: {err}") from None


def load_images(samples: Sequence[VQASample]) -> list[Image.Image]:
    """Each sample's image, every distinct file decoded once: POPE-style sets ask several questions about one
    image (2 in the shipped splits, 6 in POPE's), and decoding is most of loading them. Samples of one file share
    one `Image` object, so callers must not modify images in place (vlmrel's never do: greying makes a copy)."""
    decoded: dict[Path, Image.Image] = {}
    images = []
    for sample in samples:
        image = decoded.get(sample.image_path)
        if image is None:
            image = decoded[sample.image_path] = sample.load_image()
        images.append(image)
    return images


def check_label(label: Any, question_type: Any) -> str:
    """The label normalised, or `InputError` when it lies outside the row's answer set: yes/no for existence
    questions (and rows with no question_type, as in POPE), a number word or digit for count questions, one word
    for attribute questions, any non-empty text for other declared question types."""
    text = str(label).strip().lower()
    if not text:
        raise InputError("the label is empty")
    if question_type in (None, "existence"):
        normal = normalize_answer(text, "strict")
        if normal not in ("yes", "no"):
            raise InputError(f"label {excerpt(label, 40)!r} is not yes/no (the answer set of "
                             f"{question_type or 'POPE'} questions); give question_type for other questions")
        return normal
    if question_type == "count":
        normal = normalize_answer(text, "lenient")
        if normal not in NUMBER_WORDS:
            raise InputError(f"label {excerpt(label, 40)!r} is not a count (0-10 or zero-ten)")
        return normal
    if question_type == "attribute" and len(text.split()) != 1:
        raise InputError(f"label {excerpt(label, 40)!r} is not one word (the answer set of attribute questions)")
    return text


def _first(row: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def load_vqa_jsonl(
    path: str | Path, image_root: str | Path | None = None, check_images: bool = True, require_label: bool = True,
    allow_external_paths: bool = False,
) -> list[VQASample]:
    """Parse every row; image paths are relative to ``image_root`` (default: the JSONL's folder) and must stay
    inside it unless ``allow_external_paths``. With ``check_images`` each image's header is checked too."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    samples: list[VQASample] = []
    seen: set[str] = set()
    with path.open("rb") as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            where = f"{path}, line {line_no}"
            try:
                line = raw_line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{where}: not UTF-8 text (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{where}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise DatasetError(f"{where}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
            question = _first(row, TEXT_KEYS)
            label = _first(row, LABEL_KEYS)
            image = row.get("image")
            required = (("image", image), ("text/question", question)) + ((("label/answer", label),) if require_label else ())
            missing = [name for name, value in required if value is None]
            if missing:
                raise DatasetError(f"{where}: missing {', '.join(missing)}")
            if not isinstance(image, str) or not image.strip() or not isinstance(question, str):
                raise DatasetError(f"{where}: 'image' and the question must be non-empty strings")
            sample_id = str(row.get("question_id", f"line{line_no}"))
            if sample_id in seen:
                raise DatasetError(f"{where}: duplicate question_id {excerpt(sample_id, 40)!r}")
            seen.add(sample_id)
            try:
                question = validate_question(question)
                label_text = None if label is None else check_label(label, row.get("question_type"))
                image_path = resolve_inside(root, image, "image", allow_external_paths)
                if check_images:
                    if not image_path.is_file():
                        raise InputError(f"image not found: {image_path}")
                    check_image_header(image_path)
            except InputError as err:
                raise DatasetError(f"{where}: {err}") from None
            metadata = {k: v for k, v in row.items() if k not in ("image", "question_id") + TEXT_KEYS + LABEL_KEYS}
            samples.append(VQASample(sample_id, image_path, question, label_text, metadata))
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
