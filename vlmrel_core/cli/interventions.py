"""`vlmrel ablate`: batch ablation / patch-masking study for one model or two side by side. Parsing and printing
only; the work is `interventions.study.run_ablation_study`
(layers chosen by `interventions.ablation.ablation_layers`).

Wired into `vlmrel` by `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlmrel_core.io import atomic_write_text
from vlmrel_core.samples.catalog import SampleCatalog, cli_path

DEFAULT_LATE = cli_path(SampleCatalog.locate(check=False).model_dir("late_fusion", check=False))


def _cmd_ablate(args: argparse.Namespace) -> int:
    import torch

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.engine.loading import load_vlm
    from vlmrel_core.interventions.ablation import ablation_layers, load_ablation_probe
    from vlmrel_core.interventions.study import run_ablation_study, side_by_side
    from vlmrel_core.cli.progress_bar import command_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.model or [DEFAULT_LATE]
    weight_paths = args.weights
    if len(weight_paths) != len(models):
        raise ValueError(f"give one --weights per --model ({len(models)} models, {len(weight_paths)} weights)")
    samples = load_vqa_jsonl(args.data, args.image_root)
    if args.limit is not None:
        samples = samples[: args.limit]
    masking = args.mask_fraction > 0
    loaded_models: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    for i, (model_path, weight_path) in enumerate(zip(models, weight_paths)):
        loaded = load_vlm(model_path, device=args.device, dtype=args.dtype,
                          attn_implementation="eager" if masking else args.attn_implementation)
        name = Path(model_path).name or str(model_path)
        if name in loaded_models:
            name = f"{name}#{i}"
        loaded_models[name], probes[name] = loaded, load_ablation_probe(weight_path, loaded)
    layers, warnings = ablation_layers(probes, {n: m.n_layers for n, m in loaded_models.items()}, args.layer or [])
    for warning in warnings:
        print(f"vlmrel ablate: warning: {warning}", file=sys.stderr)
    with command_progress("vlmrel ablate", unit="pass") as progress:
        table = run_ablation_study(
            loaded_models, samples, layers, {n: p.weights for n, p in probes.items()}, ks=args.k,
            random_fraction=args.random_fraction or None, modes=args.mode,
            mask_fraction=args.mask_fraction if masking else None, n_random_draws=args.random_draws,
            n_boot=args.n_boot, seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            progress=progress, fast=not args.full_passes,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, table.to_csv(index=False))
    overall = side_by_side(table[table["question_type"] == "all"])
    print(overall.to_string(index=False))
    print(json.dumps({"out": str(out), "n_questions": len(samples), "models": list(loaded_models), "layers": layers}))
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `ablate` to the `vlmrel` subcommands (``subparsers`` from ``parser.add_subparsers``)."""
    p = subparsers.add_parser(
        "ablate",
        help="accuracy change (Δ pp, paired bootstrap CI, per question type) when ablating probe-weighted dims or masking patches",
        description="Zero/mean-ablate the top-k probe-weighted dimensions of a layer, random-k and a random fraction "
                    "of dimensions as controls, and grey the HIGH/LOW/random share of image patches by attention. "
                    "Repeat --model/--weights (and --layer) to put late and early fusion side by side.",
    )
    p.add_argument("--model", action="append", default=None, help=f"model directory or cached HF id (repeatable; default {DEFAULT_LATE})")
    p.add_argument("--data", required=True, help="POPE/VQA JSONL (held-out questions)")
    p.add_argument("--image-root", default=None, help="folder the JSONL's image paths are relative to (default: its folder)")
    p.add_argument("--weights", action="append", required=True,
                   help="probe directory saved by vlmrel (probe.json + probe.safetensors, e.g. REPORT/probes/<run>); one per --model")
    p.add_argument("--layer", action="append", type=int, default=None,
                   help="decoder layer to ablate (0-based, negative from the end); default: the probe's layer")
    p.add_argument("--k", action="append", type=int, default=None, help="top-k dims to ablate (repeatable; default 5)")
    p.add_argument("--mode", action="append", choices=["zero", "mean"], default=None, help="ablation mode (repeatable; default zero)")
    p.add_argument("--random-fraction", type=float, default=0.5, help="also zero this share of random dims (0 to skip)")
    p.add_argument("--random-draws", type=int, default=1, help="seeded draws of the random-k control")
    p.add_argument("--mask-fraction", type=float, default=0.3, help="share of image patches to grey by attention (0 to skip)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--out", required=True, help="CSV path for the tidy table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--attn-implementation", default="sdpa", help="used when --mask-fraction 0 (eager is forced otherwise)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--full-passes", action="store_true",
                   help="run every condition as the full masked generate over all questions (slower; the default "
                        "fast path starts each condition from the unablated pass's kept state and gives the same numbers)")
    p.set_defaults(func=_finish_defaults)


def _finish_defaults(args: argparse.Namespace) -> int:
    # argparse's append extends a non-None default, so list defaults are filled in here instead.
    args.k = args.k or [5]
    args.mode = args.mode or ["zero"]
    if not 0.0 <= args.mask_fraction <= 1.0:
        raise ValueError(f"--mask-fraction must be in [0, 1], got {args.mask_fraction}")
    if not 0.0 <= args.random_fraction <= 1.0:
        raise ValueError(f"--random-fraction must be in [0, 1], got {args.random_fraction}")
    return _cmd_ablate(args)
