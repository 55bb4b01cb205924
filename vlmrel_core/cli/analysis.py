"""`vlmrel sweep` and `vlmrel report`: parse arguments, call the analysis library, print a JSON summary.

Wired into the main parser by `vlmrel_core.cli.main` through `register(subparsers)`; no analysis lives here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmrel_core.cli.args import bounded_int
from vlmrel_core.cli.progress_bar import command_progress


def _c_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--c-grid takes comma-separated numbers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("--c-grid values must be positive")
    return values


def _poolings(text: str | None) -> list[str] | None:
    return None if text in (None, "", "all") else text.split(",")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the split, CV folds and bootstrap")
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of groups held out for testing")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per CI")
    p.add_argument("--poolings", default="all", help="'all' or comma-separated poolings the run extracted")
    p.add_argument("--c-grid", type=_c_grid, default=None,
                   help="comma-separated C values for grouped CV (default: the library's grid)")


def _c_grid_or_default(args: argparse.Namespace) -> tuple[float, ...]:
    """The grid given, else the library's (imported here: scikit-learn is not loaded for `vlmrel --help`)."""
    from vlmrel_core.analysis.probes import DEFAULT_C_GRID

    return args.c_grid if args.c_grid is not None else DEFAULT_C_GRID


def cmd_sweep(args: argparse.Namespace) -> int:
    """Per layer × pooling held-out probe AUROC (+CI), best layer, plateau; writes sweep.{csv,json,md}."""
    from vlmrel_core.analysis.splits import SplitSpec
    from vlmrel_core.analysis.sweep import sweep_layers, write_sweep
    from vlmrel_core.engine.store import RunReader

    reader = RunReader(args.run_dir)
    with command_progress("vlmrel sweep", unit="probe") as progress:
        sweep = sweep_layers(reader, _poolings(args.poolings),
                             SplitSpec(args.grouping, args.test_fraction, 0.0, args.seed),
                             seed=args.seed, n_boot=args.n_boot, c_grid=_c_grid_or_default(args), progress=progress)
    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis" / f"sweep-{args.grouping}"
    paths = write_sweep(sweep, out)
    summary = sweep.to_dict()
    print(json.dumps({
        "out": str(out),
        "files": [str(p) for p in paths],
        "best": summary["best"],
        "plateau": summary["plateau"],
        "cv_selected": summary["cv_selected"],
    }, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Table 7 (signals + controls), gains, claims, transfer, per-layer signals; CSV + Markdown + JSON."""
    from vlmrel_core.analysis.report import build_report
    from vlmrel_core.analysis.report_io import write_report

    with command_progress("vlmrel report", unit="step") as progress:
        report = build_report(args.run_dirs, seed=args.seed, n_boot=args.n_boot, test_fraction=args.test_fraction,
                              poolings=_poolings(args.poolings), ensemble_k=args.ensemble_k, c_grid=_c_grid_or_default(args),
                              transfer=not args.no_transfer, n_permutations=args.n_permutations, n_jobs=args.n_jobs,
                              progress=progress)
    paths = write_report(report, args.out, save_probes=not args.no_save_probes)
    from vlmrel_core.figures.html_report import write_html_report

    paths.append(write_html_report(args.out))  # report.html beside report.md: the same results as figures
    print(json.dumps({
        "out": str(args.out),
        "files": [str(p) for p in paths],
        "claims": [c.sentence for c in report.claims],
        "headline": report.headline().to_dict(orient="records"),
    }, indent=1))
    return 0


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the `sweep` and `report` subcommands to vlmrel's parser."""
    p = subparsers.add_parser("sweep", help="held-out probe AUROC per layer and pooling, best layer and plateau")
    p.add_argument("run_dir", help="an extraction run directory (vlmrel extract --out)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis/sweep-<grouping>)")
    p.add_argument("--grouping", choices=["image", "item"], default="image",
                   help="hold out whole images (default) or whole asked objects")
    _add_common(p)
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("report", help="Table 7 for every signal and control, claims, transfer, per-layer signals")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="one or more runs (e.g. one model's random, popular and adversarial caches)")
    p.add_argument("--out", required=True, help="folder for the CSV / Markdown / JSON report")
    p.add_argument("--ensemble-k", type=int, default=5, help="last k layers for the multi-layer probes")
    p.add_argument("--no-transfer", action="store_true", help="skip the transfer table")
    p.add_argument("--n-permutations", type=bounded_int(2, 10_000), default=20,
                   help="shuffled-label probes fitted for the null distribution (the control)")
    p.add_argument("--no-save-probes", action="store_true", help="do not save the selected probes under OUT/probes")
    p.add_argument("--n-jobs", type=int, default=-1,
                   help="worker processes for the probe fits (-1: every core, 1: none); the numbers do not depend on it")
    _add_common(p)
    p.set_defaults(func=cmd_report)
