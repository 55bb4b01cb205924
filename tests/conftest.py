"""Shared fixtures: tiny random-weight VLMs of the real classes, saved and re-loaded like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = REPO / "sample_data" / "models"
SAMPLE_DATA = REPO / "sample_data" / "shapes_pope"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlmrel_core.demo_models.build import build_demo_model

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in ("late_fusion", "early_fusion"):
        model, processor = build_demo_model(family, seed=3)
        model.save_pretrained(root / family)
        processor.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dirs: dict[str, Path]):
    from vlmrel_core.loading import load_vlm

    return {family: load_vlm(path) for family, path in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmrel_core.data.shapes import write_split

    root = tmp_path_factory.mktemp("shapes")
    return write_split(root, "adversarial", n_images=12)
