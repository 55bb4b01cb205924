"""Family adapters, chosen by `config.model_type`."""

from __future__ import annotations

from typing import Any

from vlmrel_core.engine.adapters.base import AdapterError, AnswerTokens, VLMAdapter
from vlmrel_core.engine.answers import normalize_answer
from vlmrel_core.engine.adapters.idefics3 import Idefics3Adapter
from vlmrel_core.engine.adapters.llava import LlavaAdapter
from vlmrel_core.engine.adapters.paligemma import PaliGemmaAdapter
from vlmrel_core.engine.adapters.qwen2_vl import Qwen2VLAdapter

_ADAPTERS: tuple[type[VLMAdapter], ...] = (LlavaAdapter, PaliGemmaAdapter, Qwen2VLAdapter, Idefics3Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in _ADAPTERS for t in a.model_types)


def adapter_for_model_type(model_type: str) -> VLMAdapter:
    for adapter_cls in _ADAPTERS:
        if model_type in adapter_cls.model_types:
            return adapter_cls()
    raise AdapterError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


def get_adapter(model: Any) -> VLMAdapter:
    return adapter_for_model_type(getattr(model.config, "model_type", "<missing>"))


__all__ = [
    "AdapterError",
    "AnswerTokens",
    "VLMAdapter",
    "adapter_for_model_type",
    "get_adapter",
    "normalize_answer",
    "supported_model_types",
]
