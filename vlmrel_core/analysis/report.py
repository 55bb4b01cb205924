"""The comparison report: every signal and control in the paper's Table-7 shape, the claims they support, transfer.

Why one function: the report is the product's scientific claim, so it is built headless from extraction runs with
fixed seeds, every number held-out and every comparison carrying its CI; the dashboard only reads what this writes.

Conventions (stated again in every written report):
* Every signal is oriented so that higher = more likely correct *before* its AUROC is taken; signals where lower
  raw values mean "correct" (entropies, cluster count, ΔH_s) are negated and marked so. Nothing is flipped after
  looking at the data.
* Raw (unfitted) signals are scored on the same held-out rows as the probes and controls, so all rows of one
  table are paired.
* AUROC is invariant to monotone calibration (temperature, isotonic); calibrated scores are never listed as
  separate signals or gains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vlmrel_core.analysis.controls import N_PERMUTATIONS, ControlSuite, Gain, ScoredSignal, evaluate_scores, run_controls
from vlmrel_core.analysis.metrics import Estimate
from vlmrel_core.analysis.probes import DEFAULT_C_GRID, EnsembleResult, LayerSweep, fit_ensembles, sweep_layers
from vlmrel_core.signals.attention import attention_features_batch
from vlmrel_core.analysis.splits import GROUPINGS, SplitError, SplitSpec, make_split
from vlmrel_core.engine.store import CacheError, RunReader
from vlmrel_core.analysis.transfer import TransferResult, transfer_across_runs, transfer_image_ranges

AS_IS = "as is"
#: Below this many held-out items the claim says that its group interval is coarse.
MIN_HELD_OUT_ITEMS = 10
NEGATED = "negated"
FITTED = "fitted P(correct)"


@dataclass(frozen=True)
class RawSignal:
    """A row column used directly as a reliability score, with its fixed orientation and cost."""

    name: str
    column: str
    sign: int
    cost: str
    description: str
    note: str = ""


OUTPUT_SIGNALS: tuple[RawSignal, ...] = (
    RawSignal("max_answer_prob", "max_answer_prob", +1, "1×", "max(p_yes, p_no) / (p_yes + p_no)"),
    RawSignal("yes_no_margin", "yes_no_margin", +1, "1×", "|log p_yes − log p_no|",
              "same ranking as max_answer_prob for yes/no answers"),
    RawSignal("top1_top2_margin", "top1_top2_margin", +1, "1×", "full-vocabulary top-1 − top-2 logit"),
    RawSignal("top1_prob", "top1_prob", +1, "1×", "full-vocabulary max probability"),
    RawSignal("token_entropy", "token_entropy", -1, "1×", "full-softmax entropy at the answer position"),
    RawSignal("mean_token_logprob", "mean_token_logprob", +1, "1×", "mean log-prob of the generated tokens"),
)
SELF_CONSISTENCY_COLUMNS = ("sc_agreement", "self_consistency", "agreement_rate")
SELF_CONSISTENCY_K_COLUMNS = ("sc_k", "self_consistency_k")
ATTENTION_COST = "1× (same pass, eager attention)"
#: Orientation of the attention features: focused attention (low entropy, few clusters, sharpening) = "correct".
ATTENTION_SIGNS = {"entropy": -1, "spatial_entropy": -1, "cluster_count": -1, "delta_spatial_entropy": -1}
ATTENTION_NAMES = {"entropy": "attention entropy", "spatial_entropy": "H_s", "cluster_count": "C_k",
                   "delta_spatial_entropy": "ΔH_s"}


# --------------------------------------------------------------------------------------------------- formatting


def format_estimate(estimate: Estimate | None, digits: int = 3, signed: bool = False) -> str:
    """"0.732 [0.701, 0.760]" (or "—" when undefined)."""
    if estimate is None or not np.isfinite(estimate.value):
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(estimate.value)} [{f.format(estimate.low)}, {f.format(estimate.high)}]"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency); pipes inside cells are escaped."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not np.isfinite(value)):
            return ""
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _estimate(row: pd.Series, prefix: str) -> Estimate | None:
    value = row.get(prefix)
    if value is None or pd.isna(value):
        return None
    return Estimate(float(value), float(row[f"{prefix}_low"]), float(row[f"{prefix}_high"]))


# --------------------------------------------------------------------------------------------------- raw signals


def run_name(reader: RunReader) -> str:
    """"<model>/<split>": the model directory's name and the split file the run was extracted from."""
    rows = reader.rows
    splits = rows["split"].dropna().unique() if "split" in rows.columns else []
    split = str(splits[0]) if len(splits) == 1 else Path(reader.manifest.dataset_path).stem
    model = Path(reader.manifest.model_source.rstrip("/")).name or reader.manifest.family
    return f"{model}/{split}"


