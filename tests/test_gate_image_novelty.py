"""Image-statistics novelty (`gate.image_novelty`): the statistics, the score, the joint thresholds, the image
window test and the guard — on generator scenes and synthetic numbers (fast, seeded, no model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.gate.config import NoveltySection
from vlmrel_core.gate.drift_tests import WindowDriftDetector, image_classifier_test
from vlmrel_core.gate.image_novelty import (
    IMAGE_FEATURES, ImageNoveltyError, ImageNoveltyModel, fit_image_novelty, image_features, images_features,
    joint_thresholds,
)
from vlmrel_core.gate.novelty import NoveltyModel, fit_novelty
from vlmrel_core.gate.ood_guard import OODGuard

F = {name: i for i, name in enumerate(IMAGE_FEATURES)}


def _jpeg(image: Image.Image, quality: int = 15) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def scenes():
    """Features of 200 generator scenes: 120 to fit, 40 to calibrate, 40 held out."""
    return images_features(render_scene(make_scene(i)) for i in range(200))


@pytest.fixture(scope="module")
def fitted(scenes):
    return fit_image_novelty(scenes[:120], scenes[120:160], false_reject_rate=0.05)


def test_statistics_see_blank_images_and_jpeg_blocks():
    blank = image_features(Image.new("RGB", (64, 64), (115, 115, 115)))
    assert blank.shape == (len(IMAGE_FEATURES),)
    assert blank[F["background_share"]] == 1.0 and blank[F["edge_density"]] == 0.0 and blank[F["std_r"]] < 1e-9
    scene = render_scene(make_scene(5))
    plain, compressed = image_features(scene), image_features(_jpeg(scene))
    assert compressed[F["blockiness"]] > plain[F["blockiness"]] + 0.1
    big = image_features(scene.resize((256, 256), Image.NEAREST))  # another size is scored at the fitted side
    assert big.shape == plain.shape and np.isfinite(big).all()


def test_far_images_are_novel_and_held_out_scenes_are_not(fitted, scenes):
    held_out = fitted.score(scenes[160:])
    assert (held_out > fitted.threshold).mean() <= 0.05 * 2  # 40 images: at most 4 over a 5% threshold
    rng = np.random.default_rng(0)
    photo_like = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((64, 64))
    far = [Image.new("RGB", (64, 64), colour) for colour in ("white", "black", (115, 115, 115))]
    far += [photo_like, _jpeg(render_scene(make_scene(300)), 10)]
    assert (fitted.score_images(far) > fitted.threshold).all()


def test_save_and_load_round_trip_and_refuse_other_features(fitted, scenes, tmp_path):
    loaded = ImageNoveltyModel.load(fitted.save(tmp_path))
    np.testing.assert_allclose(loaded.score(scenes[:5]), fitted.score(scenes[:5]))
    assert loaded.threshold == fitted.threshold
    meta = (tmp_path / "image_novelty.json").read_text().replace('"mean_r"', '"mean_red"')
    (tmp_path / "image_novelty.json").write_text(meta)
    with pytest.raises(ImageNoveltyError, match="rebuild the gate"):
        ImageNoveltyModel.load(tmp_path)
    with pytest.raises(ImageNoveltyError, match="expected image_novelty.json"):
        ImageNoveltyModel.load(tmp_path / "none")
    with pytest.raises(ImageNoveltyError, match="NaN"):
        fitted.score(np.full((1, len(IMAGE_FEATURES)), np.nan))


@pytest.mark.parametrize("overlap", ["independent", "identical"])
def test_joint_thresholds_keep_the_union_at_the_rate(overlap):
    rng = np.random.default_rng(1)
    state = rng.normal(size=2000)
    image = state.copy() if overlap == "identical" else rng.normal(size=2000)
    ts, ti, rate = joint_thresholds(state, image, 0.04)
    union = ((state > ts) | (image > ti)).mean()
    assert union <= 0.04
    assert 0.02 <= rate <= 0.04
    if overlap == "identical":
        assert rate == pytest.approx(0.04) and union > 0.035
    else:
        assert rate < 0.025 and union > 0.03  # about half each: nearly disjoint flags
    with pytest.raises(ImageNoveltyError):
        joint_thresholds(state[:5], image[:5], 0.04)


def _joint_model(scenes):
    rng = np.random.default_rng(2)
    states = rng.normal(size=(200, 6))
    model = fit_novelty(states[:120], states[120:160], "mahalanobis", false_reject_rate=0.05)
    return model.attach_image(fit_image_novelty(scenes[:120], scenes[120:160], false_reject_rate=0.05)), states


def test_attached_image_model_saves_with_the_state_model(scenes, tmp_path):
    model, states = _joint_model(scenes)
    assert model.base_novel_rate <= 0.05
    assert model.info["state_only_threshold"] <= model.threshold + 1e-5  # the joint threshold is never lower
    loaded = NoveltyModel.load(model.save(tmp_path))
    assert loaded.image is not None and loaded.image.threshold == model.image.threshold
    blank = images_features([Image.new("RGB", (64, 64), "white")])
    assert loaded.is_novel(states[:1], blank).all() and not loaded.is_novel(states[:1]).all()
    model.image = None
    NoveltyModel.load(model.save(tmp_path))  # a refit without image statistics removes the old files
    assert not (tmp_path / "image_novelty.json").exists()


def test_image_classifier_test_counts_each_image_once(scenes):
    reference = np.repeat(scenes[:120], 2, axis=0)  # two questions per image, as in the runs
    in_domain = np.repeat(scenes[160:200], 3, axis=0)
    assert not image_classifier_test(reference, in_domain, alpha=0.01, seed=0).alarm
    jpeg = np.repeat(images_features(_jpeg(render_scene(make_scene(400 + i))) for i in range(40)), 3, axis=0)
    result = image_classifier_test(reference, jpeg, alpha=0.01, seed=0)
    assert result.alarm and result.statistic > 0.9
    few = image_classifier_test(reference, np.repeat(scenes[:5], 10, axis=0))
    assert not few.alarm and few.pvalue == 1.0  # five distinct images: nothing to test


def test_guard_routes_a_blank_image_and_the_window_uses_image_statistics(scenes):
    model, states = _joint_model(scenes)
    guard = OODGuard(model, NoveltySection(window=40, window_tests=["novelty_rate", "image_classifier"]))
    with pytest.raises(ValueError, match="image_features"):
        guard.observe(states[0])
    blank = image_features(Image.new("RGB", (64, 64), "black"))
    verdict = guard.observe(states[0], blank)
    assert verdict.novel and verdict.image_novelty > model.image.threshold
    jpeg = images_features(_jpeg(render_scene(make_scene(500 + i))) for i in range(39))
    verdicts = [guard.observe(s, f) for s, f in zip(states[160:199], jpeg)]
    assert verdicts[-1].window_alarm and verdicts[-1].window_report["alarm"]
    with pytest.raises(ValueError, match="need image statistics"):
        WindowDriftDetector(fit_novelty(states[:120], states[120:160]), ["image_classifier"])


def test_novelty_section_checks_image_tests():
    with pytest.raises(ValueError, match="image_statistics"):
        NoveltySection(image_statistics=False, window_tests=["classifier", "image_classifier"])
    with pytest.raises(ValueError, match="each test once"):
        NoveltySection(window_tests=["classifier", "classifier"])


def test_reference_rows_of_the_two_scores_are_the_same_calibration_rows(scenes):
    """The state classifier test groups reference rows by their image statistics: both samples must be the same rows."""
    calibration = np.repeat(scenes[:150], 4, axis=0)  # 600 rows > the 400-row reference sample
    states = np.column_stack([np.arange(600.0), np.random.default_rng(3).normal(size=(600, 3))])
    state_model = fit_novelty(states[:200], states, "mahalanobis", seed=7)
    image_model = fit_image_novelty(scenes, calibration, seed=7)
    rows = state_model.reference_states[:, 0].astype(int)
    np.testing.assert_allclose(image_model.reference_features, calibration[rows].astype(np.float32), rtol=1e-6)
