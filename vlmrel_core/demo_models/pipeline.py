"""Reproduce the shipped embedded models (`vlmrel train-demo-models`) and write their model cards.

Why one process per model with one torch thread each: measured on the 2-core CI box, two threads per process under
contention ran several times slower than one thread per process.
"""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from vlmrel_core.demo_models.train import TrainConfig, train_demo_model
from vlmrel_core.io import write_json
from vlmrel_core.progress import Progress, report
from vlmrel_core.samples.catalog import FAMILIES


def _train_one(family: str, out_root: str, steps: int | None) -> dict[str, Any]:
    cfg = TrainConfig(family=family)  # type: ignore[arg-type]
    if steps is not None:
        cfg = replace(cfg, steps=steps)
    out_dir = Path(out_root) / family
    log = lambda line: print(line, flush=True)  # noqa: E731
    summary = train_demo_model(cfg, out_dir, log=log)
    return {"family": family, "train_seconds": summary["train_seconds"], "wall_seconds": summary["wall_seconds"]}


def train_demo_models(out_root: str | Path, families: Sequence[str] = FAMILIES, steps: int | None = None, parallel: bool = True) -> list[dict[str, Any]]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown demo families {unknown}; expected some of {FAMILIES}")
    if parallel and len(families) > 1:
        with mp.get_context("spawn").Pool(len(families)) as pool:
            return pool.starmap(_train_one, [(f, str(out_root), steps) for f in families])
    return [_train_one(f, str(out_root), steps) for f in families]


def write_model_card(
    model_dir: str | Path, data_dir: str | Path, batch_size: int = 32, progress: Progress | None = None,
) -> dict[str, Any]:
    """Held-out accuracy per split (and per open question type) measured through the normal run path.

    ``progress`` counts questions over every split (about 4,000 questions: tens of seconds on a CPU).
    """
    import pandas as pd

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.engine.answers import is_correct
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.engine.run import run_batch

    loaded = load_vlm(model_dir, attn_implementation="sdpa")
    accuracy: dict[str, float] = {}
    yes_rate: dict[str, float] = {}
    counts: dict[str, int] = {}
    splits = {jsonl: load_vqa_jsonl(jsonl) for jsonl in sorted(Path(data_dir).glob("*.jsonl"))}
    total, done = sum(len(s) for s in splits.values()), 0
    report(progress, done, total, "loading")
    for jsonl, samples in splits.items():
        records = []
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            record = run_batch(loaded, [s.load_image() for s in batch], [s.question for s in batch],
                               layers=[-1], poolings=("last_token",), logit_lens=False)
            for sample, answer in zip(batch, record.answer):
                records.append({"type": sample.metadata.get("question_type", "existence"), "answer": answer,
                                "correct": is_correct(answer, sample.label)})
            done += len(batch)
            report(progress, done, total, jsonl.stem)
        frame = pd.DataFrame(records)
        for qtype, group in frame.groupby("type"):
            key = jsonl.stem if qtype == "existence" else f"{jsonl.stem}/{qtype}"
            accuracy[key] = round(float(group["correct"].mean()), 4)
            counts[key] = int(len(group))
            if qtype == "existence":
                yes_rate[key] = round(float((group["answer"] == "yes").mean()), 4)
    card = {
        "model_dir": str(model_dir),
        "architecture": type(loaded.model).__name__,
        "fusion": loaded.adapter.fusion,
        "fingerprint": loaded.fingerprint,
        "n_parameters": int(sum(p.numel() for p in loaded.model.parameters())),
        "n_layers": loaded.n_layers,
        "hidden_size": loaded.hidden_size,
        "data_dir": str(data_dir),
        "accuracy": accuracy,
        "yes_rate": yes_rate,
        "n_questions": counts,
        "note": "held-out: evaluation image ids (< 1,000,000) never appear in training (ids >= 10,000,000)",
    }
    write_json(Path(model_dir) / "model_card.json", card)
    return card
