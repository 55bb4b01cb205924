"""`vlmrel gate`, `vlmrel build-gate`, `vlmrel drift`: the production gate from the command line.

Parsing and printing only; the work is in `vlmrel_core.gate` (`bundle.load_gate`, `batch.gate_dataset`,
`fit.build_gate_from_run`, `drift_runs.drift_between_runs`). Wired into `vlmrel` by `register(subparsers)`.
Progress bars go to stderr, so stdout stays one JSON document.

    vlmrel build-gate RUN_DIR --out DIR [--risk-target 0.1 --delta 0.1 | --threshold 0.7]
    vlmrel gate --config DIR/gate.yaml --image IMG --question "is there a red circle?"
    vlmrel gate --config DIR/gate.yaml --data questions.jsonl --out decisions.jsonl
    vlmrel drift --config DIR/gate.yaml --reference RUN_DIR --current RUN_DIR [--recalibrate]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vlmrel_core.io import json_default
from vlmrel_core.cli.progress_bar import command_progress

DEFAULT_RISK_TARGET = 0.1
EXIT_DRIFT_ALERT = 3


def _json(value: Any) -> str:
    return json.dumps(value, indent=1, default=json_default)


# --------------------------------------------------------------------------------------------------- gate


def _cmd_gate(args: argparse.Namespace) -> int:
    import torch

    from vlmrel_core.data.loader import load_vqa_jsonl
    from vlmrel_core.gate.batch import gate_dataset, write_decisions_jsonl
    from vlmrel_core.gate.bundle import load_gate, resolve_gate_config
    from vlmrel_core.validation.images import load_image
    from vlmrel_core.validation.questions import validate_question

    if args.threads:
        torch.set_num_threads(args.threads)
    single = args.image is not None or args.question is not None
    if single == (args.data is not None):
        raise ValueError("give either --image and --question (one decision) or --data JSONL --out OUT (batch mode)")
    if single and (args.image is None or args.question is None):
        raise ValueError("single mode needs both --image and --question")
    if not single and args.out is None:
        raise ValueError("batch mode needs --out OUT.jsonl")
    config = resolve_gate_config(args.config)
    # every input is validated before the model is loaded: bad input costs milliseconds, not a model load
    if single:
        question = validate_question(args.question)
        validated = load_image(args.image)
        for note in validated.notes:
            print(f"vlmrel gate: note: {note}", file=sys.stderr)
    else:
        requests = load_vqa_jsonl(args.data, args.image_root, require_label=False,
                                  allow_external_paths=args.allow_external_paths)
    if not single and args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from vlmrel_core.engine.parallel import argv_without_num_processes, launch_ranks

        return launch_ranks(argv_without_num_processes(args.argv), args.num_processes)
    if args.device and config.monitor.model is not None:
        config.monitor.model.device = args.device
    gate = load_gate(config)
    if single:
        print(_json(gate.answer(validated.image, question).to_dict()))
        return 0
    if args.limit is not None:
        requests = requests[: args.limit]
    from vlmrel_core.engine.parallel import from_environment

    parallel = from_environment()  # set by `accelerate launch`, torchrun or --num-processes
    if parallel is not None:
        from vlmrel_core.gate.batch import gate_dataset_parallel

        with command_progress(f"gate rank {parallel.rank}/{parallel.world_size}", unit="q") as progress:
            merged = gate_dataset_parallel(gate, requests, args.out, parallel, batch_size=args.batch_size,
                                           progress=progress)
        if merged is not None:  # rank 0 merged the ranks' decisions and reports them
            print(_json({"out": str(args.out), "num_processes": parallel.world_size, **merged.summary()}))
        return 0
    with command_progress("gate", unit="q") as progress:
        result = gate_dataset(gate, requests, batch_size=args.batch_size, progress=progress)
    out = write_decisions_jsonl(result, args.out)
    print(_json({"out": str(out), **result.summary()}))
    return 0


# --------------------------------------------------------------------------------------------------- build-gate


def _parse_gray_zone(text: str) -> Any:
    if text == "auto":
        return "auto"
    if text == "none":
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError as err:
        raise ValueError(f"--gray-zone takes 'auto', 'none' or LOW,HIGH (e.g. 0.65,0.8), got {text!r}") from err
    return (low, high)


def _cmd_build_gate(args: argparse.Namespace) -> int:
    from vlmrel_core.analysis.splits import SplitSpec
    from vlmrel_core.gate.fit import build_gate_from_run

    risk_target = args.risk_target
    if risk_target is None and args.threshold is None:
        risk_target = DEFAULT_RISK_TARGET
    with command_progress("build-gate", unit="step") as progress:
        build = build_gate_from_run(
            args.run_dir, args.out, layer=args.layer, pooling=args.pooling, threshold=args.threshold,
            risk_target=risk_target, delta=args.delta, calibration_method=args.calibration_method,
            gray_zone=_parse_gray_zone(args.gray_zone), gray_zone_halfwidth=args.gray_zone_halfwidth,
            gray_zone_action=args.gray_zone_action, fallback_strategy=args.fallback_strategy, model_path=args.model,
            split=SplitSpec("image", args.test_fraction, args.calibration_fraction, args.seed), seed=args.seed,
            novelty_method=args.novelty_method, novelty_shifted_runs=args.novelty_shifted_run,
            image_statistics=args.image_statistics, image_root=args.image_root, progress=progress,
        )
    report = build.report
    summary = {
        "bundle": str(Path(args.out) / "gate.yaml"),
        "layer": report["layer"],
        "pooling": report["pooling"],
        "calibration_method": report["calibration_method"],
        "ece_before": report["ece_before"],
        "ece_after": report["ece_after"],
        "test_auroc": report["test_auroc"],
        "threshold": report["threshold"],
        "threshold_source": report["threshold_source"],
        "risk_certificate": report["risk_certificate"],
        "test": report["test"],
        "gray_zone": report["gray_zone"],
        "gray_zone_share_test": report["gray_zone_share_test"],
        "expected_cost_multiplier": report["expected_cost_multiplier"],
        "calibration_summary": report["calibration_summary"],
    }
    print(_json(summary))
    return 0


# --------------------------------------------------------------------------------------------------- drift


def _cmd_drift(args: argparse.Namespace) -> int:
    from vlmrel_core.gate.bundle import load_gate_components, write_recalibrated_bundle
    from vlmrel_core.gate.drift_runs import drift_between_runs

    components = load_gate_components(args.config)
    with command_progress("drift", unit="step") as progress:
        result = drift_between_runs(components, args.reference, args.current, recalibrate_on_alert=args.recalibrate,
                                    seed=args.seed, progress=progress)
    recal = result.get("recalibration")
    if args.write_calibration:
        if recal and recal.get("done"):
            result["written_calibration"] = str(write_recalibrated_bundle(components, recal["calibrator"], args.write_calibration))
        else:
            result["written_calibration"] = None
    print(_json(result))
    return EXIT_DRIFT_ALERT if (args.fail_on_alert and result["alert"]) else 0


def _cmd_shift_report(args: argparse.Namespace) -> int:
    from vlmrel_core.gate.shift_report import shift_report, write_shift_report
    from vlmrel_core.cli.progress_bar import command_progress

    shifts = {}
    for item in args.shift:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--shift expects NAME=RUN_DIR, got {item!r}")
        shifts[name] = path
    with command_progress("shift report") as progress:
        result = shift_report(args.config, args.training_run, args.in_domain, shifts, n_windows=args.windows,
                              n_shift_windows=args.shift_windows, alpha=args.alpha, seed=args.seed,
                              novelty_source=args.novelty_source, progress=progress)
    json_path, md_path = write_shift_report({args.name: result}, args.out)
    print(_json({"json": str(json_path), "markdown": str(md_path), "goals": result["goals"]}))
    return 0


# --------------------------------------------------------------------------------------------------- wiring


def register(subparsers: Any) -> None:
    """Add `gate`, `build-gate`, `shift-report` and `drift` to the `vlmrel` subcommands."""
    from vlmrel_core.cli.args import bounded_int

    p = subparsers.add_parser(
        "gate", help="answer with a calibrated confidence and a route (one image, or a JSONL batch)",
        description="Run the reliability gate of a bundle: the answer, its calibrated confidence, the action "
                    "(generate / fallback / self_consistency in the gray zone) and the evidence, as JSON.",
    )
    p.add_argument("--config", required=True, help="gate YAML (a bundle's gate.yaml)")
    p.add_argument("--image", default=None, help="image file (single mode)")
    p.add_argument("--question", default=None, help="question text (single mode)")
    p.add_argument("--data", default=None, help="JSONL with image + text/question (+ optional label): batch mode")
    p.add_argument("--image-root", default=None, help="folder the JSONL's image paths are relative to (default: its folder)")
    p.add_argument("--out", default=None, help="decisions JSONL (batch mode)")
    p.add_argument("--batch-size", type=bounded_int(1, 1024), default=8)
    p.add_argument("--limit", type=bounded_int(1), default=None, help="only the first N rows (batch mode)")
    p.add_argument("--num-processes", type=bounded_int(1, 256), default=1, metavar="N",
                   help="batch mode, data-parallel: N processes on this machine each route a block of whole drift "
                        "windows and rank 0 merges the decisions in order (as `accelerate launch`)")
    p.add_argument("--allow-external-paths", action="store_true",
                   help="let the JSONL's image paths leave the image root (absolute paths, ../)")
    p.add_argument("--device", default=None, help="override the config's model device (cpu, cuda, ...)")
    p.add_argument("--threads", type=bounded_int(0, 1024), default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_cmd_gate)

    p = subparsers.add_parser(
        "build-gate", help="fit probe, calibrators and a (risk-certified) threshold on a run; write a gate bundle",
        description="Image-grouped train / calibration / test split of a cached run: probe on train, temperature "
                    "scaling and isotonic (probe and every output signal) and the threshold on calibration, ECE "
                    "before/after, coverage and realised risk on test. Default: --risk-target 0.1 --delta 0.1.",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="bundle directory (gate.yaml, probe/, calibration.json, report.json)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--risk-target", type=float, default=None,
                        help=f"max share of wrong answers among those kept (default {DEFAULT_RISK_TARGET} if no --threshold)")
    target.add_argument("--threshold", type=float, default=None, help="plain calibrated-confidence threshold")
    p.add_argument("--delta", type=float, default=0.1, help="the risk guarantee holds with probability >= 1 - delta")
    p.add_argument("--layer", type=int, default=None, help="probe layer (default: chosen by training-split grouped CV)")
    p.add_argument("--pooling", default="last_token")
    p.add_argument("--calibration-method", choices=["temperature_scaling", "isotonic"], default="temperature_scaling")
    p.add_argument("--gray-zone", default="auto", help="'auto' (threshold ± halfwidth), 'none' or LOW,HIGH")
    p.add_argument("--gray-zone-halfwidth", type=float, default=0.075)
    p.add_argument("--gray-zone-action", default="self_consistency_k5", help="self_consistency_k<K>, fallback or none")
    p.add_argument("--fallback-strategy", default="human_review")
    p.add_argument("--model", default=None, help="model path to write into the config (default: the run's model_source)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--calibration-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--novelty-method", choices=["knn", "mahalanobis", "auto"], default="knn",
                   help="novelty score; 'auto' picks by held-out AUROC against --novelty-shifted-run")
    p.add_argument("--image-statistics", action=argparse.BooleanOptionalAction, default=None,
                   help="also score each input's image statistics for novelty (default: when the run's rows name "
                        "their images)")
    p.add_argument("--image-root", default=None, help="folder the run's image paths are relative to (default: the "
                                                      "dataset JSONL's folder)")
    p.add_argument("--novelty-shifted-run", action="append", default=[], metavar="RUN_DIR",
                   help="an extraction of shifted data from the same model (repeatable; needed by 'auto')")
    p.set_defaults(func=_cmd_build_gate)

    p = subparsers.add_parser(
        "shift-report", help="certified risk, novelty routing and window-drift alarm rates per shifted run",
        description="For each shifted run: accuracy, the certified rule's realised risk and coverage, the novelty-"
                    "routed share, window alarm rates at 50/100/200, and in-domain false alarms / false rejects.",
    )
    p.add_argument("--config", required=True, help="gate YAML (a bundle's gate.yaml with a risk certificate)")
    p.add_argument("--training-run", required=True, help="the run the gate was built from")
    p.add_argument("--in-domain", nargs="*", default=[], help="extra held-out in-domain runs")
    p.add_argument("--shift", action="append", default=[], required=True, help="NAME=RUN_DIR (repeatable)")
    p.add_argument("--out", required=True, help="folder for shift_report.json + shift_report.md")
    p.add_argument("--name", default="model", help="section name in the report")
    p.add_argument("--windows", type=bounded_int(1, 10_000), default=50, help="in-domain windows per size")
    p.add_argument("--shift-windows", type=bounded_int(1, 10_000), default=10, help="windows per size per shift")
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--novelty-source", choices=["bundle", "best_on_shifts"], default="bundle",
                   help="bundle: the gate's own novelty statistics; best_on_shifts: refit the best candidate on these shifts")
    p.set_defaults(func=_cmd_shift_report)

    p = subparsers.add_parser(
        "drift", help="KL + KS on calibrated confidences and embedding shift: current run vs reference run",
        description="Compare the gate's calibrated confidences (histogram KL, two-sample KS) and the mean probe-layer "
                    "embedding (cosine distance) of a current run against a reference run; alert against the "
                    "config's monitoring thresholds; on an alert, refit the calibrator on labelled current data.",
    )
    p.add_argument("--config", required=True, help="gate YAML (a bundle's gate.yaml)")
    p.add_argument("--reference", required=True, help="extraction run of in-domain data")
    p.add_argument("--current", required=True, help="extraction run to check")
    p.add_argument("--recalibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the calibrator on the current run's labels when drift alerts (default: retrain_trigger == auto)")
    p.add_argument("--write-calibration", default=None, help="write the recalibrated calibration JSON here")
    p.add_argument("--fail-on-alert", action="store_true", help=f"exit with status {EXIT_DRIFT_ALERT} when drift alerts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_drift)
