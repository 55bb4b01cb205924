"""The extraction cache: sharded safetensors (tensors) + parquet (rows) + a JSON manifest; resumable.

Why this layout: memory stays flat in the dataset size (one shard in memory at a time), a killed run resumes
without losing or duplicating a row (a shard counts only once the manifest names it, and the manifest is replaced
atomically), and nothing is ever unpickled (safetensors, parquet and JSON only), so a cache from elsewhere is safe
to open.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.numpy import save_file

from vlmrel_core.io import atomic_write_text

MANIFEST = "manifest.json"
LOCK = ".lock"
SCHEMA_VERSION = 1


class CacheError(RuntimeError):
    """A run directory that cannot be used as asked (mismatch, corruption), said in words."""


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    n_rows: int = Field(ge=0)


class RunManifest(BaseModel):
    """What produced a run: checked on resume and by every probe trained on it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_version: int = SCHEMA_VERSION
    model_source: str
    model_type: str
    family: str
    fusion: str
    model_fingerprint: str
    n_layers: int
    hidden_size: int
    layers: list[int]
    poolings: list[str]
    attentions: bool
    attn_implementation: str
    dtype: str
    dataset_path: str
    dataset_hash: str
    n_samples: int
    answer_tokens: dict[str, list[Any]]
    normalization: str
    max_new_tokens: int
    self_consistency_k: int = 0
    shards: list[ShardInfo] = Field(default_factory=list)
    state_dtype: str = "float16"
    vlmrel_version: str = ""

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a resume to continue the same extraction."""
        return self.model_dump(exclude={"shards", "vlmrel_version", "dataset_path", "model_source"})


class RunInUseError(CacheError):
    """Another process is writing to the same run folder."""


def _lock_holder(lock_path: Path) -> str:
    try:
        pid, _, since = lock_path.read_text().strip().partition(" ")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(since)))
    except (OSError, ValueError):  # removed or being written at this instant
        return "another process"
    return f"process {pid} since {stamp}"


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (its ``.lock`` file) for the whole block, or fail at once.

    Why flock: two extractions into one folder would interleave shards and manifests; the kernel drops the lock
    when the holder exits or is killed, so a crash never leaves a stale lock behind. A refused caller changes
    nothing in the folder; a finished holder removes the lock file.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunInUseError(
                f"{run_dir} is in use by {_lock_holder(lock_path)} (another extraction writes there); "
                "wait for it to finish or choose another --out folder"
            ) from None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.time():.0f}\n".encode())
        os.fsync(fd)
        yield run_dir
    finally:
        # removed while still held (a finished run folder holds no lock file); a killed holder leaves it, unlocked
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def ensure_run_dir_free(run_dir: str | Path) -> None:
    """Fail at once if another process holds ``run_dir``'s lock (checked before a model loads); changes nothing."""
    lock_path = Path(run_dir) / LOCK
    if not lock_path.is_file():
        return
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunInUseError(
            f"{Path(run_dir)} is in use by {_lock_holder(lock_path)} (another extraction writes there); "
            "wait for it to finish or choose another --out folder"
        ) from None
    finally:
        os.close(fd)


def read_manifest(run_dir: str | Path) -> RunManifest:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{run_dir} is not an extraction run (no {MANIFEST})")
    try:
        return RunManifest.model_validate_json(path.read_text())
    except ValidationError as err:
        raise CacheError(f"{path} is not a valid vlmrel manifest: {err}") from err


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def _rank_manifests(run_dir: Path) -> list[tuple[int, RunManifest]]:
    """Per-rank manifests of a data-parallel extraction not yet merged, in rank order."""
    found = []
    for path in run_dir.glob("manifest.rank*.json"):
        try:
            found.append((int(path.name[len("manifest.rank"):-len(".json")]), RunManifest.model_validate_json(path.read_text())))
        except (ValueError, ValidationError) as err:
            raise CacheError(f"{path} is not a valid per-rank manifest: {err}") from err
    return sorted(found, key=lambda item: item[0])


