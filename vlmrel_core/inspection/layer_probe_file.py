"""The per-layer probes shipped inside a gate bundle: ``layer_probes.safetensors`` (arrays) + ``layer_probes.json``
(what they are for), beside ``gate.yaml`` under those fixed names.

Why ship them: fitting a probe per layer on the gate's training run costs seconds (the first Ask on a fresh
machine); the bundle's builder has the run at hand and fits them once. Why fixed names and not a gate.yaml entry:
the file belongs to the bundle folder, and a gate.yaml written by an older (or newer) builder stays valid.

Why the file is tied to the bundle's own probe: the other layers' probes were fitted on that probe's training
split, so the JSON records the gate probe's checksum, model, pooling and layer; a file whose record does not match
the bundle's probe (a bundle rebuilt without it) is stale. The loader then says why, and the caller refits.
Nothing is pickled; every array is checked against the checksum recorded with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import save as safetensors_bytes

from vlmrel_core.analysis.probes import Probe, ProbeInfo, _tensors_digest
from vlmrel_core.inspection.layer_probes import LayerProbeError, LayerProbes, fit_layer_probes, load_or_fit_layer_probes
from vlmrel_core.progress import Progress, report
from vlmrel_core.io import atomic_write_bytes, read_json_and_tensors, write_json

LAYER_PROBES_TENSORS = "layer_probes.safetensors"
LAYER_PROBES_META = "layer_probes.json"
FORMAT = "vlmrel-layer-probes"
FORMAT_VERSION = 1
_ARRAYS = ("coef", "intercept", "scaler_mean", "scaler_scale")


class StaleLayerProbes(LayerProbeError):
    """The bundle's layer-probe file does not belong to the bundle's probe (or is damaged): refit."""


def _gate_record(gate_probe: Probe) -> dict[str, Any]:
    info = gate_probe.info
    return {"model_fingerprint": info.model_fingerprint, "pooling": info.pooling, "gate_layer": int(info.layers[0]),
            "hidden_size": info.hidden_size, "gate_probe_sha256": info.tensors_sha256 or _tensors_digest(gate_probe._tensors()),
            "training_data_hash": info.training_data_hash}


def save_bundle_layer_probes(probes: LayerProbes, gate_probe: Probe, bundle_dir: str | Path) -> Path:
    """Write every layer's probe except the gate's own (the bundle's probe/ holds that one) into ``bundle_dir``."""
    bundle_dir = Path(bundle_dir)
    if probes.gate_layer != gate_probe.info.layers[0] or probes.pooling != gate_probe.info.pooling:
        raise LayerProbeError(f"layer probes for layer {probes.gate_layer} / {probes.pooling!r} do not belong to the "
                              f"gate probe (layer {gate_probe.info.layers[0]}, {gate_probe.info.pooling!r})")
    tensors: dict[str, np.ndarray] = {}
    infos: dict[str, Any] = {}
    for layer in probes.layers:
        if layer == probes.gate_layer:
            continue
        probe = probes.probes[layer]
        arrays = probe._tensors()
        info = probe.info.model_copy(update={"tensors_sha256": _tensors_digest(arrays)})
        tensors.update({f"layer_{layer}.{name}": array for name, array in arrays.items()})
        infos[str(layer)] = json.loads(info.model_dump_json())
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **_gate_record(gate_probe), "layers": probes.layers,
            "run": Path(probes.run_dir).name, "probes": infos}
    bundle_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(bundle_dir / LAYER_PROBES_TENSORS, safetensors_bytes(tensors))
    write_json(bundle_dir / LAYER_PROBES_META, meta)
    return bundle_dir / LAYER_PROBES_TENSORS


def write_bundle_layer_probes(
    gate_probe: Probe, run_dir: str | Path, bundle_dir: str | Path, *, seed: int = 0, progress: Progress | None = None,
) -> Path:
    """Fit every layer's probe on the gate probe's training split of ``run_dir`` (`fit_layer_probes`) and write
    them into the bundle folder: what `build-gate` and `refresh-sample-data --only gates` call."""
    probes = fit_layer_probes(gate_probe, run_dir, seed=seed, progress=progress)
    return save_bundle_layer_probes(probes, gate_probe, bundle_dir)


def has_bundle_layer_probes(bundle_dir: str | Path) -> bool:
    return (Path(bundle_dir) / LAYER_PROBES_META).is_file() or (Path(bundle_dir) / LAYER_PROBES_TENSORS).is_file()


