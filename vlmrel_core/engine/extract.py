"""`vlmrel extract`: run a model over a dataset once and cache everything later stages need.

Why cache: every probe, control, calibration and report is arithmetic on these arrays, so the expensive model
pass happens once; the cache resumes after an interruption and records exactly what produced it.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from vlmrel_core import __version__
from vlmrel_core.engine.answers import NormalizationMode, is_correct, normalize_answer
from vlmrel_core.engine.layers import POOLINGS, resolve_layers
from vlmrel_core.data.loader import VQASample, dataset_hash, load_images, load_vqa_jsonl
from vlmrel_core.engine.loading import LoadedVLM
from vlmrel_core.engine.prefix_sharing import ImagePrefixCache, configured_max_bytes, image_grouped_batches
from vlmrel_core.engine.run import BatchRecord, run_batch
from vlmrel_core.engine.parallel import DataParallel, rank_lock
from vlmrel_core.engine.store import LOCK, CacheError, RunManifest, RunWriter, merge_rank_manifests, ensure_run_dir_free, run_lock
from vlmrel_core.progress import Progress, report

T = TypeVar("T")


def image_statistics(image: Image.Image) -> dict[str, float]:
    """Features of no model (the 'no-model' confound control): colour means, contrast, edge density."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    grey = pixels.mean(axis=2)
    edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    return {
        "image_mean_r": float(pixels[..., 0].mean()),
        "image_mean_g": float(pixels[..., 1].mean()),
        "image_mean_b": float(pixels[..., 2].mean()),
        "image_std": float(pixels.std()),
        "image_edge_density": float(edges),
    }


def _rows_for_batch(samples: Sequence[VQASample], images: Sequence[Image.Image], record: BatchRecord, dataset_root: Path) -> list[dict]:
    """One dict per sample; the shard's DataFrame is built once from all of them (a frame per batch cost ms each)."""
    rows = []
    for i, sample in enumerate(samples):
        label = normalize_answer(sample.label, "lenient")
        grid = record.image_grids[i]  # None: image tokens in tiles (Idefics3/SmolVLM), no single patch grid
        row = {
            "sample_id": sample.sample_id,
            "image": _relative(sample.image_path, dataset_root),
            "question": sample.question,
            "label": label,
            "answer_text": record.answer_text[i],
            "answer": record.answer[i],
            "answer_strict": record.answer_strict[i],
            "correct": int(is_correct(record.answer[i], label)),
            "correct_strict": int(record.answer_strict[i] == label),
            "n_image_tokens": record.image_token_counts[i],
            "grid_h": grid[0] if grid else -1,
            "grid_w": grid[1] if grid else -1,
            "question_length": len(sample.question.split()),
        }
        for key in ("question_type", "split", "asked_object", "image_id"):
            if key in sample.metadata:
                row[key] = sample.metadata[key]
        row.update({name: float(values[i]) for name, values in record.output.items()})
        row.update(image_statistics(images[i]))
        rows.append(row)
    return rows


def _add_self_consistency(
    loaded: LoadedVLM, samples: Sequence[VQASample], images: Sequence[Image.Image], rows: list[dict],
    k: int, max_new_tokens: int, normalization: NormalizationMode,
) -> list[dict]:
    from vlmrel_core.engine.self_consistency import sample_answers
    from vlmrel_core.signals.consistency import SelfConsistencyConfig

    config = SelfConsistencyConfig(k=k)
    results = [sample_answers(loaded, image, s.question, config, max_new_tokens, normalization) for s, image in zip(samples, images)]
    for row, result in zip(rows, results):
        row["sc_agreement"] = result.agreement
        row["sc_majority"] = result.majority_answer
        row["sc_majority_correct"] = int(is_correct(result.majority_answer, row["label"]))
        row["sc_k"] = k
    return rows


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _tensors_for_batch(record: BatchRecord) -> dict[str, np.ndarray]:
    tensors = {f"states.{p}": s.astype(np.float16) for p, s in record.states.items()}
    if record.lens_logodds is not None:
        tensors["lens_logodds"] = record.lens_logodds.astype(np.float32)
    if record.attentions is not None:
        width = max(a.shape[1] for a in record.attentions)
        padded = np.zeros((len(record.attentions), record.attentions[0].shape[0], width), dtype=np.float32)
        for i, a in enumerate(record.attentions):
            padded[i, :, : a.shape[1]] = a
        tensors["attention_image"] = padded
        tensors["attention_counts"] = np.asarray([a.shape[1] for a in record.attentions], dtype=np.int32)
    return tensors


