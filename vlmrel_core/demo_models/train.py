"""Train the embedded VLMs from scratch on the shapes task, reproducibly, on a few CPU cores.

Why this schedule (all measured here on the 2-core box, late fusion, quick adversarial eval of 256 questions):
a tiny VLM trained on yes/no alone stays at chance, so half of each batch is a caption task ("what objects are in
the image?"); yes/no learning starts only after the caption loss has fallen, and only at a moderate rate. Peak 3e-3
kept yes/no at chance for 2,000+ steps (held at 3e-3, still at chance at 2,700; a compressed two-cycle 3e-3 schedule
was at 53% at step 1,800), while one cosine from peak 1.5e-3 left chance at ~1,500 steps and reached 71% by 2,700.
One stage of 5,000 steps at ~0.3 s/step (one torch thread per model, both in parallel): 26.7 min measured.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers

from vlmrel_core.engine.adapters import get_adapter
from vlmrel_core.data.shapes import (
    CAPTION_PROMPT,
    POPE_SPLITS,
    GeneratorConfig,
    Scene,
    attribute_and_count_questions,
    make_scene,
    render_scene,
    scene_questions,
)
from vlmrel_core.demo_models.build import DemoFamily, build_demo_model

TRAIN_IMAGE_ID_OFFSET = 10_000_000  # training scenes never share ids with evaluation splits (ids < 1,000,000)


@dataclass
class TrainConfig:
    family: DemoFamily
    seed: int = 0
    steps: int = 5000
    warmup_steps: int = 100
    lr: float = 1.5e-3
    min_lr_fraction: float = 0.05
    caption_batch: int = 16
    question_batch: int = 16
    open_question_fraction: float = 0.1
    caption_drop_probability: float = 0.3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    n_train_images: int = 12000
    eval_every: int = 300
    n_eval_questions: int = 256
    threads: int = 1
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then one cosine over the whole run down to ``min_lr_fraction`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_fraction
    progress = min(1.0, step / max(1, cfg.steps))
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class _ExampleBuilder:
    """Turns (pixel index, prompt, target) into padded tensors, reusing the processor's own prompt layout."""

    def __init__(self, model: Any, processor: Any, family: DemoFamily):
        self.adapter = get_adapter(model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.early_fusion = self.adapter.fusion == "early"
        self._prompt_cache: dict[str, list[int]] = {}
        self._blank = render_scene(Scene(0, (), 0.0))

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompt_cache:
            encoded = self.adapter.prepare_inputs(self.processor, [self._blank], [question])
            self._prompt_cache[question] = encoded["input_ids"][0].tolist()
        return self._prompt_cache[question]

    def batch(self, prompts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        rows, labels, types = [], [], []
        for prompt, target in zip(prompts, targets):
            p_ids = self.prompt_ids(prompt)
            a_ids = self.tokenizer.encode(target, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            rows.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
            types.append([0] * len(p_ids) + [1] * len(a_ids))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        label_t = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        type_t = torch.ones((len(rows), width), dtype=torch.long)
        for i, (r, l, t) in enumerate(zip(rows, labels, types)):  # right padding: positions match unpadded inference
            input_ids[i, : len(r)] = torch.tensor(r)
            label_t[i, : len(l)] = torch.tensor(l)
            mask[i, : len(r)] = 1
            type_t[i, : len(t)] = torch.tensor(t)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}
        if self.early_fusion:
            out["token_type_ids"] = type_t
        return out


def _pixel_pool(processor: Any, scenes: list[Scene], gen: GeneratorConfig) -> torch.Tensor:
    chunks = []
    for start in range(0, len(scenes), 512):
        images = [render_scene(s, gen) for s in scenes[start : start + 512]]
        chunks.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)


@dataclass
class _TrainingData:
    scenes: list[Scene]
    pixels: torch.Tensor
    eval_pixels: torch.Tensor
    eval_items: list


def _training_data(processor: Any, cfg: TrainConfig) -> _TrainingData:
    scenes = [make_scene(TRAIN_IMAGE_ID_OFFSET + cfg.seed * 1_000_000 + i, cfg.generator) for i in range(cfg.n_train_images)]
    eval_scenes = [make_scene(900_000 + i, cfg.generator) for i in range(cfg.n_eval_questions // 2)]
    eval_rng = random.Random(1)
    eval_items = [(i, q) for i, s in enumerate(eval_scenes) for q in scene_questions(s, "adversarial", eval_rng, cfg.generator)]
    return _TrainingData(scenes, _pixel_pool(processor, scenes, cfg.generator), _pixel_pool(processor, eval_scenes, cfg.generator), eval_items)


def _train_steps(
    model: Any, processor: Any, cfg: TrainConfig, data: _TrainingData, rng: random.Random,
    steps: int, lr_at: Callable[[int], float], log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The optimisation loop: AdamW, gradient clipping, a logged yes/no loss and a periodic quick accuracy."""
    builder = _ExampleBuilder(model, processor, cfg.family)
    answer_tokens = builder.adapter.answer_tokens(processor.tokenizer)
    yes_id, no_id = answer_tokens.yes_ids[0], answer_tokens.no_ids[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0), betas=cfg.betas, weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    model.train()
    t_start = time.time()
    scenes = data.scenes
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        prompts, targets, index = [], [], []
        for _ in range(cfg.caption_batch):
            i = rng.randrange(len(scenes))
            names = scenes[i].object_names
            if len(names) > 1 and rng.random() < cfg.caption_drop_probability:
                names = [n for n in names if n != rng.choice(names)]
            prompts.append(CAPTION_PROMPT)
            targets.append(" and ".join(names))
            index.append(i)
        for _ in range(cfg.question_batch):
            i = rng.randrange(len(scenes))
            if rng.random() < cfg.open_question_fraction:
                _, text, label, _ = rng.choice(attribute_and_count_questions(scenes[i], rng))
            else:
                split = rng.choice(POPE_SPLITS)
                _, text, label, _ = rng.choice(scene_questions(scenes[i], split, rng, cfg.generator))
            prompts.append(text)
            targets.append(label)
            index.append(i)
        batch = builder.batch(prompts, targets)
        out = model(pixel_values=data.pixels[index], **batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            record = {"step": step, "loss": out.loss.item(),
                      "yes_no_loss": _yes_no_loss(out.logits, batch["labels"], yes_id, no_id),
                      "lr": lr_at(step), "elapsed_s": time.time() - t_start}
            if step % cfg.eval_every == 0 or step == steps - 1:
                record["eval_adversarial_accuracy"] = _quick_accuracy(model, builder, data.eval_pixels, data.eval_items, yes_id, no_id)
                model.train()
            history.append(record)
            log(f"[{cfg.family}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    model.eval()
    return history


def _save(model: Any, processor: Any, out_dir: str | Path, summary: dict[str, Any]) -> None:
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    (out_path / "training_log.json").write_text(json.dumps(summary, indent=1))


def train_demo_model(
    cfg: TrainConfig, out_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train one embedded model from scratch and save it (model + processor) with `save_pretrained`."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, processor = build_demo_model(cfg.family, cfg.seed)
    t0 = time.time()
    data = _training_data(processor, cfg)
    log(f"[{cfg.family}] data ready in {time.time() - t0:.0f}s: {len(data.scenes)} training images")
    t_start = time.time()
    history = _train_steps(model, processor, cfg, data, rng, cfg.steps, lambda step: learning_rate(step, cfg), log)
    summary = {"train_config": _jsonable(asdict(cfg)), "history": history, "train_seconds": time.time() - t_start,
               "wall_seconds": time.time() - t0, "torch": torch.__version__, "transformers": transformers.__version__}
    _save(model, processor, out_dir, summary)
    return summary


@torch.no_grad()
def _yes_no_loss(logits: torch.Tensor, labels: torch.Tensor, yes_id: int, no_id: int) -> float:
    """Cross-entropy of the first answer token on yes/no rows only: it sits at ln 2 until yes/no learning starts."""
    first = (labels != -100).float().argmax(dim=1)  # position of the first answer token
    rows = torch.arange(labels.shape[0])
    target = labels[rows, first]
    keep = (target == yes_id) | (target == no_id)
    if not keep.any():
        return float("nan")
    step_logits = logits[rows, first - 1][keep].float()
    return float(torch.nn.functional.cross_entropy(step_logits, target[keep]))


@torch.no_grad()
def _quick_accuracy(model: Any, builder: _ExampleBuilder, pixels: torch.Tensor, items: list, yes_id: int, no_id: int) -> float:
    """Yes-vs-no logit at the last prompt token on a fixed adversarial set (a training monitor, not a result)."""
    model.eval()
    correct = 0
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        prompts = [q[1] for _, q in chunk]
        enc = builder.batch(prompts, [""] * len(chunk))
        lengths = enc["attention_mask"].sum(1) - 1  # drop the appended eos: last prompt token is at length-2
        logits = model(pixel_values=pixels[[i for i, _ in chunk]], **{k: v for k, v in enc.items() if k != "labels"}).logits
        last = logits[torch.arange(len(chunk)), lengths - 1]
        predicted = np.where((last[:, yes_id] > last[:, no_id]).numpy(), "yes", "no")
        correct += sum(p == q[2] for p, (_, q) in zip(predicted, chunk))
    return correct / len(items)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