def load_bundle_layer_probes(bundle_dir: str | Path, gate_probe: Probe, run_dir: str | Path | None = None) -> LayerProbes:
    """The bundle's shipped per-layer probes with the gate's own probe at its layer.

    Raises StaleLayerProbes (a LayerProbeError) naming the mismatch when the file is missing a part, damaged, or
    recorded for another model, pooling, gate layer or gate probe (a bundle rebuilt without refreshing it)."""
    bundle_dir = Path(bundle_dir)
    meta_path, tensor_path = bundle_dir / LAYER_PROBES_META, bundle_dir / LAYER_PROBES_TENSORS
    meta, tensors = read_json_and_tensors(bundle_dir, LAYER_PROBES_META, LAYER_PROBES_TENSORS, StaleLayerProbes)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise StaleLayerProbes(f"{meta_path} is not a {FORMAT} v{FORMAT_VERSION} file")
    expected = _gate_record(gate_probe)
    wrong = [f"{key} {meta.get(key)!r} (the bundle's probe: {value!r})" for key, value in expected.items()
             if meta.get(key) != value]
    if wrong:
        raise StaleLayerProbes(f"{meta_path} was written for another gate probe: " + "; ".join(wrong))
    gate_layer = expected["gate_layer"]
    probes: dict[int, Probe] = {gate_layer: gate_probe}
    for layer in meta.get("layers", []):
        if layer == gate_layer:
            continue
        probes[int(layer)] = _read_layer(tensors, meta.get("probes", {}), int(layer), expected, tensor_path)
    if sorted(probes) != sorted(int(l) for l in meta.get("layers", [])) or gate_layer not in meta.get("layers", []):
        raise StaleLayerProbes(f"{meta_path}: layers {meta.get('layers')} do not include the gate layer {gate_layer}")
    run = str(run_dir) if run_dir is not None else str(meta.get("run", ""))
    return LayerProbes(probes, gate_layer, expected["pooling"], run)


def layer_probes_for_bundle(
    bundle_dir: str | Path, gate_probe: Probe, run_dir: Callable[[], Path], cache_dir: str | Path,
    progress: Progress | None = None,
) -> LayerProbes:
    """The per-layer probes a gate bundle ships; for a bundle without them (or with a stale file, the reason shown
    in the progress stage) fitted on its training run ``run_dir()`` and kept under ``cache_dir``
    (`load_or_fit_layer_probes`)."""
    reason = "the bundle ships no layer probes"
    if has_bundle_layer_probes(bundle_dir):
        try:
            probes = load_bundle_layer_probes(bundle_dir, gate_probe, None)
            report(progress, 1, 1, "layer probes read from the gate bundle")
            return probes
        except StaleLayerProbes as err:
            reason = f"the bundle's layer probes are not usable ({err})"

    def with_reason(done: int, total: int, stage: str = "") -> None:
        report(progress, done, total, f"{reason}: {stage}" if stage else reason)

    return load_or_fit_layer_probes(gate_probe, run_dir(), cache_dir, progress=with_reason if progress else None)


def _read_layer(tensors: dict[str, np.ndarray], infos: dict[str, Any], layer: int, expected: dict[str, Any],
                tensor_path: Path) -> Probe:
    try:
        info = ProbeInfo.model_validate(infos[str(layer)])
    except (KeyError, ValidationError) as err:
        raise StaleLayerProbes(f"{tensor_path}: no valid description of the layer-{layer} probe ({err})") from err
    arrays = {name: tensors.get(f"layer_{layer}.{name}") for name in _ARRAYS}
    if any(a is None for a in arrays.values()):
        raise StaleLayerProbes(f"{tensor_path}: the layer-{layer} probe's arrays are missing")
    if _tensors_digest(arrays) != info.tensors_sha256:  # type: ignore[arg-type]
        raise StaleLayerProbes(f"{tensor_path}: the layer-{layer} probe does not match its recorded checksum")
    if (info.layers != [layer] or info.pooling != expected["pooling"] or info.kind != "single_layer"
            or info.model_fingerprint != expected["model_fingerprint"] or arrays["coef"].shape != (info.n_features,)):
        raise StaleLayerProbes(f"{tensor_path}: the layer-{layer} probe is recorded for layers {info.layers}, "
                               f"pooling {info.pooling!r}, model {info.model_fingerprint!r}")
    return Probe(coef=arrays["coef"], intercept=float(arrays["intercept"][0]), scaler_mean=arrays["scaler_mean"],
                 scaler_scale=arrays["scaler_scale"], info=info)


__all__ = ["LAYER_PROBES_META", "LAYER_PROBES_TENSORS", "StaleLayerProbes", "has_bundle_layer_probes",
           "layer_probes_for_bundle", "load_bundle_layer_probes", "save_bundle_layer_probes", "write_bundle_layer_probes"]
