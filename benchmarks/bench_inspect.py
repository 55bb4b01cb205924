"""Cost of the Inspect page's "Ask": the gate's own answer (one captured generate) and the inspection pass that adds
every layer's probe score and the attention map, exactly as pages/inspect.py calls them
(`inspection.explain.inspect_question`).

Prints, in one run on the shipped bundle: the one-off costs (model + gate load; the per-layer probes as the first Ask
on a fresh machine gets them: read from the bundle, which ships them; for comparison a bundle without them: fitted
on the training run, then read back from the cache) and, per question, the median seconds from Ask to answer (the gate alone) and to the full page content, with the
ratio of the two. Target: <= 2 s from Ask to answer once the model is loaded.

    python benchmarks/bench_inspect.py                         # late fusion, 20 shipped questions
    python benchmarks/bench_inspect.py --family early_fusion --n 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="late_fusion", choices=("late_fusion", "early_fusion"))
    parser.add_argument("--n", type=int, default=20, help="shipped questions asked one at a time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.gate.bundle import load_gate, load_gate_components
    from vlmrel_core.inspection.explain import inspect_question
    from vlmrel_core.inspection.layer_probe_file import layer_probes_for_bundle
    from vlmrel_core.inspection.layer_probes import load_or_fit_layer_probes, training_run_dir
    from vlmrel_core.samples.catalog import sample_catalog

    catalog = sample_catalog()
    started = time.perf_counter()
    gate = load_gate(catalog.gate_config(args.family))
    load_s = time.perf_counter() - started
    components = load_gate_components(catalog.gate_config(args.family))
    provenance = components.calibration.provenance if components.calibration is not None else {}
    run_dir = training_run_dir(provenance, [catalog.root.parent, catalog.gate_dir(args.family)])
    with tempfile.TemporaryDirectory(prefix="vlmrel_bench_inspect_") as cache:
        started = time.perf_counter()  # first Ask on a fresh machine (empty cache): the bundle's own file
        probes = layer_probes_for_bundle(catalog.gate_dir(args.family), components.probe, lambda: run_dir, cache)
        bundle_s = time.perf_counter() - started
        started = time.perf_counter()
        load_or_fit_layer_probes(components.probe, run_dir, cache)  # a bundle without them: fitted
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        load_or_fit_layer_probes(components.probe, run_dir, cache)  # every later session: read back
        cached_s = time.perf_counter() - started

    samples = load_vqa_jsonl(catalog.dataset("adversarial"))[: args.n]
    inspect_question(gate, probes, samples[0].load_image(), samples[0].question)  # warm-up (first-call allocations)
    to_answer, to_page = [], []
    for sample in samples:
        image = sample.load_image()
        result = inspect_question(gate, probes, image, sample.question)
        to_answer.append(result.timings["gate_total_s"])
        to_page.append(result.timings["total_s"])
    answer_s, page_s = statistics.median(to_answer), statistics.median(to_page)
    print(json.dumps({
        "family": args.family,
        "threads": args.threads,
        "questions": len(samples),
        "model_and_gate_load_s": round(load_s, 2),
        "layer_probes_first_ask_from_bundle_s": round(bundle_s, 3),
        "layer_probes_fit_for_a_bundle_without_them_s": round(fit_s, 2),
        "layer_probes_from_cache_s": round(cached_s, 3),
        "ask_to_answer_median_s": round(answer_s, 3),
        "ask_to_full_page_median_s": round(page_s, 3),
        "full_page_over_answer": round(page_s / answer_s, 2),
        "target_ask_to_answer_s": 2.0,
        "ratio_to_target": round(answer_s / 2.0, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
