"""vlmrel: where reliability lives inside a vision-language model."""

__version__ = "0.1.0"