def merge_rank_manifests(run_dir: str | Path) -> RunManifest:
    """Fold every per-rank manifest into ``manifest.json`` (rank order, each shard once), then remove them.

    Why rank order: ranks own contiguous blocks of the dataset, so the merged rows come in dataset order, as a
    single-process run's do. Idempotent: a merge cut off between the manifest write and the removals is finished
    by the next one (shards already listed are not listed again). Call it only while no rank is writing.
    """
    run_dir = Path(run_dir)
    main = read_manifest(run_dir)
    listed = {s.name for s in main.shards}
    ranks = _rank_manifests(run_dir)
    for rank, manifest in ranks:
        if manifest.identity() != main.identity():
            raise CacheError(f"{run_dir / rank_manifest_name(rank)} belongs to a different extraction than {MANIFEST}")
        main.shards.extend(s for s in manifest.shards if s.name not in listed)
        listed.update(s.name for s in manifest.shards)
    if ranks:
        atomic_write_text(run_dir / MANIFEST, main.model_dump_json(indent=1))
        for rank, _ in ranks:
            (run_dir / rank_manifest_name(rank)).unlink(missing_ok=True)
    return main


class RunWriter:
    """Appends shards to a run directory; resumes a compatible one, refuses an incompatible one.

    ``rank`` (data-parallel extraction): this rank's shards are named ``shard-rNNN-*`` and listed in its own
    ``manifest.rankNNN.json``, so ranks never write the same file; `merge_rank_manifests` folds them into
    ``manifest.json`` once every rank has finished. Without a rank, leftover per-rank manifests of an interrupted
    data-parallel run are merged first (the caller holds the folder's exclusive lock).
    """

    def __init__(self, run_dir: str | Path, manifest: RunManifest, rank: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        path = self.run_dir / MANIFEST
        if path.exists():
            existing = read_manifest(self.run_dir)
            if existing.identity() != manifest.identity():
                diff = sorted(k for k, v in manifest.identity().items() if existing.identity().get(k) != v)
                raise CacheError(
                    f"{self.run_dir} holds a different extraction (differs in: {', '.join(diff)}); "
                    "use another --out directory"
                )
            if rank is None:
                existing = merge_rank_manifests(self.run_dir)
            manifest = existing
        elif rank is not None:
            manifest = manifest.model_copy(update={"shards": []})
            if rank == 0:  # the folder's manifest exists from the start, so readers and resumes see one extraction
                atomic_write_text(path, manifest.model_dump_json(indent=1))
        self.manifest = manifest
        self.merged_shards = [s.name for s in manifest.shards]  # listed in manifest.json (for a rank: read-only)
        if rank is not None:
            own = {r: m for r, m in _rank_manifests(self.run_dir)}.get(rank)
            self.manifest = manifest.model_copy(update={"shards": list(own.shards) if own else []})
        self._remove_orphans()
        atomic_write_text(self._manifest_path, self.manifest.model_dump_json(indent=1))

    @property
    def _manifest_path(self) -> Path:
        return self.run_dir / (MANIFEST if self.rank is None else rank_manifest_name(self.rank))

    @property
    def _prefix(self) -> str:
        return "shard-" if self.rank is None else f"shard-r{self.rank:03d}-"

    def _remove_orphans(self) -> None:
        """Files of a shard that was being written when the process died: not in the manifest, so redo them.

        A rank touches only its own files (other ranks are writing theirs at the same time)."""
        known = {s.name for s in self.manifest.shards} | set(self.merged_shards)
        if self.rank is not None:
            known |= {s.name for _, m in _rank_manifests(self.run_dir) for s in m.shards}
        for file in self.run_dir.glob(f"{self._prefix}*"):
            stem = file.name.split(".")[0]
            if stem not in known or file.name.endswith(".tmp"):
                file.unlink()
        for file in self.run_dir.glob(f"{self._manifest_path.name}.*.tmp"):  # a manifest write cut off by a kill
            file.unlink()

    def done_ids(self) -> set[str]:
        """Every sample already in a finished shard: merged, this rank's, or another rank's (not yet merged)."""
        names = set(self.merged_shards) | {s.name for s in self.manifest.shards}
        names |= {s.name for _, m in _rank_manifests(self.run_dir) for s in m.shards}
        done: set[str] = set()
        for name in sorted(names):
            done.update(pd.read_parquet(self.run_dir / f"{name}.parquet", columns=["sample_id"])["sample_id"])
        return done

    def write_shard(self, rows: pd.DataFrame, tensors: dict[str, np.ndarray]) -> None:
        if "sample_id" not in rows.columns:
            raise ValueError("rows need a sample_id column")
        for name, array in tensors.items():
            if array.shape[0] != len(rows):
                raise ValueError(f"tensor {name} has {array.shape[0]} rows, the shard has {len(rows)}")
        taken = set(self.merged_shards) | {s.name for s in self.manifest.shards}
        index = sum(1 for n in taken if n.startswith(self._prefix) and (self.rank is not None or not n.startswith("shard-r")))
        name = f"{self._prefix}{index:05d}"
        while name in taken:
            index += 1
            name = f"{self._prefix}{index:05d}"
        tmp_parquet = self.run_dir / f"{name}.parquet.{os.getpid()}.tmp"
        tmp_tensors = self.run_dir / f"{name}.safetensors.{os.getpid()}.tmp"
        rows.reset_index(drop=True).to_parquet(tmp_parquet, index=False)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_tensors))
        os.replace(tmp_parquet, self.run_dir / f"{name}.parquet")
        os.replace(tmp_tensors, self.run_dir / f"{name}.safetensors")
        self.manifest.shards.append(ShardInfo(name=name, n_rows=len(rows)))
        atomic_write_text(self._manifest_path, self.manifest.model_dump_json(indent=1))


