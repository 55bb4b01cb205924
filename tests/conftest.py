"""Shared fixtures: tiny random-weight VLMs of the real classes, saved and re-loaded like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = REPO / "sample_data" / "models"
SAMPLE_DATA = REPO / "sample_data" / "shapes_pope"


def greedy_generation(model, tokenizer) -> None:
    """Generation settings every tiny test model shares: greedy, stopping at the tokenizer's EOS."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False


def save_checkpoint(model, processor, path: Path) -> Path:
    """Save like a real checkpoint, so tests load it through the same path (`load_vlm`)."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlmrel_core.demo_models.build import build_demo_model

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in ("late_fusion", "early_fusion"):
        model, processor = build_demo_model(family, seed=3)
        dirs[family] = save_checkpoint(model, processor, root / family)
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
