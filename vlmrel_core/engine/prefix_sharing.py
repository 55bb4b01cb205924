"""Image-prefix sharing: questions about one image reuse the KV cache of the prompt through its last image token.

Why: in POPE-style data every image carries several questions, and in a causal late-fusion decoder (LLaVA) the
prompt's prefix through the last image token (the vision tower, the projector and every decoder layer over those
positions) does not depend on the question. It is computed once per image and kept (keys, values and each mean
pooling's token sums per captured layer); a later question about the same image runs only its own tokens, with the
prefix's positions unchanged and the padding placed between prefix and question, masked. The results equal the
unshared pass to float tolerance (tests/test_batching.py, every family).

Which families: those whose adapter sets `shareable_image_prefix` (causal attention, image features only in the
prefix, positions that do not depend on later tokens): LLaVA. Not PaliGemma (image and question attend to each other:
a prefix-LM), not Qwen2-VL (M-RoPE deltas kept by the model per batch), not Idefics3 (tiles; untested). A key is the
prefix's token ids plus every per-row model input besides the text (the processed pixels), so a changed image or
template never matches. A call made while an intervention hooks the model (`capture.active_intervention_owners`)
neither uses nor keeps prefixes: its states are not the loaded model's.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from vlmrel_core.engine.capture import PREFIX_SETS, PrefixSums, SharedPrefix, TokenLayout, pooling_counts

#: Kept prefixes per cache at most (LRU); 512 MiB holds ~1,900 embedded-model images or one LLaVA-1.5-7B image
#: (fp16, 32 layers x 600 tokens). VLMREL_PREFIX_CACHE_MB sets it for the model-wide cache (0: no sharing).
DEFAULT_MAX_BYTES = 512 * 2**20


def configured_max_bytes() -> int:
    """The model-wide cache budget: VLMREL_PREFIX_CACHE_MB (MiB, 0 turns sharing off) or the default."""
    from vlmrel_core.validation.errors import int_setting

    return int_setting("VLMREL_PREFIX_CACHE_MB", DEFAULT_MAX_BYTES // 2**20, minimum=0) * 2**20
_TEXT_KEYS = ("input_ids", "attention_mask")



@dataclass(frozen=True)
class CachedPrefix:
    """One image's prompt prefix: per cache layer (1, kv_heads, length, head_dim) keys and values, and per captured
    decoder layer the (3, d) float32 token sums over `PREFIX_SETS`."""

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    sums: dict[int, torch.Tensor]
    length: int

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.key_values for t in kv] + list(self.sums.values())
        return sum(t.numel() * t.element_size() for t in tensors)


class ImagePrefixCache:
    """Least-recently-used image prefixes, bounded in bytes; safe to share between threads (entries are read-only:
    a call copies them into its own KV cache)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0  # rows answered from a kept prefix
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def count_hits(self, n: int) -> None:
        """``n`` more rows answered from kept prefixes (under the lock: threads share a model's cache)."""
        with self._lock:
            self.hits += n

    def get(self, key: bytes, layers: Sequence[int]) -> CachedPrefix | None:
        """The kept prefix, if it has token sums for every layer asked (else the row runs in full and replaces it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or any(layer not in entry.sums for layer in layers):
                return None
            self._entries.move_to_end(key)
            return entry

    def put(self, key: bytes, entry: CachedPrefix) -> bool:
        """Keep ``entry`` (evicting the least recently used); False when it alone exceeds the budget."""
        size = entry.nbytes
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
        return True


@dataclass(frozen=True)
class RowPrefix:
    """Where one row's shareable prefix lies in the processor's left-padded batch, and its cache key."""

    start: int  # first real token
    length: int  # tokens through the last image token
    key: bytes


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def row_prefixes(inputs: dict[str, torch.Tensor], layout: TokenLayout) -> list[RowPrefix | None]:
    """Each row's prefix through its last image token, or None where nothing can be shared (no image tokens, no
    question after them, real tokens not contiguous, or a model input that is not one row per sample)."""
    n = inputs["input_ids"].shape[0]
    per_row = {k: v for k, v in inputs.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
    if any(v.ndim == 0 or v.shape[0] != n for v in per_row.values()):
        return [None] * n  # e.g. Qwen2-VL's flattened patches: pixels cannot be told apart per row
    per_row = {k: v.cpu() for k, v in per_row.items()}  # one copy per tensor, not one per row (GPU inputs)
    ids = inputs["input_ids"].cpu()
    real, image, last = layout.attention_mask.cpu(), layout.image_mask.cpu(), layout.last_index.cpu()
    prefixes: list[RowPrefix | None] = []
    for row in range(n):
        real_positions = torch.nonzero(real[row]).flatten()
        image_positions = torch.nonzero(image[row]).flatten()
        start = int(real_positions[0])
        contiguous = int(real_positions[-1]) - start + 1 == real_positions.numel()
        if not contiguous or image_positions.numel() == 0 or int(last[row]) <= int(image_positions[-1]):
            prefixes.append(None)
            continue
        end = int(image_positions[-1]) + 1
        digest = hashlib.blake2b(_tensor_bytes(ids[row, start:end]), digest_size=20)
        for name in sorted(per_row):
            value = per_row[name][row]
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(_tensor_bytes(value))
        prefixes.append(RowPrefix(start, end - start, digest.digest()))
    return prefixes


def select_rows(inputs: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The processor batch's ``rows``, without the left padding that only longer, other rows needed."""
    index = torch.tensor(list(rows), device=inputs["input_ids"].device)
    n = inputs["input_ids"].shape[0]
    chosen = {k: (v.index_select(0, index.to(v.device)) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v)
              for k, v in inputs.items()}
    mask = chosen.get("attention_mask")
    if mask is not None:
        trim = int(mask.long().cumsum(dim=1).eq(0).sum(dim=1).min())  # padding columns every chosen row has
        if trim:
            width = mask.shape[1]
            chosen = {k: (v[:, trim:] if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[1] == width else v)
                      for k, v in chosen.items()}
    return chosen


