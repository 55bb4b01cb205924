"""The progress bar a long `vlmrel` command opens when its work begins. Opening it also ends the process's
start-up (`collector.settle_startup_heap`): imports, model and cache loading are done by then in every command."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from vlmrel_core.collector import settle_startup_heap
from vlmrel_core.progress import Progress, tqdm_progress


@contextmanager
def command_progress(desc: str, unit: str = "it") -> Iterator[Progress]:
    """`progress.tqdm_progress` (a terminal bar on stderr), after settling the start-up heap."""
    settle_startup_heap()
    with tqdm_progress(desc, unit=unit) as progress:
        yield progress