def attention_signal_arrays(reader: RunReader, index: np.ndarray) -> tuple[dict[str, np.ndarray], str] | None:
    """Per-layer attention features for rows ``index`` (and the layer-mean map's), NaN where not computable.

    Returns ({"entropy": (m, L), "spatial_entropy": (m, L), "cluster_count": (m, L), "delta_spatial_entropy":
    (m, L-1), "mean_map.<feature>": (m,)}, note) or None if the run has no attention.
    """
    if not reader.manifest.attentions:
        return None
    try:
        attention = reader.tensor("attention_image")[index]
        counts = reader.tensor("attention_counts", np.int64)[index]
    except CacheError:
        return None
    rows = reader.rows.iloc[index]
    m, n_layers, _ = attention.shape
    out = {k: np.full((m, n_layers), np.nan) for k in ("entropy", "spatial_entropy", "cluster_count")}
    out["delta_spatial_entropy"] = np.full((m, max(n_layers - 1, 0)), np.nan)
    for k in ("entropy", "spatial_entropy", "cluster_count"):
        out[f"mean_map.{k}"] = np.full(m, np.nan)
    grid_h = rows["grid_h"].to_numpy(dtype=np.int64) if "grid_h" in rows.columns else np.zeros(m, dtype=np.int64)
    grid_w = rows["grid_w"].to_numpy(dtype=np.int64) if "grid_w" in rows.columns else np.zeros(m, dtype=np.int64)
    skipped = 0
    for key in sorted(set(zip(counts.tolist(), grid_h.tolist(), grid_w.tolist()))):
        count, h, w = key
        members = np.flatnonzero((counts == count) & (grid_h == h) & (grid_w == w))
        maps = attention[members, :, :count].astype(np.float64)
        usable = (h * w == count) & (maps.sum(axis=2) > 0).all(axis=1)
        if not np.any(usable):
            skipped += members.size
            continue
        skipped += int((~usable).sum())
        members, maps = members[usable], maps[usable]
        features = attention_features_batch(maps, (h, w))
        for k in ("entropy", "spatial_entropy", "cluster_count"):
            out[k][members] = features[k]
        out["delta_spatial_entropy"][members] = features["delta_spatial_entropy"]
        normalised = maps / maps.sum(axis=2, keepdims=True)
        mean_features = attention_features_batch(normalised.mean(axis=1, keepdims=True), (h, w))
        for k in ("entropy", "spatial_entropy", "cluster_count"):
            out[f"mean_map.{k}"][members] = mean_features[k][:, 0]
    note = f"{skipped} row(s) without a usable attention map excluded" if skipped else ""
    return out, note


