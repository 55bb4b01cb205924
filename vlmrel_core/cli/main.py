"""`vlmrel` command line: parse arguments, call the library, print. No analysis lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from vlmrel_core.samples.catalog import FAMILIES, SampleCatalog, cli_path
from vlmrel_core.cli.args import bounded_int

_SAMPLES = SampleCatalog.locate(check=False)  # defaults only; a missing file is reported by the command using it
DEFAULT_LATE = cli_path(_SAMPLES.model_dir("late_fusion", check=False))
DEFAULT_EARLY = cli_path(_SAMPLES.model_dir("early_fusion", check=False))


def _parse_layers(text: str | None) -> list[int] | None:
    if text in (None, "", "all"):
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers takes 'all' or comma-separated integers, got {text!r}") from err


def _cmd_extract(args: argparse.Namespace) -> int:
    from vlmrel_core.validation.files import check_dataset, require_out_dir
    from vlmrel_core.engine.loading import resolve_model_source
    from vlmrel_core.engine.store import ensure_run_dir_free

    # every input is checked before the model loads: a typo costs milliseconds, not a model load
    if args.shard_size < args.batch_size or args.shard_size % args.batch_size:
        raise ValueError(f"--shard-size ({args.shard_size}) must be a multiple of --batch-size ({args.batch_size})")
    # the dataset (rows, labels, image headers, paths) is checked before the model is loaded and anything written
    check_dataset(args.data, args.image_root, allow_external_paths=args.allow_external_paths)
    require_out_dir(args.out)
    ensure_run_dir_free(args.out)
    resolve_model_source(args.model)
    if args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from vlmrel_core.engine.parallel import argv_without_num_processes, launch_ranks

        return launch_ranks(argv_without_num_processes(args.argv), args.num_processes)

    import torch

    from vlmrel_core.engine.extract import extract
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.cli.progress_bar import command_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_vlm(args.model, device=args.device, dtype=args.dtype,
                      attn_implementation="eager" if args.attentions else args.attn_implementation,
                      device_map=args.device_map)
    from vlmrel_core.engine.parallel import from_environment

    parallel = from_environment()  # set by `accelerate launch`, torchrun or --num-processes
    desc = f"extract {Path(args.data).name}" + (f" rank {parallel.rank}/{parallel.world_size}" if parallel else "")
    try:
        with command_progress(desc, unit="q") as progress:
            run_dir = extract(
                loaded, args.data, args.out, image_root=args.image_root, layers=_parse_layers(args.layers),
                poolings=args.poolings.split(","), attentions=args.attentions, batch_size=args.batch_size,
                shard_size=args.shard_size, max_new_tokens=args.max_new_tokens, normalization=args.normalization,
                limit=args.limit, progress=progress, self_consistency_k=args.self_consistency, parallel=parallel,
                allow_external_paths=args.allow_external_paths, share_image_prefix=args.share_image_prefix,
            )
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept in {args.out}; run the same command again to resume", file=sys.stderr)
        return 130
    if parallel is not None and parallel.rank != 0:
        return 0  # rank 0 merged the run and reports it
    from vlmrel_core.engine.store import RunReader

    rows = RunReader(run_dir).rows
    print(json.dumps({"run_dir": str(run_dir), "n": len(rows), "accuracy": round(float(rows["correct"].mean()), 4)}))
    return 0


def _cmd_generate_data(args: argparse.Namespace) -> int:
    from vlmrel_core.data.shapes import write_split
    from vlmrel_core.validation.files import require_out_dir

    from vlmrel_core.cli.progress_bar import command_progress

    require_out_dir(args.out)
    splits = args.splits.split(",")
    with command_progress("generate-data", unit="split") as progress:  # 500 images per split take seconds each
        for index, split in enumerate(splits):
            progress(index, len(splits), split)
            path = write_split(args.out, split, args.n_images, first_image_id=args.first_image_id,
                               question_types=tuple(args.question_types.split(",")), file_name=args.file_name)
            progress(index + 1, len(splits), split)
            print(path)
    return 0


def _cmd_train_demo_models(args: argparse.Namespace) -> int:
    import time

    from vlmrel_core.collector import settle_startup_heap
    from vlmrel_core.demo_models.pipeline import train_demo_models

    settle_startup_heap()  # no progress bar of its own (the training processes log), so start-up ends here
    started = time.time()
    results = train_demo_models(args.out, families=args.families.split(","), steps=args.steps, parallel=not args.sequential)
    for result in results:
        print(f"{result['family']}: trained in {result['train_seconds'] / 60:.1f} min "
              f"({result['wall_seconds'] / 60:.1f} min with data preparation)")
    print(f"all families: {(time.time() - started) / 60:.1f} min wall clock -> {args.out}")
    return 0


def _cmd_evaluate_demo_models(args: argparse.Namespace) -> int:
    from vlmrel_core.demo_models.pipeline import write_model_card
    from vlmrel_core.validation.files import require_dir
    from vlmrel_core.engine.loading import resolve_model_source

    require_dir(args.data, "dataset folder")
    if not any(Path(args.data).glob("*.jsonl")):
        raise ValueError(f"dataset folder {args.data} holds no .jsonl files")
    for family in args.families.split(","):
        resolve_model_source(Path(args.models) / family)
    from vlmrel_core.cli.progress_bar import command_progress

    for family in args.families.split(","):
        with command_progress(f"evaluate {family}", unit="q") as progress:
            card = write_model_card(Path(args.models) / family, args.data, progress=progress)
        print(json.dumps(card["accuracy"]))
    return 0


def _cmd_refresh_sample_data(args: argparse.Namespace) -> int:
    from vlmrel_core.cli.progress_bar import command_progress
    from vlmrel_core.samples.refresh import check_sample_root, refresh_sample_data

    families = args.families.split(",")
    check_sample_root(args.root, families)
    if args.only == "gates":
        from vlmrel_core.samples.refresh import refresh_gates

        with command_progress("refresh gate bundles", unit="step") as progress:
            refresh_gates(args.root, families=families, threads=args.threads, progress=progress,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
        return 0
    with command_progress("refresh-sample-data", unit="step") as progress:
        refresh_sample_data(args.root, families=families, self_consistency_k=args.self_consistency_k,
                            parallel=not args.sequential, threads=args.threads, progress=progress,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from vlmrel_core.validation.files import require_run_dir
    from vlmrel_core.engine.store import RunReader

    reader = RunReader(require_run_dir(args.run_dir))
    rows = reader.rows
    summary = reader.manifest.model_dump(exclude={"shards", "answer_tokens"})
    summary["n_rows"] = len(rows)
    summary["accuracy"] = round(float(rows["correct"].mean()), 4)
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmrel", description="Where reliability lives inside a VLM.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="cache every layer's pooled states, answers and output signals for a dataset")
    p.add_argument("--model", default=DEFAULT_LATE, help="local model directory or HF id in the local cache")
    p.add_argument("--data", required=True, help="POPE/VQA JSONL (question_id, image, text, label)")
    p.add_argument("--image-root", default=None, help="folder the JSONL's image paths are relative to (default: its folder)")
    p.add_argument("--out", required=True, help="run directory (resumed if it holds the same extraction)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated decoder-layer indices (negative allowed)")
    p.add_argument("--poolings", default="last_token,mean_all,mean_image,mean_text")
    p.add_argument("--attentions", action=argparse.BooleanOptionalAction, default=True,
                   help="capture answer-position attention over image tokens (forces eager attention)")
    p.add_argument("--attn-implementation", default="sdpa", help="used when --no-attentions (eager is forced otherwise)")
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=16)
    p.add_argument("--shard-size", type=bounded_int(1, 1_000_000), default=256)
    p.add_argument("--max-new-tokens", type=bounded_int(1, 512), default=8)
    p.add_argument("--normalization", choices=["lenient", "strict"], default="lenient")
    p.add_argument("--limit", type=bounded_int(1), default=None, help="only the first N rows")
    p.add_argument("--allow-external-paths", action="store_true",
                   help="let the JSONL's image paths leave the image root (absolute paths, ../)")
    p.add_argument("--self-consistency", type=bounded_int(0, 64), default=0, metavar="K",
                   help="also sample K answers per question (T=0.7, top-p 0.9) and store their agreement (K x cost)")
    p.add_argument("--share-image-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="questions about one image reuse its prompt prefix's pass (LLaVA family; equal to float "
                        "tolerance); --no-share-image-prefix runs every question in full")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device-map", default=None, help="e.g. 'auto' to shard a large model with accelerate")
    p.add_argument("--threads", type=bounded_int(0, 1024), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--num-processes", type=bounded_int(1, 256), default=1, metavar="N",
                   help="data-parallel: N processes on this machine split the dataset and write one run "
                        "(the same as `accelerate launch --num_processes N -m vlmrel_core.cli.main extract ...`)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("generate-data", help="write the synthetic POPE-like splits (JSONL + PNGs)")
    p.add_argument("--out", default=cli_path(_SAMPLES.pope_dir(check=False)))
    p.add_argument("--splits", default="random,popular,adversarial")
    p.add_argument("--n-images", type=int, default=500)
    p.add_argument("--first-image-id", type=int, default=0)
    p.add_argument("--question-types", default="existence", help="comma-separated: existence, attribute, count")
    p.add_argument("--file-name", default=None, help="JSONL name (default: <split>.jsonl)")
    p.set_defaults(func=_cmd_generate_data)

    p = sub.add_parser("train-demo-models", help="reproduce the embedded late- and early-fusion VLMs from a seed")
    p.add_argument("--out", default=cli_path(_SAMPLES.models_root(check=False)))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--steps", type=int, default=None, help="override the training step count (default: the shipped schedule)")
    p.add_argument("--sequential", action="store_true", help="train one after the other instead of one process per core")
    p.set_defaults(func=_cmd_train_demo_models)

    p = sub.add_parser("evaluate-demo-models", help="measure per-split accuracy and write each model card")
    p.add_argument("--models", default=cli_path(_SAMPLES.models_root(check=False)))
    p.add_argument("--data", default=cli_path(_SAMPLES.pope_dir(check=False)))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.set_defaults(func=_cmd_evaluate_demo_models)

    p = sub.add_parser("refresh-sample-data", help="regenerate the shipped caches, reports and gate bundles from the embedded models")
    p.add_argument("--root", default=cli_path(_SAMPLES.root))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--self-consistency-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--sequential", action="store_true", help="one family after the other instead of one process per family")
    p.add_argument("--only", choices=["gates"], default=None,
                   help="gates: rebuild only the gate bundles, drift.json and live_run.json from the shipped runs")
    p.set_defaults(func=_cmd_refresh_sample_data)

    p = sub.add_parser("info", help="summarise an extraction run")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_info)

    from vlmrel_core.cli.analysis import register as register_analysis
    from vlmrel_core.cli.gate import register as register_gate
    from vlmrel_core.cli.interventions import register as register_interventions

    register_analysis(sub)
    register_interventions(sub)
    register_gate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from vlmrel_core.engine.adapters.base import AdapterError
    from vlmrel_core.data.loader import DatasetError
    from vlmrel_core.engine.loading import ModelLoadError
    from vlmrel_core.engine.store import CacheError

    try:
        return int(args.func(args) or 0)
    except (AdapterError, DatasetError, ModelLoadError, CacheError, ValueError) as err:
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"vlmrel {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # a bug, not bad input: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"vlmrel {args.command}: internal error: {type(err).__name__}: {str(err)[:300]} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def cli(argv: Sequence[str] | None = None) -> int:
    """The `vlmrel` process entry point (console script, ``python -m vlmrel_core.cli.main``, `accelerate launch`):
    `main` with the process-wide memory settings around it: malloc keeps freed memory for reuse
    (`vlmrel_core.allocator`) and the garbage collector defers full collections during start-up and skips the one
    at exit (`vlmrel_core.collector`; ~1.7 s of the README `ablate`). In-process callers use `main`, which leaves
    both alone."""
    from vlmrel_core.allocator import keep_freed_memory
    from vlmrel_core.collector import defer_full_collections, skip_exit_collection

    keep_freed_memory()  # forward passes reuse freed memory instead of page-faulting it back
    defer_full_collections()
    try:
        return main(argv)
    finally:
        skip_exit_collection()


if __name__ == "__main__":
    sys.exit(cli())
