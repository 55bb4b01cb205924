"""Novelty score, window drift tests and the gate's OOD guard (synthetic states: fast, seeded)."""

import numpy as np
import pytest

from vlmrel_core.data.shapes import GeneratorConfig, make_scene, render_scene
from vlmrel_core.data.shifted import shifted_config
from vlmrel_core.gate.config import NoveltySection
from vlmrel_core.gate.drift_tests import WindowDriftDetector, classifier_test, mmd_test
from vlmrel_core.gate.novelty import NoveltyError, NoveltyModel, fit_novelty
from vlmrel_core.gate.ood_guard import OODGuard

D = 16


def _states(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    cov = np.diag(np.linspace(0.5, 2.0, D))
    return rng.multivariate_normal(np.full(D, shift), cov, size=n)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_novelty_flags_far_inputs_and_leaves_in_domain_alone(tmp_path, method):
    model = fit_novelty(_states(600, 0), _states(300, 1), method)
    held_out = _states(1000, 2)
    assert model.is_novel(held_out).mean() <= 0.05
    far = np.vstack([np.zeros((1, D)) + 25.0, _states(50, 3, shift=6.0)])
    assert model.is_novel(far).all()
    loaded = NoveltyModel.load(model.save(tmp_path / "n"))
    np.testing.assert_array_equal(loaded.score(held_out[:50]), model.score(held_out[:50]))
    assert loaded.threshold == model.threshold


def test_novelty_rejects_bad_input(tmp_path):
    with pytest.raises(NoveltyError, match="NaN"):
        fit_novelty(np.full((20, D), np.nan), _states(20, 1))
    with pytest.raises(NoveltyError, match="features"):
        fit_novelty(_states(50, 0), _states(50, 1)).score(np.zeros((2, D + 1)))
    with pytest.raises(NoveltyError, match="expected novelty.json"):
        NoveltyModel.load(tmp_path)


def test_classifier_test_alarms_on_shift_not_in_domain():
    reference = _states(400, 10)
    in_domain = [classifier_test(reference, _states(200, 100 + i), alpha=0.01, seed=i).alarm for i in range(10)]
    assert sum(in_domain) <= 1
    assert classifier_test(reference, _states(200, 7, shift=0.5), alpha=0.01).alarm
    assert mmd_test(reference, _states(200, 8, shift=0.5), permutations=200).alarm
    assert not mmd_test(reference, _states(200, 9), permutations=50).alarm


def test_window_alarm_makes_the_guard_uncertify_until_a_clean_window():
    model = fit_novelty(_states(600, 0), _states(300, 1), "mahalanobis")
    section = NoveltySection(window=50, on_alarm="fallback")
    guard = OODGuard(model, section)
    verdicts = [guard.observe(s) for s in _states(50, 20, shift=1.5)]
    assert verdicts[-1].window_alarm and not verdicts[-1].in_domain and verdicts[-1].window_report["alarm"]
    assert all(not v.in_domain for v in verdicts[-1:])
    clean = [guard.observe(s) for s in _states(50, 21)]
    assert clean[0].window_alarm  # still in alarm until the next window is checked
    assert not clean[-1].window_alarm
    assert guard.observe(np.full(D, 40.0)).novel


def test_novelty_section_range_checks():
    with pytest.raises(ValueError):
        NoveltySection(window=5)
    with pytest.raises(ValueError):
        NoveltySection(on_alarm="ignore")
    with pytest.raises(ValueError):
        NoveltySection(alpha=0.7)


def test_style_shifts_change_images_and_defaults_do_not():
    scene = make_scene(3)
    default = render_scene(scene).tobytes()
    assert render_scene(scene, GeneratorConfig()).tobytes() == default
    for kind in ("style", "outline", "antialias", "jpeg", "background_white", "blur_strong"):
        config = shifted_config(kind)
        assert render_scene(make_scene(3, config), config).tobytes() != default, kind


def test_window_detector_validates_tests():
    model = fit_novelty(_states(100, 0), _states(100, 1))
    with pytest.raises(ValueError, match="subset"):
        WindowDriftDetector(model, ["ks"])


def test_grouped_classifier_test_handles_a_window_about_one_image():
    reference = _states(400, 10)
    one_image = _states(200, 11)
    groups = np.r_[np.arange(400), np.full(200, 400)]  # every window row asks about the same image
    result = classifier_test(reference, one_image, alpha=0.01, seed=0, groups=groups)
    assert 0.0 <= result.pvalue <= 1.0
    paired = np.r_[np.arange(400) // 2, 200 + np.arange(200) // 2]  # two questions per image on both sides
    assert not classifier_test(reference, _states(200, 12), alpha=0.01, seed=0, groups=paired).alarm
    with pytest.raises(ValueError, match="groups"):
        classifier_test(reference, one_image, groups=np.zeros(3))
