"""Load a VLM exactly as a real checkpoint is loaded: Auto classes, a local path or an HF cache id, offline-safe.

Why one loader: the embedded demo models and a user's LLaVA/PaliGemma/Qwen2-VL/SmolVLM checkpoint go through the
same code, so what the tests exercise is what production runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmrel_core.engine.adapters import AnswerTokens, VLMAdapter, adapter_for_model_type

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


class ModelLoadError(RuntimeError):
    """A model path or id that cannot be loaded, with the reason in words."""


@dataclass
class LoadedVLM:
    """A model with its processor, adapter and fingerprint. `processor_lock` serialises tokenizer calls:
    HF fast tokenizers raise "Already borrowed" when one instance is used from several threads at once."""

    model: nn.Module
    processor: Any
    adapter: VLMAdapter
    source: str
    fingerprint: str
    attn_implementation: str
    dtype: str
    processor_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @functools.cached_property
    def answer_tokens(self) -> AnswerTokens:
        """The family's yes/no token set for this tokenizer, computed once (not on every batch)."""
        with self.processor_lock:
            return self.adapter.answer_tokens(self.tokenizer)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and of every parameter's name, shape and checksum: identifies the weights a probe was
    trained on without hashing gigabytes of raw bytes."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            digest.update(f"{name}:{tuple(param.shape)}:{float(param.double().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def resolve_dtype(dtype: DtypeName, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto, float32, float16 or bfloat16")
    return DTYPES[dtype]


def load_vlm(
    source: str | Path,
    device: str = "cpu",
    dtype: DtypeName = "auto",
    attn_implementation: str = "eager",
    device_map: str | None = None,
) -> LoadedVLM:
    """Load model + processor + adapter from a local directory or an HF id already in the local cache.

    `attn_implementation="eager"` is the default because attention maps need it; pass "sdpa" for speed when no
    attention is asked for (recorded in every run manifest). `device_map="auto"` shards a large model with accelerate.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmrel_core.validation.models import check_model_folder

    source = str(source)
    check_model_folder(source)  # safetensors only: a pickle-only folder is refused with the reason, not unpickled
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        hint = "" if Path(source).exists() else " (not a local directory; is it in the HF cache? no hub is reachable offline)"
        raise ModelLoadError(f"cannot read a model config from {source!r}{hint}: {err}") from err
    adapter = adapter_for_model_type(config.model_type)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation, "use_safetensors": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model weights from {source!r}: {err}") from err
    if not device_map:
        model = model.to(device)
    model.eval()
    processor = adapter.load_processor(source)
    return LoadedVLM(
        model=model,
        processor=processor,
        adapter=adapter,
        source=source,
        fingerprint=model_fingerprint(model),
        attn_implementation=attn_implementation,
        dtype=str(torch_dtype).replace("torch.", ""),
    )
