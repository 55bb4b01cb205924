"""Cost of one change of the dashboard's Neuron-masking sliders, as the page pays it: BOTH embedded models (late and
early fusion side by side) re-run the gate's held-out questions with the mask (`interventions.live.run_masked`) and
compute the paired accuracy/confidence effect (`paired_effect`) against their cached unmasked pass
(`live_baseline`), exactly as pages/masking.py calls them. The target is ≤ 2 s per change for 300 questions.

Prints each model's unmasked pass (paid once) and, per slider position, seconds per change for both models
together (median of --repeats; each position re-computed; the models in parallel threads as the page runs them),
its ratio to the 2 s target, and with --full the full masked generate (the path before the fast one), interleaved.

    python benchmarks/bench_masking_slider.py                 # both models, 300 questions, ~1 min
    python benchmarks/bench_masking_slider.py --repeats 3 --full --threads 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TARGET_S = 2.0


def _setup(family: str, n: int, batch_size: int):
    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.gate.bundle import load_gate, load_gate_components
    from vlmrel_core.inspection.layer_probe_file import load_bundle_layer_probes
    from vlmrel_core.interventions.live import live_baseline
    from vlmrel_core.results.gate import load_gate_bundle
    from vlmrel_core.results.gate_splits import gate_split_scores, held_out_samples
    from vlmrel_core.results.runs import load_run
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    gate_yaml = catalog.gate_config(family)
    scores = gate_split_scores(load_gate_bundle(gate_yaml))
    samples = held_out_samples(scores, load_run(scores.run_dir), load_vqa_jsonl(catalog.dataset("adversarial")), n)
    loaded = load_gate(gate_yaml).loaded
    probes = load_bundle_layer_probes(gate_yaml.parent, load_gate_components(gate_yaml).probe)
    start = time.perf_counter()
    baseline = live_baseline(loaded, samples, batch_size=batch_size)
    return loaded, baseline, probes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="held-out questions re-run per change and model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--full", action="store_true", help="also time the full masked generate, interleaved "
                        "(the models one after the other, as the page ran them before)")
    parser.add_argument("--sequential", action="store_true", help="the fast pass one model after the other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlmrel_core.interventions.live import MaskSettings, paired_effect, run_masked, run_masked_in_parallel

    models = {family: _setup(family, args.n, args.batch_size) for family in ("late_fusion", "early_fusion")}

    def positions(probes):
        layer = probes.gate_layer
        return {
            "top-5 probe dims (gate layer)": MaskSettings(layer, top_k=5),
            "random 50% of dims (gate layer)": MaskSettings(layer, random_fraction=0.5),
            "top-5 probe dims (layer 0)": MaskSettings(probes.layers[0], top_k=5),
            "30% most-attended patches": MaskSettings(layer, patch_fraction=0.3, patch_which="high"),
            "top-5 + 30% least-attended": MaskSettings(layer, top_k=5, patch_fraction=0.3, patch_which="low"),
        }

    def change(settings_of, fast: bool) -> float:
        """One slider change as the page pays it: both models (in parallel threads unless --sequential)."""
        jobs = {family: (loaded, baseline, settings_of[family], probes.probes[settings_of[family].layer].coef.reshape(-1))
                for family, (loaded, baseline, probes, _) in models.items()}
        start = time.perf_counter()
        if fast and not args.sequential:
            results = run_masked_in_parallel(jobs)
        else:
            results = {family: run_masked(*job, batch_size=args.batch_size, fast=fast) for family, job in jobs.items()}
        for family, result in results.items():
            paired_effect(jobs[family][1].result, result)
        return time.perf_counter() - start

    names = list(positions(next(iter(models.values()))[2]))
    per_family = {family: positions(m[2]) for family, m in models.items()}
    fast_s: dict[str, list[float]] = {name: [] for name in names}
    full_s: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            settings_of = {family: per_family[family][name] for family in models}
            fast_s[name].append(change(settings_of, True))
            if args.full:
                full_s[name].append(change(settings_of, False))
    scale = 300 / args.n
    report = {
        "n_questions_per_model": args.n, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "unmasked_pass_s": {family: round(m[3], 3) for family, m in models.items()},
        "seconds_per_change_both_models": {k: round(statistics.median(v) * scale, 3) for k, v in fast_s.items()},
        "ratio_to_2s_target": {k: round(statistics.median(v) * scale / TARGET_S, 2) for k, v in fast_s.items()},
    }
    if args.full:
        report["full_generate_seconds_per_change_both_models"] = {
            k: round(statistics.median(v) * scale, 3) for k, v in full_s.items()}
        report["speed_up_vs_full"] = {k: round(statistics.median(full_s[k]) / statistics.median(fast_s[k]), 2)
                                      for k in names}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
