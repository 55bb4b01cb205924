"""One probe per decoder layer, fitted on the same training rows as the gate's probe, to draw a per-layer strip.

Why fit rather than ship: the gate bundle holds a probe for its target layer only. The other layers' probes are
fitted on the cached extraction run the gate was built from (its calibration provenance names the run and the
split), with the same grouped split and grouped-CV choice of C, so every layer is scored the same way. The gate's
own layer reuses the gate's probe, so its strip cell equals the raw score the gate routed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from vlmrel_core.analysis.probes import Probe, ProbeError, fit_run_probe, load_probe
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import CacheError, RunReader
from vlmrel_core.progress import Progress, report


class LayerProbeError(ValueError):
    """The per-layer probes cannot be fitted (no training run recorded, run missing, run of another model)."""


@dataclass
class LayerProbes:
    """A single-layer probe per layer (same pooling), the gate's layer among them."""

    probes: dict[int, Probe]
    gate_layer: int
    pooling: str
    run_dir: str

    @property
    def layers(self) -> list[int]:
        return sorted(self.probes)

    def scores(self, states: np.ndarray, layers: list[int]) -> dict[int, float]:
        """Raw probe P(correct) per layer for one sample's (n_layers, d) states captured at ``layers``."""
        states = np.asarray(states, dtype=np.float64)
        if states.ndim != 2 or states.shape[0] != len(layers):
            raise ValueError(f"expected ({len(layers)}, d) states, got shape {states.shape}")
        return {layer: float(self.probes[layer].score(states[i : i + 1])[0])
                for i, layer in enumerate(layers) if layer in self.probes}


def training_run_dir(provenance: Mapping[str, object], search_roots: list[Path]) -> Path:
    """The extraction run a gate was built from, found relative to ``search_roots`` when recorded relative."""
    recorded = provenance.get("run_dir")
    if not recorded:
        raise LayerProbeError("the gate's calibration file records no training run (provenance.run_dir)")
    path = Path(str(recorded))
    candidates = [path] if path.is_absolute() else [root / path for root in search_roots] + [path]
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    raise LayerProbeError(f"the gate's training run {recorded} was not found (looked in {[str(c) for c in candidates]})")


def fit_layer_probes(
    gate_probe: Probe, run_dir: str | Path, *, seed: int = 0, progress: Progress | None = None
) -> LayerProbes:
    """Probes for every extracted layer of ``run_dir`` on the gate probe's training split (C by grouped CV)."""
    try:
        reader = RunReader(run_dir)
        manifest = reader.manifest
    except (CacheError, OSError, ValueError) as err:
        raise LayerProbeError(f"cannot read the training run {run_dir}: {err}") from err
    info = gate_probe.info
    if manifest.model_fingerprint != info.model_fingerprint:
        raise LayerProbeError(
            f"{run_dir} was extracted from model {manifest.model_fingerprint!r}, the gate's probe is for {info.model_fingerprint!r}"
        )
    if info.pooling not in manifest.poolings:
        raise LayerProbeError(f"{run_dir} has no {info.pooling!r} states (it has {manifest.poolings})")
    spec = info.split.get("spec") if isinstance(info.split, dict) else None
    if not spec:
        raise LayerProbeError("the gate's probe records no split; cannot fit the other layers on its training rows")
    split = make_split(reader.rows, SplitSpec.from_dict(spec))
    gate_layer = info.layers[0]
    probes: dict[int, Probe] = {}
    layers = list(manifest.layers)
    for done, layer in enumerate(layers):
        report(progress, done, len(layers), f"probe for layer {layer}")
        probes[layer] = gate_probe if layer == gate_layer else fit_run_probe(
            reader, info.pooling, [layer], split, seed, c_grid=(info.C,))  # one layer read at a time
    report(progress, len(layers), len(layers), "layer probes ready")
    return LayerProbes(probes, gate_layer, info.pooling, str(run_dir))


def _cache_key(gate_probe: Probe) -> str:
    info = gate_probe.info
    return f"{info.model_fingerprint}-{info.pooling}-{(info.training_data_hash or 'unhashed')[:16]}"


def load_or_fit_layer_probes(
    gate_probe: Probe, run_dir: str | Path, cache_dir: str | Path, *, seed: int = 0, progress: Progress | None = None
) -> LayerProbes:
    """`fit_layer_probes`, reusing probes saved under ``cache_dir`` by an earlier call for the same gate probe."""
    folder = Path(cache_dir) / _cache_key(gate_probe)
    info = gate_probe.info
    gate_layer = info.layers[0]
    saved = sorted(p for p in folder.glob("layer_*") if p.is_dir()) if folder.is_dir() else []
    if saved:
        try:
            probes = {gate_layer: gate_probe}
            for path in saved:
                probe = load_probe(path, info.model_fingerprint, info.hidden_size)
                probes.setdefault(probe.info.layers[0], probe)
            report(progress, 1, 1, "layer probes loaded from cache")
            return LayerProbes(probes, gate_layer, info.pooling, str(run_dir))
        except (ProbeError, OSError, ValueError, KeyError):
            pass  # a stale or damaged cache is refitted below and overwritten
    fitted = fit_layer_probes(gate_probe, run_dir, seed=seed, progress=progress)
    for layer, probe in fitted.probes.items():
        if layer != gate_layer:
            probe.save(folder / f"layer_{layer:03d}")
    return fitted
