"""Cost of one change of the dashboard's Neuron-masking sliders: re-run the gate's held-out questions with the mask
(`interventions.live.run_masked`) and the paired accuracy/confidence effect (`paired_effect`) against the cached
unmasked pass (`live_baseline`), exactly as pages/masking.py calls them.

Prints the unmasked pass's time (paid once per model) and, per slider position, seconds per change for N questions
(median of --repeats; each position re-computed, not read from the page's cache).

    python benchmarks/bench_masking_slider.py                      # late fusion, 300 questions
    python benchmarks/bench_masking_slider.py --family early_fusion --n 300 --threads 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="late_fusion", choices=("late_fusion", "early_fusion"))
    parser.add_argument("--n", type=int, default=300, help="held-out questions re-run per change")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.gate.bundle import load_gate, load_gate_components
    from vlmrel_core.inspection.layer_probes import fit_layer_probes
    from vlmrel_core.interventions.live import MaskSettings, live_baseline, paired_effect, run_masked
    from vlmrel_core.results.gate import load_gate_bundle
    from vlmrel_core.results.gate_splits import gate_split_scores, held_out_samples
    from vlmrel_core.results.runs import load_run
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    gate_yaml = catalog.gate_config(args.family)
    scores = gate_split_scores(load_gate_bundle(gate_yaml))
    run = load_run(scores.run_dir)
    samples = held_out_samples(scores, run, load_vqa_jsonl(catalog.dataset("adversarial")), args.n)
    loaded = load_gate(gate_yaml).loaded
    probes = fit_layer_probes(load_gate_components(gate_yaml).probe, scores.run_dir)
    layer = probes.gate_layer
    weights = probes.probes[layer].coef.reshape(-1)

    start = time.perf_counter()
    baseline = live_baseline(loaded, samples, batch_size=args.batch_size)
    baseline_s = time.perf_counter() - start
    positions = {
        "top-5 probe dims": MaskSettings(layer, top_k=5),
        "random 50% of dims": MaskSettings(layer, random_fraction=0.5),
        "30% most-attended patches": MaskSettings(layer, patch_fraction=0.3, patch_which="high"),
        "top-5 + 30% least-attended": MaskSettings(layer, top_k=5, patch_fraction=0.3, patch_which="low"),
    }
    per_change = {}
    for name, settings in positions.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            paired_effect(baseline.result, run_masked(loaded, baseline, settings, weights, batch_size=args.batch_size))
            times.append(time.perf_counter() - start)
        per_change[name] = round(statistics.median(times), 3)
    print(json.dumps({
        "family": args.family, "n_questions": len(samples), "threads": args.threads, "batch_size": args.batch_size,
        "layer": layer, "unmasked_pass_s": round(baseline_s, 3), "seconds_per_change": per_change,
        "seconds_per_change_per_300": {k: round(v * 300 / len(samples), 3) for k, v in per_change.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