def lens_signal_arrays(reader: RunReader) -> dict[str, np.ndarray] | None:
    """Logit-lens per layer: |yes/no log-odds| (deployable) and the label-signed truth margin (descriptive).

    truth margin = log-odds(yes vs no) if the label is "yes", its negative if "no" (NaN for other labels): the
    lens's margin for the correct answer over the other. It uses the label, so it is not a run-time signal.
    """
    try:
        logodds = reader.tensor("lens_logodds").astype(np.float64)
    except CacheError:
        return None
    labels = reader.rows["label"].astype(str).str.lower().to_numpy() if "label" in reader.rows.columns else None
    sign = np.full(logodds.shape[0], np.nan)
    if labels is not None:
        sign[labels == "yes"] = 1.0
        sign[labels == "no"] = -1.0
    return {"abs_margin": np.abs(logodds), "truth_margin": logodds * sign[:, None]}


def raw_signals(
    reader: RunReader, test: np.ndarray, attention: dict[str, np.ndarray] | None, attention_note: str,
    *, n_boot: int, seed: int,
) -> list[tuple[str, ScoredSignal]]:
    """(key, signal) for output, attention (layer-mean map; ΔH_s last vs previous layer), self-consistency on ``test``."""
    rows = reader.rows
    y = rows["correct"].astype(np.int64).to_numpy()[test]
    scored = []
    for signal in OUTPUT_SIGNALS:
        if signal.column not in rows.columns:
            continue
        values = signal.sign * rows[signal.column].to_numpy(dtype=np.float64)[test]
        scored.append((signal.column, evaluate_scores(
            signal.name if signal.sign > 0 else f"−{signal.name}", "output", signal.description, y, values,
            signal.cost, n_boot=n_boot, seed=seed, note=signal.note,
        )))
    if attention is not None:
        for key in ("entropy", "spatial_entropy", "cluster_count"):
            values = attention[f"mean_map.{key}"]
            scored.append((f"attention_{key}", _scored_subset(
                f"−{ATTENTION_NAMES[key]} (layer-mean map)", "attention",
                f"{ATTENTION_NAMES[key]} of the head- and layer-averaged answer→image attention map",
                y, ATTENTION_SIGNS[key] * values, ATTENTION_COST, attention_note, n_boot=n_boot, seed=seed,
            )))
        if attention["delta_spatial_entropy"].shape[1] > 0:
            values = attention["delta_spatial_entropy"][:, -1]
            scored.append(("attention_delta_spatial_entropy", _scored_subset(
                "−ΔH_s (last layer)", "attention", "H_s(last layer) − H_s(previous layer)",
                y, -values, ATTENTION_COST, attention_note, n_boot=n_boot, seed=seed,
            )))
    sc_column = next((c for c in SELF_CONSISTENCY_COLUMNS if c in rows.columns), None)
    if sc_column is not None:
        k_column = next((c for c in SELF_CONSISTENCY_K_COLUMNS if c in rows.columns), None)
        k = int(rows[k_column].max()) if k_column else None
        cost = f"{k}× (K={k} samples)" if k else "K× (K samples)"
        scored.append(("self_consistency", _scored_subset(
            "self-consistency", "consistency", "share of the most frequent normalised answer among K samples",
            y, rows[sc_column].to_numpy(dtype=np.float64)[test], cost, "", n_boot=n_boot, seed=seed,
        )))
    return scored


def _scored_subset(
    name: str, kind: str, description: str, y: np.ndarray, values: np.ndarray, cost: str, note: str,
    *, n_boot: int, seed: int,
) -> ScoredSignal:
    """Score only the finite entries (a signal missing on some rows is scored where it exists, and says so)."""
    keep = np.isfinite(values)
    if not keep.all():
        extra = f"scored on {int(keep.sum())} of {keep.size} test rows"
        note = f"{note}; {extra}" if note else extra
    return evaluate_scores(name, kind, description, y[keep], values[keep], cost, n_boot=n_boot, seed=seed, note=note)


