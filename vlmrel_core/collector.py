"""Python's cyclic garbage collector around one `vlmrel` command: full collections deferred during start-up, none
at exit.

Why: importing torch, transformers and pandas and loading a model leaves well over a million long-lived container
objects, and every full (generation-2) collection walks all of them. During the README `ablate`'s start-up that
happened 7 times (about 1.2 s), and once more when the interpreter exits (about 1.2 s, after the output is
written), without anything there to free. So the `vlmrel` process entry point (`cli.main.cli`):

- `defer_full_collections()` at start: generations 0 and 1 are still collected, so young reference cycles are
  freed as usual; only the walk over everything waits (20 times longer than CPython's default);
- `settle_startup_heap()` when the command's work begins (the CLI calls it as its progress bar opens): what
  start-up created is frozen (`gc.freeze`: later collections skip it, as the CPython documentation suggests for
  long-lived start-up state) and the collector's thresholds are restored;
- `skip_exit_collection()` when the command has returned: everything still alive is frozen, so the interpreter's
  final collection has nothing to walk. Objects are still released by reference counting at exit; what is skipped
  is searching for unreachable cycles, whose finalizers Python does not promise to run at exit anyway (every file
  the CLI writes is closed by a context manager before this).

Calls of `cli.main.main()` inside another process (tests, notebooks) change none of this: `settle_startup_heap`
does nothing unless `defer_full_collections` ran in this process.
"""

from __future__ import annotations

import gc

#: Generation-2 threshold while start-up runs (CPython's default is 10 generation-1 collections): importing torch,
#: transformers and pandas takes ~90 generation-1 collections, so none is full; a command that never settled would
#: still have full collections, 20 times less often, not none.
_DEFERRED_FULL_THRESHOLD = 200

_saved_thresholds: tuple[int, ...] | None = None


def defer_full_collections() -> None:
    """From now until `settle_startup_heap`, full collections wait; the young generations are collected as usual."""
    global _saved_thresholds
    if _saved_thresholds is not None:
        return
    _saved_thresholds = gc.get_threshold()
    gc.set_threshold(*_saved_thresholds[:2], _DEFERRED_FULL_THRESHOLD)


def settle_startup_heap() -> bool:
    """End of start-up: freeze what exists (later full collections skip it) and restore the thresholds; True where
    `defer_full_collections` had run (otherwise nothing is changed)."""
    global _saved_thresholds
    if _saved_thresholds is None:
        return False
    gc.collect(1)  # the young generations first (cheap), so start-up's own garbage cycles are not frozen
    gc.freeze()
    gc.set_threshold(*_saved_thresholds)
    _saved_thresholds = None
    return True


def skip_exit_collection() -> None:
    """Freeze everything alive, so the interpreter's final collection walks nothing (the process is about to exit)."""
    gc.freeze()


__all__ = ["defer_full_collections", "settle_startup_heap", "skip_exit_collection"]
