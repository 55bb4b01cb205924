"""Cost of the live ablation slider: re-score N held-out questions with the top-k probe-weighted dims of a layer
zeroed, and the paired-bootstrap Δ accuracy against the cached unablated run.

Times the library path the dashboard's slider calls: `interventions.evaluate_accuracy` with a `DimensionAblation`
on images loaded once, then `interventions.ablation_effect` against the cached baseline correctness. Prints
seconds per N questions (unablated and ablated) and their ratio, measured in ONE run with the two variants
interleaved so machine drift hits them alike. Target: a few seconds per few hundred questions on 2 cores.

    python benchmarks/bench_ablation_slider.py                         # sample_data/models/late_fusion
    python benchmarks/bench_ablation_slider.py --model sample_data/models/early_fusion --weights PROBE_DIR
    python benchmarks/bench_ablation_slider.py --tiny                  # random tiny LLaVA + generated data, runs anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _tiny_model_and_data(n_questions: int) -> tuple[str, str]:
    from vlmrel_core.data.shapes import write_split
    from vlmrel_core.demo_models.build import build_demo_model

    root = Path(tempfile.mkdtemp(prefix="vlmrel_bench_slider_"))
    model, processor = build_demo_model("late_fusion", seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = write_split(root / "data", "adversarial", n_images=(n_questions + 1) // 2)  # two questions per image
    return str(root / "model"), str(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_data/models/late_fusion")
    parser.add_argument("--data", default="sample_data/shapes_pope/adversarial.jsonl", help="held-out questions (first N used)")
    parser.add_argument("--tiny", action="store_true", help="random-weight tiny LLaVA and generated questions (ignores --model/--data)")
    parser.add_argument("--weights", default=None, help="probe directory saved by vlmrel (default: a seeded random vector; timing does not depend on it)")
    parser.add_argument("--layer", type=int, default=-1)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.interventions.ablation import DimensionAblation, load_ablation_probe, top_k_dimensions
    from vlmrel_core.interventions.study import ablation_effect, evaluate_accuracy
    from vlmrel_core.engine.loading import load_vlm

    model_dir, data = _tiny_model_and_data(args.n) if args.tiny else (args.model, args.data)
    loaded = load_vlm(model_dir, attn_implementation="sdpa")
    samples = load_vqa_jsonl(data)[: args.n]
    images = [s.load_image() for s in samples]  # the dashboard keeps these in memory
    types = [str(s.metadata.get("question_type", "untyped")) for s in samples]
    if args.weights:
        weights = load_ablation_probe(args.weights, loaded).weights
    else:
        weights = np.random.default_rng(0).normal(size=loaded.hidden_size)
    ablation = DimensionAblation(args.layer, tuple(int(d) for d in top_k_dimensions(weights, args.k)))

    def unablated() -> np.ndarray:
        return evaluate_accuracy(loaded, samples, images=images, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    baseline = unablated()  # warm-up, and the cached baseline the slider compares against

    def slider_move() -> float:
        ablated = evaluate_accuracy(loaded, samples, ablation, images=images, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens)
        return float(ablation_effect(baseline, ablated, types, n_boot=args.n_boot).loc[0, "delta_pp"])

    slider_move()  # warm-up
    times: dict[str, list[float]] = {"unablated": [], "ablated": []}
    delta = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        unablated()
        times["unablated"].append(time.perf_counter() - start)
        start = time.perf_counter()
        delta = slider_move()
        times["ablated"].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(json.dumps({
        "model": model_dir, "tiny_random": args.tiny, "n_layers": loaded.n_layers, "hidden_size": loaded.hidden_size,
        "layer": args.layer, "k": args.k, "n_questions": len(samples), "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats,
        "seconds_per_n_unablated": round(median["unablated"], 3),
        "seconds_per_n_ablated_with_ci": round(median["ablated"], 3),
        "seconds_per_300_ablated": round(median["ablated"] * 300 / len(samples), 3),
        "ratio_ablated_over_unablated": round(median["ablated"] / median["unablated"], 3),
        "baseline_accuracy": round(float(baseline.mean()), 4),
        "delta_pp": round(delta, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
