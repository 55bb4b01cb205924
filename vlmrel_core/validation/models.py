"""Model folders from users: weights must be safetensors; a pickle-only folder is refused before loading.

Why: ``pytorch_model.bin`` is a pickle, and unpickling an untrusted file runs code. transformers with
``use_safetensors=True`` would refuse it too, but with an UnpicklingError-style traceback; this says why.
"""

from __future__ import annotations

from pathlib import Path

from vlmrel_core.validation.errors import InputError

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def check_model_folder(source: str | Path) -> None:
    """Refuse a local model folder with no ``*.safetensors`` weights (an HF id or missing path is left to the
    loader, which reports it)."""
    folder = Path(source)
    if not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()] + sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise InputError(f"{folder} holds only pickled weights ({', '.join(sorted(set(pickled)))}); vlmrel never "
                         "unpickles model files. Convert them to safetensors (model.save_pretrained(..., "
                         "safe_serialization=True)) on a machine you trust")
    raise InputError(f"{folder} holds no model weights (*.safetensors)")
