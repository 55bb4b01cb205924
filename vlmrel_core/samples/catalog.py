"""One catalog of the shipped sample data (`sample_data/`): families, model dirs, runs, reports, gates, datasets.

Why one place: the dashboard, the CLI defaults, `refresh-sample-data` and the tests all name the same files; a
path built by hand in four places drifts. The root is found relative to the package (the repository root is the
parent of `vlmrel_core`), overridable by the ``VLMREL_SAMPLE_DATA`` environment variable or an explicit argument.
A missing shipped file is an error naming the path and the command that writes it, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV_VAR = "VLMREL_SAMPLE_DATA"
REFRESH_HINT = "run `vlmrel refresh-sample-data` (or point VLMREL_SAMPLE_DATA at a sample_data folder)"


@dataclass(frozen=True)
class FamilySpec:
    """One embedded model family: its folder name, fusion type and transformers class."""

    name: str
    fusion: str
    model_class: str
    label: str


FAMILY_SPECS: Mapping[str, FamilySpec] = {
    "late_fusion": FamilySpec("late_fusion", "late", "LlavaForConditionalGeneration", "late fusion (LLaVA class)"),
    "early_fusion": FamilySpec("early_fusion", "early", "PaliGemmaForConditionalGeneration",
                               "early fusion (PaliGemma class)"),
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_SPECS)
POPE_SPLITS: tuple[str, ...] = ("adversarial", "random", "popular")
DATASET_SPLITS: tuple[str, ...] = POPE_SPLITS + ("open_questions",)
DRIFT_SPLITS: tuple[str, ...] = ("in_domain", "shifted")
SELF_CONSISTENCY_RUN = "adversarial_self_consistency"
RUN_NAMES: tuple[str, ...] = DATASET_SPLITS + (SELF_CONSISTENCY_RUN,) + tuple(f"drift_{s}" for s in DRIFT_SPLITS)
REPORT_FILES: tuple[str, ...] = ("report.json", "report.md", "table7.csv", "gains.csv", "transfer.csv",
                                 "layer_signals.csv", "sweep.csv")
GATE_FILES: tuple[str, ...] = ("gate.yaml", "calibration.json", "report.json", "drift.json", "live_run.json")
ABLATION_TABLES: tuple[str, ...] = ("adversarial", "open_questions")


class SampleDataError(FileNotFoundError):
    """A shipped sample-data file or folder that is not there; the message names the path."""


def package_sample_root() -> Path:
    """`sample_data/` beside the package: the repository root is the parent of `vlmrel_core`."""
    return Path(__file__).resolve().parents[2] / "sample_data"


def _check_name(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
    return value


@dataclass(frozen=True)
class SampleCatalog:
    """Paths of everything shipped under one sample-data root. Accessors check existence unless ``check=False``
    (the refresh command uses ``check=False`` to name the files it is about to write)."""

    root: Path

    @classmethod
    def locate(cls, root: str | Path | None = None, *, check: bool = True) -> "SampleCatalog":
        """``root`` if given, else ``$VLMREL_SAMPLE_DATA``, else the repository's `sample_data/`."""
        chosen = Path(root) if root is not None else Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else package_sample_root()
        catalog = cls(chosen.expanduser().resolve())
        if check and not catalog.root.is_dir():
            raise SampleDataError(f"sample data folder not found: {catalog.root}; {REFRESH_HINT}")
        return catalog

    def _path(self, path: Path, check: bool, what: str) -> Path:
        if check and not path.exists():
            raise SampleDataError(f"shipped {what} not found: {path}; {REFRESH_HINT}")
        return path

    # models and families
    def family(self, family: str) -> FamilySpec:
        return FAMILY_SPECS[_check_name(family, FAMILIES, "family")]

    def model_dir(self, family: str, *, check: bool = True) -> Path:
        return self._path(self.root / "models" / _check_name(family, FAMILIES, "family"), check, "model folder")

    def models_root(self, *, check: bool = True) -> Path:
        return self._path(self.root / "models", check, "models folder")

    # datasets
    def pope_dir(self, *, check: bool = True) -> Path:
        return self._path(self.root / "shapes_pope", check, "dataset folder")

    def dataset(self, split: str, *, check: bool = True) -> Path:
        name = _check_name(split, DATASET_SPLITS, "dataset split")
        return self._path(self.root / "shapes_pope" / f"{name}.jsonl", check, "dataset")

    def images_dir(self, *, check: bool = True) -> Path:
        return self._path(self.root / "shapes_pope" / "images", check, "image folder")

    def sample_images(self, limit: int | None = None) -> list[Path]:
        """The shipped PNGs, sorted; an empty folder is an error, not an empty list."""
        images = sorted(self.images_dir().glob("*.png"))
        if not images:
            raise SampleDataError(f"no images in {self.images_dir()}; run `vlmrel generate-data`")
        return images[:limit] if limit is not None else images

    def drift_dir(self, *, check: bool = True) -> Path:
        return self._path(self.root / "shapes_drift", check, "drift dataset folder")

    def drift_dataset(self, name: str, *, check: bool = True) -> Path:
        split = _check_name(name, DRIFT_SPLITS, "drift split")
        return self._path(self.root / "shapes_drift" / f"{split}.jsonl", check, "drift dataset")

    # extraction runs
    def run_dir(self, family: str, run: str, *, check: bool = True) -> Path:
        _check_name(run, RUN_NAMES, "run")
        return self._path(self.root / "runs" / _check_name(family, FAMILIES, "family") / run, check, "extraction run")

    def runs(self, family: str) -> dict[str, Path]:
        """Every shipped run of one family, by name (all must be there)."""
        return {name: self.run_dir(family, name) for name in RUN_NAMES}

    # reports
    def report_dir(self, family: str, *, check: bool = True) -> Path:
        return self._path(self.root / "reports" / _check_name(family, FAMILIES, "family"), check, "report folder")

    def report_file(self, family: str, name: str, *, check: bool = True) -> Path:
        _check_name(name, REPORT_FILES, "report file")
        return self._path(self.report_dir(family, check=False) / name, check, "report file")

    def report_probe_dir(self, family: str, run: str, *, check: bool = True) -> Path:
        """A report's saved CV-selected probe of one run (``run`` as in report.json, e.g. 'adversarial')."""
        name = f"{family}__{run}".replace("/", "__").replace("#", "_")
        return self._path(self.report_dir(family, check=False) / "probes" / name, check, "report probe")

    def ablation_table(self, split: str, *, check: bool = True) -> Path:
        name = _check_name(split, ABLATION_TABLES, "ablation table")
        return self._path(self.root / "reports" / "ablation" / f"{name}.csv", check, "ablation table")

    def ablation_dir(self, *, check: bool = True) -> Path:
        return self._path(self.root / "reports" / "ablation", check, "ablation folder")

    def shift_report(self, *, check: bool = True) -> Path:
        return self._path(self.root / "reports" / "shift" / "shift_report.json", check, "shift report")

    # gate bundles
    def gate_dir(self, family: str, *, check: bool = True) -> Path:
        return self._path(self.root / "gates" / _check_name(family, FAMILIES, "family"), check, "gate bundle")

    def gate_file(self, family: str, name: str, *, check: bool = True) -> Path:
        _check_name(name, GATE_FILES, "gate bundle file")
        return self._path(self.gate_dir(family, check=False) / name, check, "gate bundle file")

    def gate_config(self, family: str, *, check: bool = True) -> Path:
        return self.gate_file(family, "gate.yaml", check=check)

    def refresh_summary(self, *, check: bool = True) -> Path:
        return self._path(self.root / "refresh_summary.json", check, "refresh summary")


def sample_catalog(root: str | Path | None = None) -> SampleCatalog:
    """The checked catalog (root must exist): the one entry point for readers of shipped data."""
    return SampleCatalog.locate(root)


def cli_path(path: Path) -> str:
    """A path for a CLI default: relative to the working directory when inside it (so written files keep the
    shipped relative paths), absolute otherwise."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


__all__ = [
    "ABLATION_TABLES", "DATASET_SPLITS", "DRIFT_SPLITS", "ENV_VAR", "FAMILIES", "FAMILY_SPECS", "FamilySpec",
    "GATE_FILES", "POPE_SPLITS", "REPORT_FILES", "RUN_NAMES", "SELF_CONSISTENCY_RUN", "SampleCatalog",
    "SampleDataError", "cli_path", "package_sample_root", "sample_catalog",
]
