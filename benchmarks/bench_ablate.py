"""Cost of `vlmrel ablate` (the README's conditions: top-5 probe dims, random-5, a random half of the dims, and
greying the high / low / random 30% of patches), the fast path against the previous one, side by side in one run:

* fast (the default of `run_ablation_study` and `vlmrel ablate`): batch by batch, one unablated pass keeps its
  inputs and every layer's prefill output; the dimension ablations resume at the probe's layer, the masks grey the
  kept pixel tensor and run one prefill to the first answer token (`interventions.study_passes`);
* full (`fast=False`, `vlmrel ablate --full-passes`, the previous path): one unablated pass, then every condition
  as the full masked `generate` over all questions (7 passes).

The two run interleaved (``--rounds`` each, alternating) on the same questions and images; the tables are checked
identical. Prints seconds and ms per question of each, the ratio per round, CPU seconds (less sensitive than wall
time to other jobs on the machine), and the load average: the CPU is shared, so only ratios of interleaved runs
mean anything. Target on 2 cores: the README's ablate (`--full`: all 2,400 adversarial questions) in <= 30 s.

    python benchmarks/bench_ablate.py            # 240 questions, 2 rounds (~1 min on a busy 2-core machine)
    python benchmarks/bench_ablate.py --full     # the README's 2,400 questions, 1 round
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all 2,400 adversarial questions (the README's command)")
    parser.add_argument("--n", type=int, default=240, help="questions without --full")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, 1 with --full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, as the CLI)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.full else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlmrel_core.data.loader import load_images, load_vqa_jsonl
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.interventions import ablation, study
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    loaded = load_vlm(catalog.model_dir("late_fusion"), attn_implementation="eager")
    probe = ablation.load_ablation_probe(catalog.report_probe_dir("late_fusion", "adversarial"), loaded)
    samples = load_vqa_jsonl(catalog.dataset("adversarial"))
    samples = samples if args.full else samples[: args.n]
    images = load_images(samples)  # as `vlmrel ablate` decodes them: each file once
    n = len(samples)
    print(f"{n} questions, layer {probe.layer}, batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load (1/5/15 min): {_load()}")
    options = dict(ks=(5,), random_fraction=0.5, mask_fraction=0.3, n_boot=2000, batch_size=args.batch_size,
                   images=images)
    study.run_ablation_study(loaded, samples[:8], probe.layer, probe.weights, **{**options, "images": images[:8]})

    def timed(fast: bool) -> tuple[float, float, object]:
        wall, cpu = time.perf_counter(), time.process_time()
        table = study.run_ablation_study(loaded, samples, probe.layer, probe.weights, fast=fast, **options)
        return time.perf_counter() - wall, time.process_time() - cpu, table

    walls: dict[str, list[float]] = {"fast": [], "full": []}
    cpus: dict[str, list[float]] = {"fast": [], "full": []}
    identical = True
    for r in range(rounds):
        order = ("full", "fast") if r % 2 == 0 else ("fast", "full")
        tables = {}
        for name in order:
            wall, cpu, tables[name] = timed(name == "fast")
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"  round {r + 1} {name:4s}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, {wall / n * 1000:5.1f} ms per "
                  f"question   load {_load()}", flush=True)
        identical &= tables["fast"].equals(tables["full"])  # type: ignore[union-attr]
        print(f"  round {r + 1} ratio full / fast: {walls['full'][-1] / walls['fast'][-1]:.2f}x wall, "
              f"{cpus['full'][-1] / cpus['fast'][-1]:.2f}x CPU", flush=True)
    best = {name: min(values) for name, values in walls.items()}
    print(f"best of {rounds}: fast {best['fast']:.1f} s ({best['fast'] / n * 1000:.1f} ms per question), full "
          f"{best['full']:.1f} s ({best['full'] / n * 1000:.1f} ms per question, {best['full'] / (7 * n) * 1000:.1f} "
          f"ms per question-pass); ratio {best['full'] / best['fast']:.2f}x wall, "
          f"{min(cpus['full']) / min(cpus['fast']):.2f}x CPU; identical tables: {identical}")


if __name__ == "__main__":
    main()