def extract(
    loaded: LoadedVLM,
    data_path: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    layers: Sequence[int] | None = None,
    poolings: Sequence[str] = POOLINGS,
    attentions: bool = True,
    batch_size: int = 16,
    shard_size: int = 256,
    max_new_tokens: int = 8,
    normalization: NormalizationMode = "lenient",
    limit: int | None = None,
    progress: Progress | None = None,
    self_consistency_k: int = 0,
    allow_external_paths: bool = False,
    parallel: DataParallel | None = None,
    share_image_prefix: bool = True,
) -> Path:
    """Extract (resuming if ``out_dir`` holds a compatible partial run); returns the run directory.

    ``self_consistency_k`` > 0 also draws K sampled answers per question (T=0.7, top-p 0.9, seeded) and stores
    their agreement: the behavioural baseline, at K extra sampled sequences per question.
    The run folder is locked for the whole call: a second extraction into it fails at once (`RunInUseError`).
    ``parallel`` (one rank of a data-parallel job, see `engine.parallel`): this process extracts its block of the
    dataset into its own shards; rank 0 merges every rank's shards into the one manifest after all finish.
    ``share_image_prefix``: questions about one image share its prompt prefix's pass (`engine.prefix_sharing`;
    LLaVA family; equal to float tolerance); each shard is run image by image: a batch of first questions, then
    the batches of those images' other questions, written back in the dataset's order.
    """
    from vlmrel_core.gate.config import MAX_NEW_TOKENS, MAX_SELF_CONSISTENCY_K
    from vlmrel_core.validation.errors import check_int_range

    check_int_range("batch_size", batch_size, 1, 1024)
    check_int_range("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    check_int_range("self_consistency_k", self_consistency_k, 0, MAX_SELF_CONSISTENCY_K)
    if shard_size < batch_size or shard_size % batch_size:
        raise ValueError("shard_size must be a multiple of batch_size")
    ensure_run_dir_free(out_dir)  # before hashing the dataset (reads every image): a busy folder answers at once
    samples = load_vqa_jsonl(data_path, image_root, allow_external_paths=allow_external_paths)
    if limit is not None:
        samples = samples[:limit]
    chosen_layers = resolve_layers(loaded.n_layers, layers)
    manifest = RunManifest(
        model_source=loaded.source,
        model_type=loaded.model.config.model_type,
        family=loaded.adapter.family,
        fusion=loaded.adapter.fusion,
        model_fingerprint=loaded.fingerprint,
        n_layers=loaded.n_layers,
        hidden_size=loaded.hidden_size,
        layers=chosen_layers,
        poolings=list(poolings),
        attentions=attentions,
        attn_implementation=loaded.attn_implementation,
        dtype=loaded.dtype,
        dataset_path=str(data_path),
        dataset_hash=dataset_hash(data_path, samples),
        n_samples=len(samples),
        answer_tokens=loaded.answer_tokens.to_dict(),
        normalization=normalization,
        max_new_tokens=max_new_tokens,
        self_consistency_k=self_consistency_k,
        vlmrel_version=__version__,
    )
    dataset_root = (Path(image_root) if image_root is not None else Path(data_path).parent).resolve()
    work = _ShardWork(loaded, dataset_root, chosen_layers, poolings, attentions, batch_size, shard_size,
                      max_new_tokens, normalization, self_consistency_k, share_image_prefix)
    if parallel is None:
        with run_lock(out_dir):
            writer = RunWriter(out_dir, manifest)
            done = writer.done_ids()
            todo = [s for s in samples if s.sample_id not in done]
            work.run(writer, todo, len(samples) - len(todo), len(samples), progress)
    else:
        _extract_rank(parallel, work, out_dir, manifest, samples, progress)
    return Path(out_dir)


@dataclass
class _ShardWork:
    """How questions become shards (the same for one process and for each rank of a data-parallel job)."""

    loaded: LoadedVLM
    dataset_root: Path
    layers: list[int]
    poolings: Sequence[str]
    attentions: bool
    batch_size: int
    shard_size: int
    max_new_tokens: int
    normalization: NormalizationMode
    self_consistency_k: int
    share_image_prefix: bool = True

    def _batch(
        self, batch: Sequence[VQASample], images: list[Image.Image], prefix_cache: ImagePrefixCache | None
    ) -> tuple[list[dict], dict[str, np.ndarray]]:
        """One batch's rows and tensors (``images``: its samples' decoded images)."""
        record = run_batch(
            self.loaded, images, [s.question for s in batch], self.layers, self.poolings, self.attentions,
            max_new_tokens=self.max_new_tokens, normalization=self.normalization, prefix_cache=prefix_cache,
        )
        rows = _rows_for_batch(batch, images, record, self.dataset_root)
        if self.self_consistency_k:
            rows = _add_self_consistency(self.loaded, batch, images, rows, self.self_consistency_k,
                                         self.max_new_tokens, self.normalization)
        return rows, _tensors_for_batch(record)

    def run(self, writer: RunWriter, todo: Sequence[VQASample], completed: int, total: int, progress: Progress | None) -> None:
        report(progress, completed, total, "questions")
        sharing = self.share_image_prefix and self.loaded.adapter.shareable_image_prefix
        prefix_cache = ImagePrefixCache(configured_max_bytes()) if sharing else None  # one chunk of images at a time
        for shard_start in range(0, len(todo), self.shard_size):
            shard_samples = todo[shard_start : shard_start + self.shard_size]
            shard_rows, tensor_parts, order = [], [], []
            chunks = (image_grouped_batches(shard_samples, self.batch_size) if sharing else
                      [[list(range(i, min(i + self.batch_size, len(shard_samples))))]
                       for i in range(0, len(shard_samples), self.batch_size)])
            for chunk in chunks:
                if prefix_cache is not None:
                    prefix_cache.clear()  # a new chunk of images: the earlier chunks' prefixes are not needed again
                rows_of_chunk = [i for indices in chunk for i in indices]  # each image file decoded once per chunk
                decoded = dict(zip(rows_of_chunk, load_images([shard_samples[i] for i in rows_of_chunk])))
                for indices in chunk:
                    rows, tensors = self._batch([shard_samples[i] for i in indices], [decoded[i] for i in indices],
                                                prefix_cache)
                    shard_rows.extend(rows)
                    tensor_parts.append(tensors)
                    order.extend(indices)
                    completed += len(indices)
                    report(progress, completed, total, f"shard {len(writer.manifest.shards) + 1}")
            in_order = np.argsort(np.asarray(order), kind="stable")  # rows and tensors back in the dataset's order
            shard_rows = [shard_rows[i] for i in in_order]
            tensors = {}
            for name in tensor_parts[0]:
                parts = [p[name] for p in tensor_parts]
                if name == "attention_image":
                    width = max(p.shape[2] for p in parts)
                    parts = [np.pad(p, ((0, 0), (0, 0), (0, width - p.shape[2]))) for p in parts]
                tensors[name] = np.concatenate(parts)[in_order]
            # attention stays float32: a last token that attends mostly to text leaves image weights below float16's
            # normal range, and flushing them to zero would destroy exactly the maps the attention signals read
            writer.write_shard(pd.DataFrame(shard_rows), tensors)


def _together(parallel: DataParallel, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails on any, every rank raises (none waits forever at a barrier)."""
    result, error = None, None
    try:
        result = step()
    except Exception as err:  # re-raised below, on this rank and (as a summary) on the others
        error = err
    if not parallel.all_true(error is None):
        raise error or CacheError("another rank of this data-parallel extraction failed to start; see its message")
    return result


def _extract_rank(
    parallel: DataParallel, work: _ShardWork, out_dir: str | Path, manifest: RunManifest,
    samples: Sequence[VQASample], progress: Progress | None,
) -> None:
    """One rank: lock, open its writer, agree on what is done, extract its block, then rank 0 merges."""
    with ExitStack() as stack:
        _together(parallel, lambda: stack.enter_context(rank_lock(out_dir, parallel.rank)))
        writer = _together(parallel, lambda: RunWriter(out_dir, manifest, rank=0) if parallel.rank == 0 else None)
        # the all-reduce in `_together` is the barrier: manifest.json exists before the other ranks open theirs
        if parallel.rank != 0:
            writer = _together(parallel, lambda: RunWriter(out_dir, manifest, rank=parallel.rank))
        else:
            _together(parallel, lambda: None)
        done = writer.done_ids()
        parallel.barrier()  # every rank has read what is done before any rank writes
        block = samples[parallel.block(len(samples))]
        todo = [s for s in block if s.sample_id not in done]
        work.run(writer, todo, len(block) - len(todo), len(block), progress)
        parallel.barrier()  # every rank's shards are finished
        if parallel.rank == 0:
            merge_rank_manifests(out_dir)
            (Path(out_dir) / LOCK).unlink(missing_ok=True)  # as a single-process run, a finished folder has no lock