def prefix_spans(layout: TokenLayout, prefixes: Sequence[RowPrefix | None], shift: int) -> PrefixSums:
    """(b, 3, s) 0/1 marks of each row's prefix tokens per `PREFIX_SETS` set; ``shift`` = padding columns trimmed."""
    b, s = layout.attention_mask.shape
    spans = torch.zeros(b, len(PREFIX_SETS), s)
    real, image = layout.attention_mask.cpu(), layout.image_mask.cpu()
    sets = {"mean_all": real, "mean_image": image, "mean_text": real & ~image}
    for row, prefix in enumerate(prefixes):
        if prefix is None:
            continue
        start = prefix.start - shift
        for j, name in enumerate(PREFIX_SETS):
            spans[row, j, start : start + prefix.length] = sets[name][row, start : start + prefix.length].float()
    return PrefixSums(spans)


def kept_prefixes(
    generated_cache: Any, prefixes: Sequence[RowPrefix | None], shift: int, sums: dict[int, torch.Tensor]
) -> list[CachedPrefix | None]:
    """Each shareable row's prefix cut from the pass's KV cache; None for all rows when the cache is not a plain
    dynamic cache (sliding windows, quantised or offloaded layers cannot be cut and re-used this way)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(generated_cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or getattr(layer, "keys", None) is None for layer in layers):
        return [None] * len(prefixes)
    kept: list[CachedPrefix | None] = []
    for row, prefix in enumerate(prefixes):
        if prefix is None:
            kept.append(None)
            continue
        span = slice(prefix.start - shift, prefix.start - shift + prefix.length)
        key_values = tuple((layer.keys[row : row + 1, :, span].clone(), layer.values[row : row + 1, :, span].clone())
                           for layer in layers)
        kept.append(CachedPrefix(key_values, {layer: s[row].clone() for layer, s in sums.items()}, prefix.length))
    return kept


@dataclass
class SharedCall:
    """A model call for rows whose prefix is kept: text inputs (prefix, masked padding, question), KV cache, layout
    and each pooling's prefix part."""

    inputs: dict[str, torch.Tensor]
    cache: Any
    layout: TokenLayout
    shared: SharedPrefix


