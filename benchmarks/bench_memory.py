"""Peak memory of an extraction does not grow with the dataset: 300 vs 10,000 questions, each in its own process.

The store writes one shard at a time, so nothing should accumulate rows or tensors across shards. Each size runs
in a fresh subprocess that reports its own peak RSS (`ru_maxrss`) and its RSS right after the model loaded; the
parent prints both and the ratio (target: the larger run's peak within 10% of the smaller's).

To fit about two minutes on a 2-core CPU by default, the 10,000 questions are the shipped adversarial questions
cycled with fresh ids over the shipped images (generated data), extracted with --no-attentions (SDPA), one new
token, every layer and all four poolings, batch 64, shards of 256 rows. `--attentions --max-new-tokens 8` runs the
default extraction settings instead (several minutes). Each child fixes malloc's thresholds as the `vlmrel` CLI does
(`vlmrel_core.allocator`: freed memory stays for reuse); `--malloc default` keeps glibc's adaptive defaults.

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --sizes 300,2000     # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _write_questions(path: Path, n: int, source: Path) -> Path:
    """n POPE rows cycling the source questions with fresh ids (images stay the shipped ones)."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with path.open("w") as handle:
        for i in range(n):
            row = dict(rows[i % len(rows)])
            row["question_id"] = f"mem-{i}"
            handle.write(json.dumps(row) + "\n")
    return path


def _child(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    from vlmrel_core.allocator import keep_freed_memory
    from vlmrel_core.engine.extract import extract
    from vlmrel_core.engine.loading import load_vlm

    malloc_set = keep_freed_memory() if args.malloc == "cli" else False

    loaded = load_vlm(args.model, attn_implementation="eager" if args.attentions else "sdpa")
    after_load_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory(prefix="vlmrel_mem_") as tmp:
        data = _write_questions(Path(tmp) / "questions.jsonl", args.child, Path(args.data))
        start = time.perf_counter()
        extract(loaded, data, Path(tmp) / "run", image_root=Path(args.data).parent, attentions=args.attentions,
                batch_size=args.batch_size, shard_size=256 if 256 % args.batch_size == 0 else args.batch_size * 4,
                max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"questions": args.child, "malloc_thresholds_set": malloc_set, "peak_rss_mb": round(peak_kb / 1024, 1),
                      "rss_after_model_load_mb": round(after_load_kb / 1024, 1), "seconds": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "sample_data/models/late_fusion"))
    parser.add_argument("--data", default=str(REPO / "sample_data/shapes_pope/adversarial.jsonl"))
    parser.add_argument("--sizes", default="300,10000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--attentions", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--malloc", choices=["cli", "default"], default="cli",
                        help="cli: malloc thresholds fixed as `vlmrel` fixes them; default: glibc's adaptive ones")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args)
        return
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        command = [sys.executable, __file__, "--child", str(size), "--model", args.model, "--data", args.data,
                   "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                   "--attentions" if args.attentions else "--no-attentions", "--malloc", args.malloc]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"extraction of {size} questions failed:\n{done.stderr[-2000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = results[0], results[-1]
    print(json.dumps({
        "settings": {"malloc": args.malloc, "attentions": args.attentions, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                     "shard_size": 256, "data": "shipped adversarial questions cycled with fresh ids"},
        "runs": results,
        "peak_ratio_large_over_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "growth_after_load_mb": {str(r["questions"]): round(r["peak_rss_mb"] - r["rss_after_model_load_mb"], 1) for r in results},
        "target_peak_ratio": "<= 1.10",
    }, indent=1))


if __name__ == "__main__":
    main()
