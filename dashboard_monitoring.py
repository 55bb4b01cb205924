"""The Monitoring page's question sources: a shipped drift split (through the sample-data catalog) or an uploaded
JSONL with its images, both read by the library's loader (`data.loader.load_vqa_jsonl`: path confinement, image
checks, labels optional for uploads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vlmrel_core.data.loader import DatasetError, VQASample, load_vqa_jsonl
from vlmrel_core.samples.catalog import sample_catalog

# Radio label -> shipped drift split (None: an upload).
SOURCES: dict[str, str | None] = {"shipped in-domain split": "in_domain", "shipped shifted split": "shifted",
                                  "upload (JSONL + images)": None}


def _uploaded_samples(jsonl: Any, images: Sequence[Any] | None, folder: Path) -> list[VQASample]:
    if jsonl is None:
        raise DatasetError("upload a questions JSONL (one object per line: image, question, optional label)")
    for image in images or []:
        name = Path(image.name).name
        if not name or name.startswith("."):
            raise DatasetError(f"uploaded image name {image.name!r} is not a plain file name")
        (folder / name).write_bytes(image.getvalue())
    path = folder / "questions.jsonl"
    path.write_bytes(jsonl.getvalue())
    return load_vqa_jsonl(path, require_label=False)


def batch_samples(split: str | None, jsonl: Any = None, images: Sequence[Any] | None = None,
                  limit: int = 100, folder: str | Path | None = None) -> list[VQASample]:
    """The first ``limit`` questions of a shipped drift split, or of the uploaded JSONL (its images uploaded too),
    written into ``folder`` (a temporary folder the caller removes once the gate has read the images)."""
    if limit < 1:
        raise DatasetError(f"the number of questions must be >= 1, got {limit}")
    if split:
        samples = load_vqa_jsonl(sample_catalog().drift_dataset(split))
    elif folder is None:
        raise DatasetError("an upload needs a folder to be written to")
    else:
        samples = _uploaded_samples(jsonl, images, Path(folder))
    if not samples:
        raise DatasetError("the questions file holds no questions")
    return samples[:limit]
