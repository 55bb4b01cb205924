"""The shipped embedded models: real classes, loaded offline through the Auto classes, honest model cards."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES
from vlmrel_core.data.loader import load_vqa_jsonl
from vlmrel_core.demo_models.train import TrainConfig, learning_rate, train_demo_model
from vlmrel_core.engine.answers import is_correct
from vlmrel_core.engine.loading import load_vlm
from vlmrel_core.engine.run import run_batch
from vlmrel_core.samples.catalog import FAMILY_SPECS

EXPECTED = {name: spec.model_class for name, spec in FAMILY_SPECS.items()}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_shipped_model_loads_through_auto_classes_offline(family, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(SAMPLES.model_dir(family))
    processor = AutoProcessor.from_pretrained(SAMPLES.model_dir(family))
    assert type(model).__name__ == EXPECTED[family]
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_model_card_accuracy_is_in_band_and_reproducible(family):
    card = json.loads((SAMPLES.model_dir(family) / "model_card.json").read_text())
    assert 0.70 <= card["accuracy"]["adversarial"] <= 0.92, card["accuracy"]
    for split in ("random", "popular"):
        assert split in card["accuracy"]
    loaded = load_vlm(SAMPLES.model_dir(family), attn_implementation="sdpa")
    assert loaded.fingerprint == card["fingerprint"]
    samples = load_vqa_jsonl(SAMPLES.dataset("adversarial"))[:192]
    correct = []
    for start in range(0, len(samples), 64):
        batch = samples[start : start + 64]
        record = run_batch(loaded, [s.load_image() for s in batch], [s.question for s in batch], layers=[-1],
                           poolings=("last_token",), logit_lens=False)
        correct += [is_correct(a, s.label) for a, s in zip(record.answer, batch)]
    measured = sum(correct) / len(correct)
    # 192 of the card's 2,400 questions: within ~4 standard errors of the card's figure
    assert abs(measured - card["accuracy"]["adversarial"]) < 0.13


def test_training_is_seeded_and_deterministic(tmp_path):
    cfg = TrainConfig(family="late_fusion", steps=4, n_train_images=48, n_eval_questions=8, eval_every=100,
                      caption_batch=4, question_batch=4)
    train_demo_model(cfg, tmp_path / "a", log=lambda line: None)
    train_demo_model(cfg, tmp_path / "b", log=lambda line: None)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = load_vlm(tmp_path / "a")
    assert fresh.adapter.family == "llava"
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [0, 3]
    assert log["train_config"]["steps"] == 4 and log["wall_seconds"] >= log["train_seconds"] > 0


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(family="late_fusion", steps=1000, warmup_steps=10, lr=1e-3, min_lr_fraction=0.05)
    rates = [learning_rate(step, cfg) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # monotone after warmup
    assert rates[500] == pytest.approx(0.05e-3 + 0.95e-3 * 0.5)
    assert learning_rate(5000, cfg) == pytest.approx(0.05e-3)


def test_write_model_card_measures_each_split_and_reports_progress(tmp_path):
    """The card's accuracy is the run path's accuracy on the data given; progress counts every question once."""
    import shutil

    from vlmrel_core.demo_models.pipeline import write_model_card

    model_dir = tmp_path / "model"
    shutil.copytree(SAMPLES.model_dir("late_fusion"), model_dir)
    source = load_vqa_jsonl(SAMPLES.dataset("adversarial"))[:24]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "images").mkdir()
    lines = []
    for sample in source:
        shutil.copy(sample.image_path, data_dir / "images" / sample.image_path.name)
        row = {"question_id": sample.sample_id, "image": f"images/{sample.image_path.name}", "text": sample.question,
               "label": sample.label}
        lines.append(json.dumps(row))
    (data_dir / "tiny.jsonl").write_text("\n".join(lines) + "\n")
    calls = []
    card = write_model_card(model_dir, data_dir, batch_size=8, progress=lambda d, t, s="": calls.append((d, t, s)))
    loaded = load_vlm(model_dir)
    record = run_batch(loaded, [s.load_image() for s in source], [s.question for s in source], layers=[-1],
                       poolings=("last_token",), logit_lens=False)
    expected = sum(is_correct(a, s.label) for a, s in zip(record.answer, source)) / len(source)
    assert card["accuracy"] == {"tiny": round(expected, 4)}
    assert calls[-1][:2] == (24, 24) and [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)
    assert json.loads((model_dir / "model_card.json").read_text())["accuracy"] == card["accuracy"]
