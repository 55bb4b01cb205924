"""The OOD guard through a real embedded model and a gate fitted by `build_gate_from_run` on a shipped run.

Why: the novelty and window tests are unit-tested on synthetic states (test_novelty_drift_tests.py); these tests
check the whole path — model states at the probe layer, the bundle's novelty statistics, the routing and the
``certified`` flag in `ReliabilityGate._decide` — on the embedded late-fusion model and fresh in-domain questions.
The gate has no gray zone, so no self-consistency sampling runs and every decision is one greedy pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from conftest import SAMPLES
from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.data.shapes import make_scene, render_scene
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.gate.config import NoveltySection
from vlmrel_core.gate.fit import build_gate_from_run
from vlmrel_core.validation.errors import InputError

FAMILY = "late_fusion"
QUESTION = "is there a red circle in the image?"
N_HELD_OUT = 200
OOD = "out of distribution"


@pytest.fixture(scope="module")
def loaded():
    return load_vlm(SAMPLES.model_dir(FAMILY), attn_implementation="eager")


@pytest.fixture(scope="module")
def build():
    """The shipped gate's recipe (risk target 0.1, delta 0.1) at its layer with one C, without a gray zone."""
    layer = json.loads(SAMPLES.gate_file(FAMILY, "report.json").read_text())["layer"]
    return build_gate_from_run(SAMPLES.run_dir(FAMILY, "adversarial"), layer=layer, risk_target=0.1, delta=0.1,
                               gray_zone=None, c_grid=(10.0,), model_path=str(SAMPLES.model_dir(FAMILY)))


def gate_with(build, loaded, **novelty):
    """The built gate with its novelty section's window settings replaced (the fitted statistics are kept)."""
    config = copy.deepcopy(build.config)
    config.monitor.novelty = NoveltySection(path=config.monitor.novelty.path, **novelty)
    return dataclasses.replace(build.components(), config=config).gate(loaded)


@pytest.fixture(scope="module")
def held_out():
    """Fresh in-domain questions (image ids the gate never saw): the drift check's in-domain split."""
    samples = load_vqa_jsonl(SAMPLES.drift_dataset("in_domain"))[:N_HELD_OUT]
    return [s.load_image() for s in samples], [s.question for s in samples]


@pytest.fixture(scope="module")
def held_out_decisions(build, loaded, held_out):
    return gate_with(build, loaded).answer_batch(*held_out, batch_size=32)


def scene(i: int) -> Image.Image:
    return render_scene(make_scene(900_000 + i))


def test_the_built_gate_carries_a_certificate_and_novelty_statistics(build):
    assert build.report["risk_certificate"]["target_risk"] == 0.1
    assert build.novelty is not None and build.novelty.threshold > 0 and build.novelty.image is not None
    assert build.config.monitor.novelty.image_statistics
    assert build.report["novelty"]["false_reject_rate_test"] <= 0.05


def test_degenerate_questions_go_to_fallback_uncertified(build, loaded):
    decisions = gate_with(build, loaded).answer_batch([scene(0), scene(1), scene(2)], ["?", ".", "? ?"])
    for decision in decisions:
        assert decision.reason == OOD and not decision.in_domain
        assert decision.action == "fallback" and not decision.accepted and not decision.certified
        assert decision.novelty > decision.evidence["novelty_threshold"]


def test_photos_and_blank_images_go_to_fallback_uncertified(build, loaded):
    """The state score alone let these through (issue 16: photos 2.6-5.8 against a k-NN threshold of 6.4); the
    image statistics scored in the same call route every one of them."""
    photos = [Image.fromarray(image) for image in load_sample_images().images]
    far = [photos[0], photos[0].crop((100, 100, 324, 324)), photos[1]]
    far += [Image.new("RGB", (64, 64), colour) for colour in ("white", "black", (115, 115, 115))]
    decisions = gate_with(build, loaded).answer_batch(far, [QUESTION] * len(far))
    for decision in decisions:
        assert decision.reason == OOD and decision.action == "fallback" and not decision.certified
        assert decision.evidence["image_novelty"] > decision.evidence["image_novelty_threshold"]


@pytest.mark.parametrize("question", ["", " ", "\t"])
def test_empty_questions_are_refused_before_any_answer(build, loaded, question):
    """An empty or whitespace question never reaches the model, so it can never come out certified: the gate
    refuses it with one clear error (punctuation-only questions are answered and routed as novel, above)."""
    gate = gate_with(build, loaded)
    with pytest.raises(InputError, match="empty|whitespace"):
        gate.answer_batch([scene(3)], [question])
    assert gate.stats()["n_decisions"] == 0


def test_held_out_in_domain_inputs_are_left_alone(held_out_decisions):
    novel = [d for d in held_out_decisions if d.novelty > d.evidence["novelty_threshold"]
             or d.evidence["image_novelty"] > d.evidence["image_novelty_threshold"]]
    assert len(novel) <= 0.05 * N_HELD_OUT, f"{len(novel)}/{N_HELD_OUT} in-domain inputs routed as novel"
    assert all(d.reason == OOD and d.action == "fallback" and not d.certified for d in novel)
    # the certificate is in force for the rest: some decisions are certified answers
    assert sum(d.certified and d.action == "generate" for d in held_out_decisions) >= 0.2 * N_HELD_OUT


def _after_forced_alarm(build, loaded, held_out, on_alarm, n_after=19):
    """A 20-input window of degenerate questions (all novel: the window's novelty-rate test must alarm), then
    ``n_after`` in-domain inputs, fewer than a window, so the alarm is still held while they are answered."""
    gate = gate_with(build, loaded, window=20, on_alarm=on_alarm)
    images, questions = held_out
    flood = gate.answer_batch([scene(i) for i in range(20)], ["?"] * 20, batch_size=20)
    assert flood[-1].evidence["window_drift"]["alarm"], "a window of 20 degenerate questions did not alarm"
    return gate.answer_batch(images[:n_after], questions[:n_after], batch_size=n_after)


def test_flag_keeps_the_action_but_drops_certified_during_an_alarm(build, loaded, held_out, held_out_decisions):
    after = _after_forced_alarm(build, loaded, held_out, "flag")
    baseline = held_out_decisions[: len(after)]
    assert any(d.certified for d in baseline), "nothing to drop: no baseline decision was certified"
    assert not any(d.certified for d in after)
    for decision, before in zip(after, baseline):
        if before.reason == OOD:
            continue
        assert decision.reason == "window drift alarm" and not decision.in_domain
        assert decision.action == before.action and decision.accepted == before.accepted


def test_fallback_on_alarm_routes_everything_to_fallback(build, loaded, held_out):
    after = _after_forced_alarm(build, loaded, held_out, "fallback")
    assert all(d.action == "fallback" and not d.accepted and not d.certified for d in after)
    assert {d.reason for d in after} <= {"window drift alarm", OOD}
