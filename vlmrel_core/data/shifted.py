"""Shifted POPE-style splits for drift tests: the same task, images from another distribution.

Why: the gate's drift monitor must fire on data its calibration was not certified on (other colours, noisier,
blurred or smaller shapes) and stay quiet on fresh in-domain data. These splits change only the image
distribution (`shapes.GeneratorConfig` knobs); questions and labels follow the same generator, so a drop in
accuracy or a change of confidence is the shift's doing.

Image ids start far from the in-domain ranges (``first_image_id`` default 1,000,000), and writing refuses to
reuse an existing image file: `shapes.write_split` keeps existing PNGs, so a shifted split written over an
in-domain image folder would otherwise silently reuse unshifted images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

from vlmrel_core.data.shapes import GeneratorConfig, write_split

SHIFTED_FIRST_IMAGE_ID = 1_000_000

#: Named shifts; "all" combines them. Values are far enough from the defaults to move a tiny model's states.
SHIFTS: dict[str, dict[str, float | int]] = {
    "palette": {"palette_shift": 70},
    "noise": {"max_noise": 60.0},
    "blur": {"blur_probability": 1.0},
    "small": {"min_size": 5, "max_size": 9},
}
SHIFTS["all"] = {k: v for shift in list(SHIFTS.values()) for k, v in shift.items()}
#: Style and background shifts: same colours, shapes and questions, another way of drawing them.
SHIFTS.update({
    "background_white": {"background": (255, 255, 255)},
    "background_dark": {"background_shift": -70},
    "background_colour": {"background": (150, 120, 80)},
    "noise_high": {"max_noise": 35.0},
    "outline": {"outline": True},
    "antialias": {"antialias": True},
    "size_large": {"min_size": 18, "max_size": 28},
    "jpeg": {"jpeg_quality": 15},
    "blur_strong": {"blur_probability": 1.0, "blur_radius": 2.0},
    "style": {"outline": True, "antialias": True, "background": (235, 235, 225)},
})


def shifted_config(kind: str = "all", base: GeneratorConfig = GeneratorConfig()) -> GeneratorConfig:
    """``base`` with the named shift applied (see `SHIFTS`)."""
    if kind not in SHIFTS:
        raise ValueError(f"unknown shift {kind!r}; expected one of {sorted(SHIFTS)}")
    return replace(base, **SHIFTS[kind])


def write_shifted_split(
    out_dir: str | Path,
    split: str = "adversarial",
    n_images: int = 200,
    kind: str = "all",
    first_image_id: int = SHIFTED_FIRST_IMAGE_ID,
    question_types: Sequence[str] = ("existence",),
    file_name: str | None = None,
) -> Path:
    """Write a shifted POPE-format split (JSONL + PNGs under ``out_dir/images``) and ``<jsonl>.shift.json``
    describing the generator config; returns the JSONL path."""
    config = shifted_config(kind)
    out = Path(out_dir)
    name = file_name or f"{split}_shifted_{kind}.jsonl"
    sidecar = out / (Path(name).stem + ".shift.json")
    description = {"shift": kind, "generator_config": asdict(config), "first_image_id": first_image_id,
                   "n_images": n_images, "split": split}
    existing = [
        image_id for image_id in range(first_image_id, first_image_id + n_images)
        if (out / "images" / f"{image_id:07d}.png").exists()
    ]
    same_as_before = sidecar.is_file() and _same_images(json.loads(sidecar.read_text()), description)
    if existing and not same_as_before:
        raise ValueError(
            f"{out / 'images'} already holds {len(existing)} image(s) with ids in the shifted range "
            f"(e.g. {existing[0]}) that this shift did not write; use another folder or another first_image_id"
        )
    path = write_split(out, split, n_images, first_image_id=first_image_id, question_types=question_types,
                       config=config, file_name=name)
    sidecar.write_text(json.dumps(description, indent=1))
    return path


def _same_images(previous: dict, current: dict) -> bool:
    """Existing PNGs may be reused only if the same generator config rendered them over a covering id range."""
    return (
        previous.get("generator_config") == current["generator_config"]
        and previous.get("first_image_id") == current["first_image_id"]
        and previous.get("n_images", -1) >= current["n_images"]
    )
