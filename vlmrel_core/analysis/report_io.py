"""Writing a built `Report`: CSV + Markdown tables, report.md and report.json, and the selected probes.

Why apart from `report`: building is the science (seeded, held-out numbers), writing is presentation; the dashboard
and typed loaders read these files, so their names, columns and JSON keys only ever grow.

Files: table7.{csv,md}, gains.{csv,md}, transfer.{csv,md}, layer_signals.{csv,md}, sweep.{csv,md} (columns in
`sweep`'s docstring, plus run and grouping), report.md, report.json (keys settings, runs, headline, notes) and
probes/<run>/ (the CV-selected image-split probe of each run, for the gate).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from vlmrel_core.analysis.metrics import Estimate
from vlmrel_core.analysis.report import Report
from vlmrel_core.analysis.tables import format_estimate, markdown_table, row_estimate, sweep_display
from vlmrel_core.io import atomic_write_text, json_default


_NOTES = [
    "Every number is held-out: probes and controls are fitted on the training rows of a grouped split (C by grouped "
    "cross-validation inside the training rows) and all signals are scored on the same test rows.",
    "Orientation: every signal is oriented so that higher = more likely correct before AUROC is taken. 'negated' "
    "marks signals whose raw value is lower when the answer is correct (entropies, cluster count C_k, ΔH_s); the "
    "orientation is fixed in advance, never chosen from the data.",
    "CIs: AUROC and R_pb use a 95% percentile bootstrap over test rows. Gains are paired bootstraps, over rows and "
    "over whole groups (images, or asked objects on the held-out-items split); a verdict or claim needs both "
    "intervals to exclude 0 (with few groups the group bootstrap is too narrow, with clustered errors the row one is).",
    "Calibration (temperature, isotonic) is monotone and leaves AUROC unchanged; no calibrated score is listed as a "
    "signal or a gain.",
    "For yes/no answers max_answer_prob and yes_no_margin rank identically (same AUROC); top1_top2_margin is the "
    "margin with different information.",
    "Forward passes are per question: the probe, output, attention and logit-lens signals all come from the one "
    "prefill + greedy decode pass (0 extra); self-consistency costs K generations; no-model features need none.",
    "The logit-lens truth margin is signed by the ground-truth label: it describes where correct and wrong answers "
    "separate, and is not a signal available at run time.",
]


def _table7_markdown(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "signal": frame["signal"],
        "kind": frame["kind"],
        "orientation": frame["orientation"],
        "AUROC [95% CI]": [format_estimate(row_estimate(r, "auroc")) for _, r in frame.iterrows()],
        "R_pb [95% CI]": [format_estimate(row_estimate(r, "r_pb"), signed=True) for _, r in frame.iterrows()],
        "forward passes": frame["cost"],
        "n_test": frame["n_test"],
        "note": frame["note"],
    })


def _gains_markdown(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "grouping": frame["grouping"],
        "comparison": frame["comparison"],
        "AUROC gain": frame["gain"].map(lambda v: f"{v:+.3f}"),
        "95% CI (rows)": [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(frame["row_ci_low"], frame["row_ci_high"])],
        "95% CI (groups)": [f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in zip(frame["group_ci_low"], frame["group_ci_high"])],
        "verdict (both CIs)": frame["verdict"],
    })


def _transfer_markdown(frame: pd.DataFrame) -> pd.DataFrame:
    def est(row: pd.Series, prefix: str, value: str, signed: bool = False) -> str:
        return format_estimate(Estimate(row[value], row[f"{prefix}_low"], row[f"{prefix}_high"]), signed=signed)

    return pd.DataFrame({
        "kind": frame["kind"],
        "source → target": frame["source"] + " → " + frame["target"],
        "probe": frame["pooling"] + " L" + frame["layer"].astype(str),
        "in-domain AUROC": [est(r, "in_domain", "in_domain_auroc") for _, r in frame.iterrows()],
        "transfer AUROC": [est(r, "transfer", "transfer_auroc") for _, r in frame.iterrows()],
        "transfer − in-domain": [est(r, "difference", "difference", signed=True) for _, r in frame.iterrows()],
        "n train (source / target)": frame["n_train_source"].astype(str) + " / " + frame["n_train_target"].astype(str),
        "n test": frame["n_test"],
    })


_LAYER_COLUMN_ORDER = ("−attention entropy", "−H_s", "−C_k", "−ΔH_s", "lens |yes/no log-odds|", "lens truth margin")


def _layer_markdown(frame: pd.DataFrame) -> str:
    """Wide per-layer tables (one per run): rows = layer, columns = signal, cells = AUROC [CI]."""
    parts = []
    for run, part in frame.groupby("run", sort=False):
        cells = part.assign(value=[format_estimate(row_estimate(r, "auroc")) for _, r in part.iterrows()])
        wide = cells.pivot_table(index="layer", columns="signal", values="value", aggfunc="first", sort=False)
        order = [c for c in _LAYER_COLUMN_ORDER if c in wide.columns]
        wide = wide[order + [c for c in wide.columns if c not in order]].reset_index().fillna("")
        parts.append(f"### {run} ({part['grouping'].iloc[0]}-grouped test rows)\n\n{markdown_table(wide)}")
    return "\n\n".join(parts)


def write_report(report: Report, out_dir: str | Path, save_probes: bool = True) -> list[Path]:
    """Write CSV + Markdown tables, report.md (everything, with claims and notes) and report.json.

    Files: table7.{csv,md}, gains.{csv,md}, transfer.{csv,md}, layer_signals.{csv,md}, sweep.{csv,md}, report.md,
    report.json and, with ``save_probes``, probes/<run>/ (the CV-selected image-split probe of each run, for the gate).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, text: str) -> None:
        atomic_write_text(out / name, text)
        written.append(out / name)

    def write_csv(name: str, frame: pd.DataFrame) -> None:
        write(name, frame.to_csv(index=False))

    table7 = report.table7
    write_csv("table7.csv", table7)
    table_sections = []
    for (run, grouping), part in table7.groupby(["run", "grouping"], sort=False):
        table_sections.append(f"### {run}, held-out {'images' if grouping == 'image' else 'items'} "
                              f"({grouping}-grouped split)\n\n{markdown_table(_table7_markdown(part))}")
    table7_md = "\n\n".join(table_sections)
    write("table7.md", "# Table 7: reliability signals and confound controls\n\n" + table7_md + "\n")

    gains = report.gains
    write_csv("gains.csv", gains)
    gain_sections = [f"### {run}\n\n{markdown_table(_gains_markdown(part))}" for run, part in gains.groupby("run", sort=False)]
    gains_md = "\n\n".join(gain_sections)
    write("gains.md", "# Paired AUROC gains\n\n" + gains_md + "\n")

    transfer_md = "No transfer comparisons (needs image ids, or several runs of one model)."
    write_csv("transfer.csv", report.transfer)
    if not report.transfer.empty:
        transfer_md = markdown_table(_transfer_markdown(report.transfer))
    write("transfer.md", "# Transfer: in-domain vs transferred probe on the same target test rows\n\n" + transfer_md + "\n")

    layers = report.layer_signals
    write_csv("layer_signals.csv", layers)
    layers_md = _layer_markdown(layers) if not layers.empty else "No per-layer signals."
    write("layer_signals.md", "# Per-layer signals (AUROC [95% CI], oriented)\n\n" + layers_md + "\n")

    sweeps = report.sweeps
    write_csv("sweep.csv", sweeps)
    sweep_sections = []
    for (run, grouping), part in sweeps.groupby(["run", "grouping"], sort=False):
        shown = sweep_display(part, cv_selected=True)
        sweep_sections.append(f"### {run}, {grouping}-grouped\n\n{markdown_table(shown)}")
    sweep_md = "\n\n".join(sweep_sections)
    write("sweep.md", "# Layer sweep\n\nPlateau: layers whose held-out AUROC 95% CI upper bound reaches the best "
                      "layer's point estimate.\n\n" + sweep_md + "\n")

    headline = report.headline()
    lines = ["# Where reliability lives: report", ""]
    lines += ["## Runs", ""]
    lines += [f"- {r.name}: {r.n} questions, accuracy {r.accuracy:.3f}, model {r.manifest['model_source']} "
              f"(fingerprint {r.manifest['model_fingerprint'][:12]}, {r.manifest['fusion']} fusion), "
              f"answer tokens {json.dumps(r.manifest['answer_tokens'])}" for r in report.runs]
    lines += ["", "## Does the hidden state know more than the output?", ""]
    lines += [f"- {c.sentence}" for c in report.claims]
    lines += ["", "## Headline (held-out AUROC [95% CI])", "", markdown_table(headline)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in _NOTES]
    lines += [f"- {n}" for r in report.runs for n in r.notes] + [f"- {n}" for n in report.notes]
    lines += ["", "## Table 7", "", table7_md, "", "## Gains", "", gains_md, "", "## Transfer", "", transfer_md,
              "", "## Per-layer signals", "", layers_md, "", "## Layer sweep", "", sweep_md, ""]
    write("report.md", "\n".join(lines))

    summary = {
        "settings": report.settings,
        "runs": [{"name": r.name, "run_dir": r.run_dir, "n": r.n, "accuracy": r.accuracy, "manifest": r.manifest,
                  "notes": r.notes,
                  "sweep": {g: s.to_dict() for g, s in r.sweeps.items()},
                  "claim": r.claim.to_dict()} for r in report.runs],
        "headline": headline.to_dict(orient="records"),
        "notes": _NOTES + report.notes,
    }
    write("report.json", json.dumps(summary, indent=1, default=json_default))

    if save_probes:
        for r in report.runs:
            sweep = r.sweeps.get("image") or next(iter(r.sweeps.values()))
            selected = sweep.selected()
            target = out / "probes" / r.name.replace("/", "__").replace("#", "_")
            sweep.probes[(selected.pooling, selected.layer)].save(target)
            written.append(target)
    return written