class RunReader:
    """Read access to a finished (or partial) run: rows as a DataFrame, tensors per name, shard by shard."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.manifest = read_manifest(self.run_dir)
        if not self.manifest.shards:
            raise CacheError(f"{self.run_dir} has no finished shards yet")
        self._rows: pd.DataFrame | None = None

    @property
    def rows(self) -> pd.DataFrame:
        if self._rows is None:
            frames = []
            for shard in self.manifest.shards:
                path = self.run_dir / f"{shard.name}.parquet"
                try:
                    frame = pd.read_parquet(path)
                except Exception as err:  # pyarrow raises several types for damaged files
                    raise CacheError(f"cannot read {path}: {err}") from err
                if len(frame) != shard.n_rows:
                    raise CacheError(f"{path} has {len(frame)} rows, the manifest says {shard.n_rows}")
                frames.append(frame)
            self._rows = pd.concat(frames, ignore_index=True)
        return self._rows

    def iter_tensor(self, name: str, columns: Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Each shard's ``name`` tensor (only ``columns`` of its second axis, if given), read alone from the
        memory-mapped file: the shard's other tensors (other poolings, attention maps) and other layers are
        never loaded, so a probe on one layer and pooling reads one layer's bytes."""
        for shard in self.manifest.shards:
            path = self.run_dir / f"{shard.name}.safetensors"
            try:
                with safe_open(str(path), framework="numpy") as tensors:
                    if name not in tensors.keys():
                        raise CacheError(f"{path} has no tensor {name!r}; it has {sorted(tensors.keys())}")
                    if columns is None:
                        yield tensors.get_tensor(name)
                        continue
                    sliced = tensors.get_slice(name)
                    yield np.concatenate([sliced[:, c : c + 1] for c in columns], axis=1)
            except CacheError:
                raise
            except Exception as err:
                raise CacheError(f"cannot read {path}: {err}") from err

    def tensor(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        return np.concatenate([t.astype(dtype, copy=False) for t in self.iter_tensor(name)])

    def states(self, pooling: str, layers: Sequence[int] | None = None) -> np.ndarray:
        """(n, n_layers, d) float32 for the chosen decoder layers (indices as in the manifest's `layers`)."""
        if pooling not in self.manifest.poolings:
            raise CacheError(f"pooling {pooling!r} was not extracted; this run has {self.manifest.poolings}")
        columns = None
        if layers is not None:
            missing = [l for l in layers if l not in self.manifest.layers]
            if missing:
                raise CacheError(f"layers {missing} were not extracted; this run has {self.manifest.layers}")
            columns = [self.manifest.layers.index(l) for l in layers]
        return np.concatenate([a.astype(np.float32, copy=False) for a in self.iter_tensor(f"states.{pooling}", columns)])
