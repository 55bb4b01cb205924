"""Cost of `vlmrel ablate` (the README's conditions: top-5 probe dims, random-5, a random half of the dims, and
greying the high / low / random 30% of patches), measured side by side in one run:

* shared: `run_ablation_study` as the CLI runs it: one unablated pass per model, every condition paired with it
  (7 passes over the questions);
* unshared: the loop a script would write, one fresh unablated pass per condition (12 passes); its accuracies are
  checked equal to the shared study's;
* the shared study with 1 and with 2 torch threads (`vlmrel ablate --threads`), numbers checked identical.

Prints seconds per question (all conditions) and per question-pass, the ratios, and the machine's load: the CPU is
shared, so only ratios of interleaved runs mean anything. Target on 2 cores: the README's ablate (`--full`:
all 2,400 adversarial questions) in <= 30 s.

    python benchmarks/bench_ablate.py            # 48 questions (~1-2 min on a busy 2-core machine)
    python benchmarks/bench_ablate.py --full     # the README's 2,400 questions
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all 2,400 adversarial questions (the README's command)")
    parser.add_argument("--n", type=int, default=48, help="questions without --full")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.interventions import ablation, study
    from vlmrel_core.interventions.masking import MASK_WHICH, mask_image_patches
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    loaded = load_vlm(catalog.model_dir("late_fusion"), attn_implementation="eager")
    probe = ablation.load_ablation_probe(catalog.report_probe_dir("late_fusion", "adversarial"), loaded)
    samples = load_vqa_jsonl(catalog.dataset("adversarial"))
    samples = samples if args.full else samples[: args.n]
    images = [s.load_image() for s in samples]
    n = len(samples)
    layer = probe.layer
    print(f"{n} questions, layer {layer}, batch {args.batch_size}, cores {os.cpu_count()}, "
          f"load (1/5/15 min): {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    options = dict(ks=(5,), random_fraction=0.5, mask_fraction=0.3, n_boot=200, batch_size=args.batch_size,
                   images=images)
    study.evaluate_accuracy(loaded, samples[:4], images=images[:4], batch_size=4)  # warm-up

    def shared(threads: int) -> tuple[float, object]:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        table = study.run_ablation_study(loaded, samples, layer, probe.weights, **options)
        return time.perf_counter() - started, table

    def unshared(threads: int) -> tuple[float, dict[str, tuple[float, float]]]:
        """One fresh baseline per condition: (seconds, {condition: (baseline acc, ablated acc)})."""
        torch.set_num_threads(threads)
        started = time.perf_counter()
        top = ablation.top_k_dimensions(probe.weights, 5)
        hidden = loaded.hidden_size
        dims = {"top_k": top, "random_k": ablation.random_dimensions(hidden, k=5, seed=1, exclude=top),
                "random_fraction": ablation.random_dimensions(hidden, fraction=0.5, seed=104729)}
        out = {}
        for condition, chosen in dims.items():
            base = study.evaluate_accuracy(loaded, samples, images=images, batch_size=args.batch_size)
            spec = ablation.DimensionAblation(layer, tuple(int(d) for d in chosen))
            ablated = study.evaluate_accuracy(loaded, samples, spec, images=images, batch_size=args.batch_size)
            out[condition] = (base.mean(), ablated.mean())
        for which in MASK_WHICH:
            base = study.ablation_baseline(loaded, samples, layer, images, batch_size=args.batch_size)
            masked, _ = mask_image_patches(images, base.attention_maps, base.grids, 0.3, which, seed=0)
            ablated = study.evaluate_accuracy(loaded, samples, images=masked, batch_size=args.batch_size)
            out[f"mask_{which}"] = (base.correct.mean(), ablated.mean())
        return time.perf_counter() - started, out

    shared_1, table_1 = shared(1)
    print(f"  shared,   1 thread : {shared_1:6.1f} s   load {os.getloadavg()[0]:.1f}", flush=True)
    unshared_1, accuracies = unshared(1)
    print(f"  unshared, 1 thread : {unshared_1:6.1f} s   load {os.getloadavg()[0]:.1f}", flush=True)
    shared_2, table_2 = shared(2)
    print(f"  shared,   2 threads: {shared_2:6.1f} s   load {os.getloadavg()[0]:.1f}", flush=True)

    overall = table_1[table_1["question_type"] == "all"].set_index("condition")  # type: ignore[index]
    same_accuracy = all(np.isclose(overall.loc[c, "baseline_acc"], b) and np.isclose(overall.loc[c, "ablated_acc"], a)
                        for c, (b, a) in accuracies.items())
    same_threads = table_1.equals(table_2)  # type: ignore[union-attr]
    print(f"shared study: {shared_1 / n * 1000:.1f} ms per question ({shared_1 / (7 * n) * 1000:.1f} ms per "
          f"question-pass, 7 passes); unshared: {unshared_1 / n * 1000:.1f} ms per question (12 passes)")
    print(f"ratio unshared / shared (1 thread): {unshared_1 / shared_1:.2f}x  (same accuracies: {same_accuracy})")
    print(f"ratio 2 threads / 1 thread (shared): {shared_2 / shared_1:.2f}x  (identical tables: {same_threads})")


if __name__ == "__main__":
    main()