def shared_call(
    model: Any, inputs: dict[str, torch.Tensor], rows: Sequence[int], prefixes: Sequence[RowPrefix | None],
    entries: Sequence[CachedPrefix], image_token_id: int, poolings: Sequence[str], pad_token_id: int,
) -> SharedCall:
    """The inputs for ``rows`` (all with kept prefixes of one length): each row's prefix, then padding, then its
    own tokens; the prefix keeps positions 0..length-1 as in its own pass (positions follow the attention mask)."""
    from transformers import DynamicCache

    length = entries[0].length
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    suffixes = []
    for row in rows:
        prefix = prefixes[row]
        end = int(torch.nonzero(mask[row]).flatten()[-1]) + 1
        suffixes.append(ids[row, prefix.start + prefix.length : end])
    width = length + max(len(s) for s in suffixes)
    new_ids = torch.full((len(rows), width), int(pad_token_id), dtype=ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for i, (row, suffix) in enumerate(zip(rows, suffixes)):
        prefix = prefixes[row]
        new_ids[i, :length] = ids[row, prefix.start : prefix.start + length]
        new_ids[i, width - len(suffix) :] = suffix
        new_mask[i, :length] = 1
        new_mask[i, width - len(suffix) :] = 1
    device = inputs["input_ids"].device
    call_inputs = {"input_ids": new_ids.to(device), "attention_mask": new_mask.to(device)}
    layout = TokenLayout.from_inputs(call_inputs["input_ids"], call_inputs["attention_mask"], image_token_id)
    n_layers = len(entries[0].key_values)
    kv = [(torch.cat([e.key_values[j][0] for e in entries]), torch.cat([e.key_values[j][1] for e in entries]))
          for j in range(n_layers)]
    cache = DynamicCache(ddp_cache_data=kv, config=model.config)
    counts = pooling_counts(layout, poolings)  # (b, P): the full rows' divisors
    pooled = {}
    for layer in entries[0].sums:
        sums = torch.stack([e.sums[layer] for e in entries])  # (b, 3, d)
        part = torch.zeros(len(rows), len(poolings), sums.shape[-1])
        for p, pooling in enumerate(poolings):
            if pooling in PREFIX_SETS:  # last_token lies after the prefix: no prefix part
                part[:, p] = sums[:, PREFIX_SETS.index(pooling)] / counts[:, p : p + 1]
        pooled[layer] = part
    return SharedCall(call_inputs, cache, layout, SharedPrefix(length, pooled))


def plan_calls(
    prefixes: Sequence[RowPrefix | None], cache: ImagePrefixCache, layers: Sequence[int],
    run_full: Callable[[list[int]], None], run_shared: Callable[[list[int], list[CachedPrefix]], None],
) -> None:
    """Run every row once: first, in one call, the rows whose prefix is new (one per image) or not shareable, which
    keep their prefixes; then, grouped by prefix length, the rows whose prefix is kept (earlier calls or this one).
    Rows whose prefix the budget could not keep run together in one more full call (not one call per image, which
    a budget of one large prefix would otherwise cause)."""
    full: list[int] = []
    seen: set[bytes] = set()
    # asking the cache here also marks the prefixes this batch will use as recent, so the full call's new
    # prefixes evict other images' first; they are asked again after it (it may still have evicted some)
    for row, prefix in enumerate(prefixes):
        if prefix is None or (prefix.key not in seen and cache.get(prefix.key, layers) is None):
            full.append(row)
            if prefix is not None:
                seen.add(prefix.key)
    if full:
        run_full(full)
    ran = set(full)
    found = {row: cache.get(prefixes[row].key, layers) for row in range(len(prefixes)) if row not in ran}
    by_length: dict[int, list[int]] = {}
    for row, entry in found.items():
        if entry is not None:
            by_length.setdefault(entry.length, []).append(row)
    for rows in by_length.values():
        run_shared(rows, [found[row] for row in rows])
        cache.count_hits(len(rows))
    missed = [row for row, entry in found.items() if entry is None]
    if missed:
        run_full(missed)


def image_grouped_batches(samples: Sequence[Any], batch_size: int) -> list[list[list[int]]]:
    """Chunks of batches of sample indices that let questions share image prefixes: each chunk takes up to
    ``batch_size`` images (in order of first appearance): one batch of their first questions, then their other
    questions in batches. Once a chunk is done its prefixes are no longer needed (memory stays flat in the dataset
    size). Grouping reads `image_path` only as a hint: sharing itself is keyed on the processed pixels."""
    by_image: dict[Any, list[int]] = {}
    for index, sample in enumerate(samples):
        by_image.setdefault(getattr(sample, "image_path", index), []).append(index)
    groups = list(by_image.values())
    chunks: list[list[list[int]]] = []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        rest = [index for group in chunk for index in group[1:]]
        chunks.append([[group[0] for group in chunk]] + [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)])
    return chunks
