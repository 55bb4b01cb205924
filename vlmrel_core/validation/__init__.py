"""Validation of everything a user hands vlmrel: parsed once into validated values, refused with `InputError`.

images: pixel cap read from the header, bombs, truncated / animated / CMYK / 16-bit / alpha images.
questions: empty, control characters, length in characters and tokens, non-UTF-8, special-token text.
yaml_safe: size cap, no anchors/aliases, no duplicate keys.   paths: confinement to a bundle / data folder,
JSON files read with the file named.   models: safetensors-only model folders.
"""

from vlmrel_core.validation.errors import InputError

__all__ = ["InputError"]
