"""The sample-data catalog: every shipped path it names exists, overrides work, a missing file names its path."""

import json

import pytest

from vlmrel_core.samples import catalog as cat
from vlmrel_core.samples.catalog import FAMILIES, FAMILY_SPECS, SampleCatalog, SampleDataError, sample_catalog


def test_families_are_defined_once_and_carry_fusion_and_class():
    from vlmrel_core.demo_models import pipeline
    from vlmrel_core.samples import refresh

    assert pipeline.FAMILIES is FAMILIES and refresh.FAMILIES is FAMILIES
    assert FAMILIES == ("late_fusion", "early_fusion")
    assert FAMILY_SPECS["late_fusion"].fusion == "late" and FAMILY_SPECS["early_fusion"].fusion == "early"
    assert FAMILY_SPECS["early_fusion"].model_class == "PaliGemmaForConditionalGeneration"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_shipped_path_exists_and_matches_the_model_card(family):
    samples = sample_catalog()
    assert samples.root == cat.package_sample_root()
    card = json.loads((samples.model_dir(family) / "model_card.json").read_text())
    assert card["fusion"] == samples.family(family).fusion
    assert card["architecture"] == samples.family(family).model_class
    for run in cat.RUN_NAMES:
        assert (samples.run_dir(family, run) / "manifest.json").is_file()
    for name in cat.REPORT_FILES:
        assert samples.report_file(family, name).is_file()
    for name in cat.GATE_FILES:
        assert samples.gate_file(family, name).is_file()
    assert (samples.report_probe_dir(family, "adversarial") / "probe.json").is_file()
    assert (samples.report_probe_dir(family, "adversarial#2") / "probe.json").is_file()


def test_datasets_and_ablation_tables_exist():
    samples = sample_catalog()
    for split in cat.DATASET_SPLITS:
        assert samples.dataset(split).is_file()
    for split in cat.DRIFT_SPLITS:
        assert samples.drift_dataset(split).is_file()
    for table in cat.ABLATION_TABLES:
        assert samples.ablation_table(table).is_file()
    assert len(samples.sample_images(limit=3)) == 3


def test_env_var_and_argument_override_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(cat.ENV_VAR, str(tmp_path))
    assert SampleCatalog.locate().root == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert SampleCatalog.locate(other).root == other.resolve()


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(SampleDataError, match="sample data folder not found: .*nowhere"):
        SampleCatalog.locate(tmp_path / "nowhere")
    samples = SampleCatalog.locate(tmp_path)
    with pytest.raises(SampleDataError, match=r"gates/late_fusion/gate.yaml"):
        samples.gate_config("late_fusion")
    with pytest.raises(SampleDataError, match=r"runs/early_fusion/random"):
        samples.run_dir("early_fusion", "random")
    with pytest.raises(SampleDataError, match="no images|image folder"):
        samples.sample_images()
    assert samples.gate_config("late_fusion", check=False) == tmp_path.resolve() / "gates" / "late_fusion" / "gate.yaml"


def test_unknown_names_are_refused():
    samples = sample_catalog()
    with pytest.raises(ValueError, match="unknown family 'mid_fusion'"):
        samples.model_dir("mid_fusion")
    with pytest.raises(ValueError, match="unknown run"):
        samples.run_dir("late_fusion", "nope")
