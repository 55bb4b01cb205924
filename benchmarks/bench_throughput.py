"""Extraction throughput: the loop a user would write vs `vlmrel extract` at batch 1 and at larger batches.

The naive loop is one `generate(output_hidden_states=True, output_attentions=True, return_dict_in_generate=True)`
per question, slicing every layer's prefill state at the last prompt token and the answer position's
head-averaged attention. Every variant loads its images from disk and answers the same questions with the same
max_new_tokens, one torch thread; `extract` variants write a real run (rows, tensors, manifest) to a temporary
folder. The variants are interleaved round by round, so drift on a shared machine hits them alike; the ratios are
medians of per-round ratios.

    python benchmarks/bench_throughput.py                       # embedded late-fusion model, ~1-2 min
    python benchmarks/bench_throughput.py --random-size medium  # random 12-layer, 768-wide LLaVA
    python benchmarks/bench_throughput.py --full                # 300 questions, more rounds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def naive_loop(loaded, samples, max_new_tokens: int) -> None:
    """What a user would write: one generate per question with every hidden state and attention returned."""
    model, adapter = loaded.model, loaded.adapter
    for sample in samples:
        image = sample.load_image().convert("RGB")
        inputs = adapter.prepare_inputs(loaded.processor, [image], [sample.question])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_hidden_states=True,
                                 output_attentions=True, return_dict_in_generate=True,
                                 pad_token_id=loaded.tokenizer.pad_token_id)
        prefill_states = torch.stack([h[0, -1] for h in out.hidden_states[0]]).float().numpy()
        prefill_attention = torch.stack([a[0, :, -1].mean(0) for a in out.attentions[0]]).float().numpy()
        loaded.tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        del prefill_states, prefill_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "sample_data/models/late_fusion"))
    parser.add_argument("--random-size", choices=["small", "medium"], default=None)
    parser.add_argument("--data", default=str(REPO / "sample_data/shapes_pope/adversarial.jsonl"))
    parser.add_argument("--n", type=int, default=None, help="questions per variant per round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="300 questions, 5 rounds (several minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.engine.extract import extract
    from vlmrel_core.engine.loading import load_vlm

    random_model = args.random_size is not None
    if random_model:
        from bench_capture import _random_llava

        source = _random_llava(args.random_size)
    else:
        source = args.model
    n = args.n or (300 if args.full else (32 if random_model else 96))
    rounds = args.rounds or (5 if args.full else (2 if random_model else 3))
    loaded = load_vlm(source, attn_implementation="eager")
    samples = load_vqa_jsonl(args.data)[:n]
    subset = Path(tempfile.mkdtemp(prefix="vlmrel_bench_data_")) / "questions.jsonl"
    lines = Path(args.data).read_text().splitlines()[:n]
    subset.write_text("\n".join(lines) + "\n")
    image_root = Path(args.data).parent
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    def run_extract(batch_size: int) -> None:
        with tempfile.TemporaryDirectory(prefix="vlmrel_bench_run_") as out:
            extract(loaded, subset, out, image_root=image_root, attentions=True, batch_size=batch_size,
                    shard_size=batch_size * max(1, 256 // batch_size), max_new_tokens=args.max_new_tokens)

    variants = {"naive": lambda: naive_loop(loaded, samples, args.max_new_tokens), "batch_1": lambda: run_extract(1)}
    variants.update({f"batch_{b}": (lambda b=b: run_extract(b)) for b in batch_sizes})
    naive_loop(loaded, samples[:4], args.max_new_tokens)  # warm-up
    run_extract(min(4, n))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    qps = {name: statistics.median(n / s for s in values) for name, values in seconds.items()}
    ratio = {name: statistics.median(seconds["naive"][r] / values[r] for r in range(rounds)) for name, values in seconds.items()}
    best = max((name for name in variants if name.startswith("batch_") and name != "batch_1"), key=lambda k: ratio[k])
    print(json.dumps({
        "model": source, "n_layers": loaded.n_layers, "hidden_size": loaded.hidden_size, "questions": n,
        "rounds": rounds, "max_new_tokens": args.max_new_tokens, "threads": 1,
        "questions_per_second": {k: round(v, 2) for k, v in qps.items()},
        "ratio_over_naive": {k: round(v, 3) for k, v in ratio.items()},
        "best_batch": best, "best_over_naive": round(ratio[best], 3), "batch_1_over_naive": round(ratio["batch_1"], 3),
        "targets": {"batch_1_over_naive": ">= 1.0", "best_over_naive": ">= 3.0"},
    }, indent=1))


if __name__ == "__main__":
    main()