def layer_signal_table(
    reader: RunReader, test: np.ndarray, attention: dict[str, np.ndarray] | None, attention_note: str,
    sweep: LayerSweep | None, *, n_boot: int, seed: int,
) -> pd.DataFrame:
    """Long table: per decoder layer, AUROC/R_pb of attention features, logit-lens margins and the probe."""
    rows = reader.rows
    y = rows["correct"].astype(np.int64).to_numpy()[test]
    layers = reader.manifest.layers
    lens = lens_signal_arrays(reader)
    records: list[dict[str, Any]] = []

    def add(layer: int, signal: ScoredSignal, orientation: str) -> None:
        record = signal.to_dict()
        record.update(layer=layer, orientation=orientation)
        records.append(record)

    for i, layer in enumerate(layers):
        if attention is not None:
            for key in ("entropy", "spatial_entropy", "cluster_count"):
                add(layer, _scored_subset(f"−{ATTENTION_NAMES[key]}", "attention", "", y,
                                          ATTENTION_SIGNS[key] * attention[key][:, i], ATTENTION_COST, attention_note,
                                          n_boot=n_boot, seed=seed), NEGATED)
            if i > 0:
                add(layer, _scored_subset("−ΔH_s", "attention", f"H_s(L{layer}) − H_s(L{layers[i - 1]})", y,
                                          -attention["delta_spatial_entropy"][:, i - 1], ATTENTION_COST,
                                          attention_note, n_boot=n_boot, seed=seed), NEGATED)
        if lens is not None:
            add(layer, _scored_subset("lens |yes/no log-odds|", "logit lens", "final norm + unembedding", y,
                                      lens["abs_margin"][test, i], "1× (same pass)", "", n_boot=n_boot, seed=seed),
                AS_IS)
            add(layer, _scored_subset("lens truth margin", "logit lens",
                                      "label-signed yes/no log-odds through the lens", y,
                                      lens["truth_margin"][test, i], "1× (same pass)",
                                      "uses the ground-truth label: descriptive, not a run-time signal",
                                      n_boot=n_boot, seed=seed), AS_IS)
        if sweep is not None:
            chosen = sweep.selected().pooling
            if (chosen, layer) in sweep.test_scores and np.array_equal(sweep.split.test, test):
                add(layer, evaluate_scores(f"probe ({chosen})", "probe", "", y, sweep.test_scores[(chosen, layer)],
                                           "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed), FITTED)
    return pd.DataFrame(records)


# --------------------------------------------------------------------------------------------------- run report


@dataclass
class Claim:
    """Whether "the hidden state knows more than the output" holds for one run, and the sentence that says so."""

    run: str
    holds: bool
    sentence: str
    gain_over_item_control: Gain | None
    gain_over_max_prob: Gain | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "holds": self.holds, "sentence": self.sentence,
            "gain_over_item_control": None if self.gain_over_item_control is None else self.gain_over_item_control.to_dict(),
            "gain_over_max_prob": None if self.gain_over_max_prob is None else self.gain_over_max_prob.to_dict(),
        }


@dataclass
class RunReport:
    """Everything computed for one extraction run (one model × one split file)."""

    name: str
    run_dir: str
    manifest: dict[str, Any]
    n: int
    accuracy: float
    sweeps: dict[str, LayerSweep] = field(repr=False)
    ensembles: dict[str, EnsembleResult] = field(repr=False)
    controls: dict[str, ControlSuite] = field(repr=False)
    table7: pd.DataFrame = field(repr=False)
    layer_signals: pd.DataFrame = field(repr=False)
    claim: Claim
    notes: list[str] = field(default_factory=list)


def _signal_row(run: str, grouping: str, key: str, signal: ScoredSignal, orientation: str) -> dict[str, Any]:
    record = {"run": run, "grouping": grouping, "key": key}
    record.update(signal.to_dict())
    record.update(orientation=orientation, n_test=int(signal.test_scores.size))
    return record


def _orientation_of(signal: ScoredSignal) -> str:
    if signal.kind in ("probe", "control", "fusion") or signal.C is not None:
        return FITTED
    return NEGATED if signal.name.startswith("−") else AS_IS


def make_claim(run: str, controls: dict[str, ControlSuite]) -> Claim:
    """The sentence about "the hidden state knows more than the output", decided on held-out items only.

    It holds only if both paired 95% CIs of AUROC(probe) − AUROC(item control) on the held-out-items split (over
    test rows, and over whole held-out items) lie above 0 (`Gain.conservative`). The held-out-images result and the
    gain over max-prob (both as the union of the two intervals) are reported alongside, never as the deciding number.
    """
    item = controls.get("item")
    image = controls.get("image")
    mp_suite = item or image
    gain_mp = mp_suite.gains.get("probe_vs_max_answer_prob") if mp_suite else None
    if item is None:
        sentence = (f'"The hidden state knows more than the output" cannot be assessed for {run}: '
                    "no held-out-items split (the rows need an asked_object column).")
        return Claim(run, False, sentence, None, gain_mp)
    gain = item.gains["probe_vs_item_control"]
    g, rows_ci, groups_ci = gain.conservative, gain.row_paired, gain.group_paired
    split = getattr(item, "split", None)
    n_items = split.group_counts.get("test") if split is not None else None
    over = f"over {n_items} held-out items" if n_items else "over held-out items"
    numbers = (f"{g.value:+.3f} (paired 95% CI over test rows [{rows_ci.low:+.3f}, {rows_ci.high:+.3f}], "
               f"{over} [{groups_ci.low:+.3f}, {groups_ci.high:+.3f}])")
    if g.low > 0:
        sentence = (f'"The hidden state knows more than the output" holds for {run}: on held-out items the probe '
                    f"beats the item control by {numbers}; both intervals exclude 0.")
    elif g.high < 0:
        sentence = (f'"The hidden state knows more than the output" does not hold for {run}: on held-out items the '
                    f"item control beats the probe; probe − item control = {numbers}.")
    else:
        sentence = (f'"The hidden state knows more than the output" is not established for {run}: on held-out '
                    f"items probe − item control = {numbers}; an interval includes 0.")
    if n_items is not None and n_items < MIN_HELD_OUT_ITEMS:
        sentence += (f" Only {n_items} items are held out, so the interval over items is coarse; a dataset with more asked objects "
                     "would sharpen it.")
    if image is not None:
        gi = image.gains["probe_vs_item_control"].conservative
        sentence += (f" On held-out images (where the item control may learn per-item difficulty) the difference is "
                     f"{gi.value:+.3f} [{gi.low:+.3f}, {gi.high:+.3f}].")
    if gain_mp is not None:
        gm = gain_mp.conservative
        sentence += f" Probe − max answer probability on held-out items: {gm.value:+.3f} [{gm.low:+.3f}, {gm.high:+.3f}]."
    return Claim(run, bool(g.low > 0), sentence, gain, gain_mp)


def build_run_report(
    run_dir: str | Path,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    test_fraction: float = 0.3,
    poolings: Sequence[str] | None = None,
    ensemble_k: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    groupings: Sequence[str] = GROUPINGS,
    n_permutations: int = N_PERMUTATIONS,
) -> RunReport:
    """Sweep, ensembles, controls, raw signals and per-layer signals for one run, on image- and item-grouped splits."""
    reader = RunReader(run_dir)
    rows = reader.rows
    name = run_name(reader)
    notes: list[str] = []
    splits = {}
    for grouping in groupings:
        try:
            splits[grouping] = make_split(rows, SplitSpec(grouping, test_fraction, 0.0, seed))  # type: ignore[arg-type]
        except SplitError as err:
            notes.append(f"{grouping}-grouped split skipped: {err}")
    if not splits:
        raise SplitError(f"{run_dir}: no split could be made ({'; '.join(notes)})")
    needed = np.unique(np.concatenate([s.test for s in splits.values()]))
    attention_result = attention_signal_arrays(reader, needed)
    position = {int(r): i for i, r in enumerate(needed)}

    sweeps, ensembles, controls, table, layer_tables = {}, {}, {}, [], []
    for grouping, split in splits.items():
        attention, attention_note = None, ""
        if attention_result is not None:
            local = np.array([position[int(r)] for r in split.test])
            attention = {k: v[local] for k, v in attention_result[0].items()}
            attention_note = attention_result[1]
        sweep = sweep_layers(reader, poolings, split, seed=seed, n_boot=n_boot, c_grid=c_grid)
        selected = sweep.selected()
        ensemble = fit_ensembles(reader, selected.pooling, split, ensemble_k, seed, n_boot=n_boot, c_grid=c_grid,
                                 sweep=sweep)
        suite = run_controls(reader, split, sweep.probes[(selected.pooling, selected.layer)], seed=seed,
                             n_boot=n_boot, c_grid=c_grid, n_permutations=n_permutations)
        sweeps[grouping], ensembles[grouping], controls[grouping] = sweep, ensemble, suite
        y_test = rows["correct"].astype(np.int64).to_numpy()[split.test]

        for key, signal in raw_signals(reader, split.test, attention, attention_note, n_boot=n_boot, seed=seed):
            table.append(_signal_row(name, grouping, key, signal, _orientation_of(signal)))
        best = sweep.best()
        probe_rows = [
            ("probe_selected", suite.signals["probe"]),
            ("probe_best_on_test", evaluate_scores(f"probe ({best.pooling} L{best.layer}), best on test", "probe",
                            "layer chosen by held-out AUROC", y_test, sweep.test_scores[(best.pooling, best.layer)],
                            "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed,
                            note="layer chosen on these test rows: optimistic, descriptive only")),
            ("probe_concat", evaluate_scores(f"probe ({ensemble.pooling} last {len(ensemble.layers)} layers concatenated)", "probe",
                            "one probe on the concatenated states", y_test, ensemble.concat_test_scores,
                            "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed, C=ensemble.concat.info.C)),
            ("probe_mean_score", evaluate_scores(f"probe ({ensemble.pooling} last {len(ensemble.layers)} layers, mean score)", "probe",
                            "mean of the per-layer probes' P(correct)", y_test, ensemble.mean_score_test_scores,
                            "1× (same pass, 0 extra)", n_boot=n_boot, seed=seed)),
        ]
        for key, signal in probe_rows:
            table.append(_signal_row(name, grouping, key, signal, FITTED))
        for key in ("answer_only", "item_control", "shuffled_label_probe", "no_model", "output_model", "fusion"):
            table.append(_signal_row(name, grouping, key, suite.signals[key], FITTED))
        if grouping == "image" or "image" not in splits:
            layer_tables.append(layer_signal_table(reader, split.test, attention, attention_note, sweep,
                                                   n_boot=n_boot, seed=seed).assign(run=name, grouping=grouping))
    manifest = reader.manifest
    return RunReport(
        name=name,
        run_dir=str(run_dir),
        manifest={"model_source": manifest.model_source, "model_fingerprint": manifest.model_fingerprint,
                  "family": manifest.family, "fusion": manifest.fusion, "n_layers": manifest.n_layers,
                  "hidden_size": manifest.hidden_size, "dataset_path": manifest.dataset_path,
                  "dataset_hash": manifest.dataset_hash, "answer_tokens": manifest.answer_tokens},
        n=len(rows),
        accuracy=float(rows["correct"].mean()),
        sweeps=sweeps,
        ensembles=ensembles,
        controls=controls,
        table7=pd.DataFrame(table),
        layer_signals=pd.concat(layer_tables, ignore_index=True) if layer_tables else pd.DataFrame(),
        claim=make_claim(name, controls),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """All runs' results plus the cross-run transfer table and the settings that reproduce them."""

    runs: list[RunReport]
    transfer: pd.DataFrame
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def table7(self) -> pd.DataFrame:
        return pd.concat([r.table7 for r in self.runs], ignore_index=True)

    @property
    def gains(self) -> pd.DataFrame:
        frames = [s.gains_frame().assign(run=r.name) for r in self.runs for s in r.controls.values()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def sweeps(self) -> pd.DataFrame:
        frames = [s.to_frame().assign(run=r.name, grouping=g) for r in self.runs for g, s in r.sweeps.items()]
        return pd.concat(frames, ignore_index=True)

    @property
    def layer_signals(self) -> pd.DataFrame:
        frames = [r.layer_signals for r in self.runs if not r.layer_signals.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def claims(self) -> list[Claim]:
        return [r.claim for r in self.runs]

    def headline(self) -> pd.DataFrame:
        """Per run and grouping: probe vs max-prob vs item control vs attention H_s vs fusion (AUROC [CI])."""
        wanted = {"probe (CV-selected layer)": "probe_selected", "max-prob": "max_answer_prob",
                  "item control": "item_control", "attention H_s": "attention_spatial_entropy", "fusion": "fusion"}
        records = []
        table = self.table7
        for (run, grouping), part in table.groupby(["run", "grouping"], sort=False):
            record: dict[str, Any] = {"run": run, "grouping": grouping}
            for label, key in wanted.items():
                hit = part[part["key"] == key]
                record[label] = format_estimate(_estimate(hit.iloc[0], "auroc")) if len(hit) else "—"
            records.append(record)
        return pd.DataFrame(records)


def build_report(
    run_dirs: str | Path | Sequence[str | Path],
    *,
    seed: int = 0,
    n_boot: int = 1000,
    test_fraction: float = 0.3,
    poolings: Sequence[str] | None = None,
    ensemble_k: int = 5,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    transfer: bool = True,
    n_permutations: int = N_PERMUTATIONS,
) -> Report:
    """The full report for one or several runs (e.g. one model's random / popular / adversarial caches).

    Transfer: for every ordered pair of runs of the same model (fingerprint), the source's CV-selected probe
    (pooling, layer on the image split) is trained on the source and tested on the target; and within each run,
    image-id range A → B and B → A.
    """
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not dirs:
        raise ValueError("build_report needs at least one run directory")
    options = dict(seed=seed, n_boot=n_boot, test_fraction=test_fraction, poolings=poolings, ensemble_k=ensemble_k,
                   c_grid=c_grid)
    runs = [build_run_report(d, n_permutations=n_permutations, **options) for d in dirs]  # type: ignore[arg-type]
    seen: dict[str, int] = {}
    for run in runs:  # two runs with one name (same model, same split file) stay distinguishable
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"
            run.claim.run = run.name
    results: list[TransferResult] = []
    notes: list[str] = []
    if transfer:
        readers = [RunReader(r.run_dir) for r in runs]
        for i, source in enumerate(runs):
            chosen = (source.sweeps.get("image") or next(iter(source.sweeps.values()))).selected()
            for j, target in enumerate(runs):
                if i == j or source.manifest["model_fingerprint"] != target.manifest["model_fingerprint"]:
                    continue
                try:
                    results.append(transfer_across_runs(
                        readers[i], readers[j], chosen.pooling, chosen.layer, source_name=source.name,
                        target_name=target.name, test_fraction=test_fraction, seed=seed, n_boot=n_boot, c_grid=c_grid))
                except (ValueError, CacheError) as err:
                    notes.append(f"transfer {source.name} → {target.name} skipped: {err}")
            try:
                results.extend(transfer_image_ranges(readers[i], chosen.pooling, chosen.layer, run_name=source.name,
                                                     test_fraction=test_fraction, seed=seed, n_boot=n_boot,
                                                     c_grid=c_grid))
            except (ValueError, CacheError) as err:
                notes.append(f"image-range transfer in {source.name} skipped: {err}")
    settings = {**options, "c_grid": list(c_grid), "poolings": None if poolings is None else list(poolings),
                "n_permutations": n_permutations,
                "run_dirs": [str(d) for d in dirs], "ci": "95% percentile bootstrap"}
    return Report(runs, pd.DataFrame([r.to_dict() for r in results]), settings, notes)


# --------------------------------------------------------------------------------------------------- writers


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
        "AUROC [95% CI]": [format_estimate(_estimate(r, "auroc")) for _, r in frame.iterrows()],
        "R_pb [95% CI]": [format_estimate(_estimate(r, "r_pb"), signed=True) for _, r in frame.iterrows()],
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
        cells = part.assign(value=[format_estimate(_estimate(r, "auroc")) for _, r in part.iterrows()])
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
        (out / name).write_text(text)
        written.append(out / name)

    table7 = report.table7
    table7.to_csv(out / "table7.csv", index=False)
    written.append(out / "table7.csv")
    table_sections = []
    for (run, grouping), part in table7.groupby(["run", "grouping"], sort=False):
        table_sections.append(f"### {run}, held-out {'images' if grouping == 'image' else 'items'} "
                              f"({grouping}-grouped split)\n\n{markdown_table(_table7_markdown(part))}")
    table7_md = "\n\n".join(table_sections)
    write("table7.md", "# Table 7: reliability signals and confound controls\n\n" + table7_md + "\n")

    gains = report.gains
    gains.to_csv(out / "gains.csv", index=False)
    written.append(out / "gains.csv")
    gain_sections = [f"### {run}\n\n{markdown_table(_gains_markdown(part))}" for run, part in gains.groupby("run", sort=False)]
    gains_md = "\n\n".join(gain_sections)
    write("gains.md", "# Paired AUROC gains\n\n" + gains_md + "\n")

    transfer_md = "No transfer comparisons (needs image ids, or several runs of one model)."
    report.transfer.to_csv(out / "transfer.csv", index=False)
    written.append(out / "transfer.csv")
    if not report.transfer.empty:
        transfer_md = markdown_table(_transfer_markdown(report.transfer))
    write("transfer.md", "# Transfer: in-domain vs transferred probe on the same target test rows\n\n" + transfer_md + "\n")

    layers = report.layer_signals
    layers.to_csv(out / "layer_signals.csv", index=False)
    written.append(out / "layer_signals.csv")
    layers_md = _layer_markdown(layers) if not layers.empty else "No per-layer signals."
    write("layer_signals.md", "# Per-layer signals (AUROC [95% CI], oriented)\n\n" + layers_md + "\n")

    sweeps = report.sweeps
    sweeps.to_csv(out / "sweep.csv", index=False)
    written.append(out / "sweep.csv")
    sweep_sections = []
    for (run, grouping), part in sweeps.groupby(["run", "grouping"], sort=False):
        shown = pd.DataFrame({
            "pooling": part["pooling"], "layer": part["layer"],
            "held-out AUROC [95% CI]": [format_estimate(Estimate(v, lo, hi)) for v, lo, hi in
                                        zip(part["auroc"], part["auroc_low"], part["auroc_high"])],
            "train CV AUROC": part["cv_auroc"].round(3), "C": part["C"],
            "best": part["best_of_pooling"].map({True: "best", False: ""}),
            "plateau": part["in_plateau"].map({True: "yes", False: ""}),
            "CV-selected": part["cv_selected"].map({True: "yes", False: ""}),
        })
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
    write("report.json", json.dumps(summary, indent=1, default=_json_default))

    if save_probes:
        for r in report.runs:
            sweep = r.sweeps.get("image") or next(iter(r.sweeps.values()))
            selected = sweep.selected()
            target = out / "probes" / r.name.replace("/", "__").replace("#", "_")
            sweep.probes[(selected.pooling, selected.layer)].save(target)
            written.append(target)
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")
