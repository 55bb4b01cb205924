"""Per-layer probes shipped in a gate bundle: the shipped bundles' files equal a fresh fit, a file is read back
exactly, and a stale or damaged one is refused with the reason (then refitted, the reason in the progress)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from synthetic_runs import make_run
from vlmrel_core.analysis.probes import fit_run_probe
from vlmrel_core.analysis.splits import SplitSpec, make_split
from vlmrel_core.engine.store import RunReader
from vlmrel_core.gate.bundle import load_gate_components
from vlmrel_core.inspection.layer_probe_file import (
    LAYER_PROBES_META, LAYER_PROBES_TENSORS, StaleLayerProbes, layer_probes_for_bundle, load_bundle_layer_probes,
    save_bundle_layer_probes,
)
from vlmrel_core.inspection.layer_probes import fit_layer_probes, training_run_dir
from vlmrel_core.samples.catalog import sample_catalog


@pytest.fixture(scope="module")
def run_and_probes(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run") / "run", hidden_strength=(0.0, 1.5, 4.0))
    reader = RunReader(run)
    split = make_split(reader.rows, SplitSpec("image", test_fraction=0.2, calibration_fraction=0.3))
    gate_probe = fit_run_probe(reader, "last_token", [2], split, c_grid=(1.0,))
    gate_probe.save(tmp_path_factory.mktemp("gate_probe"))  # a bundle's probe carries its checksum
    return run, gate_probe, fit_layer_probes(gate_probe, run)


def test_a_written_file_reads_back_exactly_without_the_run(run_and_probes, tmp_path):
    run, gate_probe, fitted = run_and_probes
    save_bundle_layer_probes(fitted, gate_probe, tmp_path)
    stages = []
    read = layer_probes_for_bundle(tmp_path, gate_probe, lambda: pytest.fail("the run is not needed"), tmp_path / "cache",
                                   progress=lambda d, t, s="": stages.append(s))
    assert stages == ["layer probes read from the gate bundle"]
    assert read.layers == [0, 1, 2] and read.probes[2] is gate_probe and read.gate_layer == 2
    states = RunReader(run).states("last_token")
    for layer in (0, 1):
        np.testing.assert_array_equal(read.probes[layer].coef, fitted.probes[layer].coef)
        np.testing.assert_array_equal(read.probes[layer].score(states[:, layer]), fitted.probes[layer].score(states[:, layer]))


def test_a_stale_file_is_refused_and_refitted_with_the_reason(run_and_probes, tmp_path):
    run, gate_probe, fitted = run_and_probes
    save_bundle_layer_probes(fitted, gate_probe, tmp_path)
    meta = json.loads((tmp_path / LAYER_PROBES_META).read_text())
    meta["gate_probe_sha256"] = "0" * 64  # the bundle's probe was refitted, this file was not
    (tmp_path / LAYER_PROBES_META).write_text(json.dumps(meta))
    with pytest.raises(StaleLayerProbes, match="another gate probe: gate_probe_sha256"):
        load_bundle_layer_probes(tmp_path, gate_probe)
    stages = []
    refit = layer_probes_for_bundle(tmp_path, gate_probe, lambda: Path(run), tmp_path / "cache",
                                    progress=lambda d, t, s="": stages.append(s))
    assert stages and all(s.startswith("the bundle's layer probes are not usable") for s in stages)
    np.testing.assert_allclose(refit.probes[0].coef, fitted.probes[0].coef)


def test_a_damaged_array_fails_its_checksum(run_and_probes, tmp_path):
    _, gate_probe, fitted = run_and_probes
    path = save_bundle_layer_probes(fitted, gate_probe, tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last array
    path.write_bytes(bytes(data))
    with pytest.raises(StaleLayerProbes, match="checksum"):
        load_bundle_layer_probes(tmp_path, gate_probe)
    (tmp_path / LAYER_PROBES_TENSORS).unlink()
    with pytest.raises(StaleLayerProbes, match="no layer_probes.safetensors"):
        load_bundle_layer_probes(tmp_path, gate_probe)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["late_fusion", "early_fusion"])
def test_the_shipped_bundles_layer_probes_equal_a_fresh_fit(family):
    catalog = sample_catalog()
    gate_yaml = catalog.gate_config(family)
    components = load_gate_components(gate_yaml)
    bundle = Path(gate_yaml).resolve().parent
    shipped = load_bundle_layer_probes(bundle, components.probe)
    run = training_run_dir(components.calibration.provenance, [catalog.root.parent, bundle])
    fitted = fit_layer_probes(components.probe, run)
    assert shipped.layers == fitted.layers and shipped.gate_layer == fitted.gate_layer
    states = RunReader(run).states(shipped.pooling)
    for layer in shipped.layers:
        np.testing.assert_allclose(shipped.probes[layer].coef, fitted.probes[layer].coef, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(shipped.probes[layer].score(states[:, layer]),
                                   fitted.probes[layer].score(states[:, layer]), atol=1e-6)
