"""Will `vlmrel train-demo-models` fit its 30-minute budget on this machine? Measured, then projected.

Runs the real training loop (`demo_models.train._train_steps`, the shipped `TrainConfig`) for a short window in
both families at once, one process and one torch thread per model exactly as the command does, and prints each
family's seconds per step, the data-preparation time, the projected wall clock for the full schedule and its
ratio to the 30-minute budget, all measured in ONE run. The projection is what the command's own timing line
reports after a full run (`all families: N min wall clock`); this benchmark gets it in about a minute.

    python benchmarks/bench_train_demo_models.py
    python benchmarks/bench_train_demo_models.py --steps 100 --budget-min 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import replace
from typing import Any


def _measure(family: str, window_steps: int, warmup_steps: int) -> dict[str, Any]:
    import random

    import torch

    from vlmrel_core.demo_models.build import build_demo_model
    from vlmrel_core.demo_models.train import (
        TrainConfig,
        _ExampleBuilder,
        _quick_accuracy,
        _train_steps,
        _training_data,
        learning_rate,
    )

    shipped = TrainConfig(family=family)  # type: ignore[arg-type]
    torch.set_num_threads(shipped.threads)
    torch.manual_seed(shipped.seed)
    model, processor = build_demo_model(shipped.family, shipped.seed)
    started = time.perf_counter()
    data = _training_data(processor, shipped)  # the full training pool: its cost is part of the budget
    data_seconds = time.perf_counter() - started
    cfg = replace(shipped, eval_every=10**9)  # the periodic quick accuracy is timed on its own below
    rng = random.Random(shipped.seed)
    quiet = lambda line: None  # noqa: E731
    _train_steps(model, processor, cfg, data, rng, warmup_steps, lambda step: learning_rate(step, shipped), quiet)
    started = time.perf_counter()
    _train_steps(model, processor, cfg, data, rng, window_steps, lambda step: learning_rate(step, shipped), quiet)
    step_seconds = (time.perf_counter() - started) / window_steps
    builder = _ExampleBuilder(model, processor, shipped.family)
    tokens = builder.adapter.answer_tokens(processor.tokenizer)
    started = time.perf_counter()
    _quick_accuracy(model, builder, data.eval_pixels, data.eval_items, tokens.yes_ids[0], tokens.no_ids[0])
    n_evals = len(range(0, shipped.steps, shipped.eval_every)) + 1
    return {"family": family, "steps": shipped.steps, "step_seconds": step_seconds, "data_seconds": data_seconds,
            "eval_seconds": n_evals * (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per family")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, first-call costs)")
    parser.add_argument("--budget-min", type=float, default=30.0)
    args = parser.parse_args()

    from vlmrel_core.demo_models.pipeline import FAMILIES

    with mp.get_context("spawn").Pool(len(FAMILIES)) as pool:  # the command's own layout: one process per model
        results = pool.starmap(_measure, [(family, args.steps, args.warmup) for family in FAMILIES])
    projected = []
    for result in results:
        seconds = result["data_seconds"] + result["steps"] * result["step_seconds"] + result["eval_seconds"]
        projected.append(seconds)
        print(f"{result['family']:>13}: {result['step_seconds']:.3f} s/step over {args.steps} steps, data "
              f"{result['data_seconds']:.1f} s, quick evals {result['eval_seconds']:.1f} s -> {result['steps']} steps projected {seconds / 60:.1f} min")
    wall = max(projected)  # the families train in parallel
    print(f"projected wall clock (families in parallel): {wall / 60:.1f} min; "
          f"ratio to the {args.budget_min:.0f}-min budget: {wall / (60 * args.budget_min):.2f}")


if __name__ == "__main__":
    main()
