"""argparse value types shared by every `vlmrel` subcommand module (bounded numbers: no K = 100000 runs)."""

from __future__ import annotations

import argparse


def bounded_int(low: int, high: int | None = None):
    """argparse type: an integer in [low, high], refused with the range otherwise (no K = 100000 runs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}" if high is not None
                                             else f"must be at least {low}, got {value}")
        return value

    return parse
