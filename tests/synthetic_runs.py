"""Synthetic extraction runs with known answers, written through the real RunWriter (no model needed).

Knobs: ``hidden_strength[l]`` plants correctness along dimension ``planted_dim`` of layer l's states (0 = no
information); ``item_difficulty`` makes correctness depend on the asked object only; ``output_strength`` makes the
output confidence weakly informative. Image statistics and question length carry no information by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.special import expit

from vlmrel_core.engine.store import RunManifest, RunWriter

GRID = (4, 4)


def make_run(
    path: Path,
    *,
    n_images: int = 60,
    questions_per_image: int = 4,
    n_items: int = 12,
    hidden_size: int = 8,
    hidden_strength: Sequence[float] = (0.0, 1.5, 4.0),
    planted_dim: int = 3,
    item_difficulty: bool = False,
    output_strength: float = 0.3,
    poolings: Sequence[str] = ("last_token",),
    attentions: bool = True,
    split_name: str = "adversarial",
    first_image_id: int = 0,
    fingerprint: str = "synthetic-model-1",
    seed: int = 0,
    shard_rows: int = 100,
    self_consistency_k: int | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    n = n_images * questions_per_image
    n_layers = len(hidden_strength)
    items = [f"object{i:02d}" for i in range(n_items)]
    item_p = np.linspace(0.1, 0.95, n_items) if item_difficulty else np.full(n_items, 0.7)
    image_id = np.repeat(np.arange(first_image_id, first_image_id + n_images), questions_per_image)
    item_idx = rng.integers(0, n_items, size=n)
    label_yes = rng.random(n) < 0.5
    correct = (rng.random(n) < item_p[item_idx]).astype(np.int64)
    answer_yes = np.where(correct == 1, label_yes, ~label_yes)
    sign = 2.0 * correct - 1.0

    states = rng.normal(size=(n, n_layers, hidden_size)).astype(np.float32)
    for layer, strength in enumerate(hidden_strength):
        states[:, layer, planted_dim] += strength * sign
    margin = np.abs(rng.normal(1.0, 1.0, size=n)) + output_strength * sign + output_strength
    margin = np.abs(margin)
    p_answer = expit(margin)
    log_odds = np.where(answer_yes, margin, -margin)
    entropy = -(p_answer * np.log(p_answer) + (1 - p_answer) * np.log(1 - p_answer)) + rng.uniform(0, 0.1, n)
    image_stats = rng.uniform(0, 1, size=(n_images, 5)).repeat(questions_per_image, axis=0)

    rows = pd.DataFrame({
        "sample_id": [f"{split_name}-{i}" for i in range(n)],
        "image": [f"images/{i:07d}.png" for i in image_id],
        "question": [f"is there a {items[k]} in the image?" for k in item_idx],
        "label": np.where(label_yes, "yes", "no"),
        "answer_text": np.where(answer_yes, "Yes", "No"),
        "answer": np.where(answer_yes, "yes", "no"),
        "answer_strict": np.where(answer_yes, "yes", "no"),
        "correct": correct,
        "correct_strict": correct,
        "n_image_tokens": GRID[0] * GRID[1],
        "grid_h": GRID[0],
        "grid_w": GRID[1],
        "question_length": rng.integers(6, 9, size=n),
        "question_type": "existence",
        "split": split_name,
        "asked_object": [items[k] for k in item_idx],
        "image_id": image_id,
        "p_yes": np.where(answer_yes, p_answer, 1 - p_answer),
        "p_no": np.where(answer_yes, 1 - p_answer, p_answer),
        "yes_no_mass": 1.0,
        "yes_no_log_odds": log_odds,
        "yes_no_margin": margin,
        "max_answer_prob": p_answer,
        "top1_top2_margin": margin + rng.normal(0, 0.2, n),
        "token_entropy": entropy,
        "top1_prob": p_answer * 0.95,
        "mean_token_logprob": np.log(p_answer) + rng.normal(0, 0.05, n).clip(-1, 0) - 0.01,
        "image_mean_r": image_stats[:, 0],
        "image_mean_g": image_stats[:, 1],
        "image_mean_b": image_stats[:, 2],
        "image_std": image_stats[:, 3],
        "image_edge_density": image_stats[:, 4],
    })
    if self_consistency_k:  # agreement rate among K samples, higher when correct
        agree = rng.binomial(self_consistency_k, np.where(correct == 1, 0.9, 0.6)) / self_consistency_k
        rows["sc_agreement"] = np.maximum(agree, 0.5)
        rows["sc_k"] = self_consistency_k
    tensors = {f"states.{p}": (states + (0.0 if i == 0 else rng.normal(0, 0.5, states.shape))).astype(np.float16)
               for i, p in enumerate(poolings)}
    tensors["lens_logodds"] = (log_odds[:, None] * np.linspace(0.2, 1.0, n_layers)[None, :]
                               + rng.normal(0, 0.5, (n, n_layers))).astype(np.float32)
    if attentions:
        tokens = GRID[0] * GRID[1]
        tensors["attention_image"] = rng.dirichlet(np.full(tokens, 0.5), size=(n, n_layers)).astype(np.float16)
        tensors["attention_counts"] = np.full(n, tokens, dtype=np.int32)

    manifest = RunManifest(
        model_source=f"/models/{fingerprint}", model_type="llava", family="llava", fusion="late",
        model_fingerprint=fingerprint, n_layers=n_layers, hidden_size=hidden_size, layers=list(range(n_layers)),
        poolings=list(poolings), attentions=attentions, attn_implementation="eager", dtype="float32",
        dataset_path=f"/data/{split_name}.jsonl", dataset_hash=f"hash-{split_name}-{seed}", n_samples=n,
        answer_tokens={"yes_ids": [1], "no_ids": [2]}, normalization="lenient", max_new_tokens=4,
    )
    writer = RunWriter(path, manifest)
    for start in range(0, n, shard_rows):
        stop = min(n, start + shard_rows)
        writer.write_shard(rows.iloc[start:stop].reset_index(drop=True), {k: v[start:stop] for k, v in tensors.items()})
    return Path(path)
