"""The shifted split: same task on images changed in palette, noise, blur and shape size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmrel_core.data.shapes import GeneratorConfig, make_scene, render_scene
from vlmrel_core.data.shifted import SHIFTED_FIRST_IMAGE_ID, shifted_config, write_shifted_split


def test_shifted_split_changes_the_images_not_the_task(tmp_path):
    path = write_shifted_split(tmp_path, "adversarial", n_images=3, kind="all")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["image_id"] == SHIFTED_FIRST_IMAGE_ID
    assert json.loads((tmp_path / "adversarial_shifted_all.shift.json").read_text())["shift"] == "all"
    config = shifted_config("palette")
    scene = make_scene(SHIFTED_FIRST_IMAGE_ID, config)
    shifted = np.asarray(render_scene(scene, config), dtype=float)
    plain = np.asarray(render_scene(scene, GeneratorConfig()), dtype=float)
    assert np.abs(shifted - plain).max() > 30
    assert write_shifted_split(tmp_path, "adversarial", n_images=3, kind="all") == path  # same shift: rerun is fine
    with pytest.raises(ValueError, match="already holds 3 image"):
        write_shifted_split(tmp_path, "adversarial", n_images=3, kind="noise")
