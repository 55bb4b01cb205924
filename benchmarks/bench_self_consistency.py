"""Cost of the gate's gray zone: a question routed to self-consistency (K samples, T=0.7, top-p 0.9) against the
greedy gate pass alone, on the shipped bundles, at batch 1 (the serving path).

Every question is forced into the gray zone (bounds [0, 1]) so each one pays its K samples; per question the gate
itself records the greedy pass's seconds and the sampling's seconds (`evidence.timings`), and the multiplier
(greedy + sampling) / greedy. Families are interleaved question by question so both see the same machine load.
Beside it, in the same loop, the same K samples drawn from a prefill of their own (`sample_answers` without the
greedy pass's cache: the path before the gate kept its prefill). Prints the median multipliers per family against
the goal (< 2x), and the sequence-forward cost (the paper's K+1).

    python benchmarks/bench_self_consistency.py             # 30 questions per family, 1 thread
    python benchmarks/bench_self_consistency.py --n 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

FAMILIES = ("late_fusion", "early_fusion")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="shipped questions per family")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.engine.self_consistency import sample_answers
    from vlmrel_core.gate.bundle import load_gate, resolve_gate_config
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    gates = {}
    for family in FAMILIES:
        config = resolve_gate_config(catalog.gate_config(family))
        config.monitor.routing.gray_zone_bounds = [0.0, 1.0]  # every question pays its K samples
        gates[family] = load_gate(config)
    samples = load_vqa_jsonl(catalog.dataset("adversarial"))[: args.n + 1]
    for gate in gates.values():  # warm-up: first-call allocations
        gate.answer(samples[0].load_image(), samples[0].question)
    time_multiplier: dict[str, list[float]] = {f: [] for f in FAMILIES}
    greedy_s: dict[str, list[float]] = {f: [] for f in FAMILIES}
    sampling_s: dict[str, list[float]] = {f: [] for f in FAMILIES}
    own_prefill_multiplier: dict[str, list[float]] = {f: [] for f in FAMILIES}
    k = {}
    for sample in samples[1:]:
        image = sample.load_image()
        for family, gate in gates.items():
            decision = gate.answer(image, sample.question)
            assert decision.action == "self_consistency", decision.action
            timings = decision.evidence["timings"]
            greedy_s[family].append(timings["pass_s"])
            sampling_s[family].append(timings["self_consistency_s"])
            time_multiplier[family].append(decision.evidence["time_multiplier"])
            k[family] = decision.self_consistency["k"]
            m = gate.config.monitor
            own = sample_answers(gate.loaded, image, sample.question, gate.self_consistency,
                                 max_new_tokens=m.max_new_tokens, normalization=m.normalization)
            greedy = timings["pass_s"] / timings["batch_size"]
            own_prefill_multiplier[family].append((greedy + own.seconds) / greedy)
    print(json.dumps({
        "questions_per_family": args.n,
        "threads": args.threads,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "families": {f: {
            "k": k[f],
            "greedy_pass_median_s": round(statistics.median(greedy_s[f]), 4),
            "self_consistency_median_s": round(statistics.median(sampling_s[f]), 4),
            "gray_zone_time_multiplier_median": round(statistics.median(time_multiplier[f]), 3),
            "with_its_own_prefill_median": round(statistics.median(own_prefill_multiplier[f]), 3),
            "paper_cost_unit": f"{k[f] + 1} sequence passes (greedy + K)",
        } for f in FAMILIES},
        "goal": "gray-zone time multiplier < 2.0",
    }, indent=1))


if __name__ == "__main__":
    main()
