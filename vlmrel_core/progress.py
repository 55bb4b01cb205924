"""Progress reporting that the library, the CLI and the dashboard share.

Every long job in the library takes ``progress: Progress | None`` and calls ``progress(done, total, stage)``.
The library never prints: the CLI passes `tqdm_progress(...)` (a terminal bar), the dashboard passes a callback
that drives ``st.progress`` — the same numbers, two views. ``stage`` names what is being done ("layer 3/8",
"bootstrap"), so a user sees *what* is slow, not only that something is.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int, stage: str = "") -> None: ...


def report(progress: "Progress | None", done: int, total: int, stage: str = "") -> None:
    """Call ``progress`` if there is one (saves every caller an ``if``)."""
    if progress is not None:
        progress(done, total, stage)


def scaled(progress: "Progress | None", start: float, stop: float, total: int = 1000) -> "Progress | None":
    """A callback that maps a sub-job's 0..1 onto ``start..stop`` of a parent bar with ``total`` units.

    Lets a job made of steps (fit probes, then bootstrap, then write) drive one bar from 0 to 100%.
    """
    if progress is None:
        return None

    def sub(done: int, sub_total: int, stage: str = "") -> None:
        fraction = done / sub_total if sub_total else 1.0
        progress(int(round((start + (stop - start) * fraction) * total)), total, stage)

    return sub


@contextmanager
def tqdm_progress(desc: str, unit: str = "it", disable: bool | None = None) -> Iterator[Progress]:
    """A terminal bar as a `Progress` callback (on stderr, so stdout stays machine-readable JSON)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=disable)

    def update(done: int, total: int, stage: str = "") -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        if stage:
            bar.set_postfix_str(stage, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
