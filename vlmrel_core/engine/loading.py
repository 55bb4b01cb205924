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
from vlmrel_core.engine.prefix_sharing import ImagePrefixCache, configured_max_bytes

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
    # prompt prefixes of recent images (`prefix_sharing`), for the one-question paths (Inspect, the gate): a second
    # question about an image runs only its own tokens; shared by every session using this model (thread-safe)
    prefix_cache: ImagePrefixCache = field(default_factory=lambda: ImagePrefixCache(configured_max_bytes()), repr=False)

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Greedy answers through `engine.greedy` (the same tokens as `generate`, without its per-call setup)."""
        from vlmrel_core.engine.greedy import plain_greedy_supported

        return plain_greedy_supported(self.model, self.adapter)

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


def hf_cache_dir() -> Path:
    """The HF hub cache this process reads (honours HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_source(source: str | Path) -> Path:
    """The local folder to load ``source`` from: the folder itself, or the cached snapshot of an HF id.

    Why before loading: an unknown path otherwise costs ~25 s of hub retries (offline) before a confusing error;
    this answers at once, offline, and names both places that were looked in.
    """
    text = str(source)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"model folder {folder} holds no config.json; is it a transformers checkpoint?")
        return folder
    if folder.exists():
        raise ModelLoadError(f"model path {folder} is a file; expected a model folder or an HF id")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(repo_id=text, filename="config.json")
    except HFValidationError:
        cached = None  # not even a valid repo id (e.g. a path): only the local-folder reading applies
    if isinstance(cached, str):
        return Path(cached).parent
    raise ModelLoadError(
        f"model {text!r} not found: no local folder {folder.resolve()}, and not in the HF cache at {hf_cache_dir()} "
        "(nothing is downloaded; fetch it first with `huggingface-cli download`)"
    )


def load_vlm(
    source: str | Path,
    device: str = "cpu",
    dtype: DtypeName = "auto",
    attn_implementation: str = "eager",
    device_map: str | None = None,
) -> LoadedVLM:
    """Load model + processor + adapter from a local directory or an HF id already in the local cache.

    Never touches the network: an id is resolved to its cached snapshot folder first (`resolve_model_source`) and
    every file is read with ``local_files_only=True``. `attn_implementation="eager"` is the default because
    attention maps need it; pass "sdpa" for speed when no attention is asked for (recorded in every run manifest).
    `device_map="auto"` shards a large model with accelerate.
    """
    source = str(source)
    folder = resolve_model_source(source)  # before importing transformers: a bad path answers in milliseconds
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmrel_core.validation.models import check_model_folder

    check_model_folder(folder)  # safetensors only: a pickle-only folder is refused with the reason, not unpickled
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the model config in {folder}: {err}") from err
    adapter = adapter_for_model_type(config.model_type)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype, "attn_implementation": attn_implementation, "local_files_only": True, "use_safetensors": True,
    }
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model weights from {folder}: {err}") from err
    if not device_map:
        model = model.to(device)
    model.eval()
    processor = adapter.load_processor(str(folder))
    return LoadedVLM(
        model=model,
        processor=processor,
        adapter=adapter,
        source=source,
        fingerprint=model_fingerprint(model),
        attn_implementation=attn_implementation,
        dtype=str(torch_dtype).replace("torch.", ""),
    )
