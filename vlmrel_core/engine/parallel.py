"""Data-parallel extraction: N processes (ranks) split one dataset and write one run folder.

Why this shape: each rank owns a contiguous block of the dataset and writes only its own shards and per-rank
manifest, so ranks never contend for a file and a rank that dies loses nothing it finished; after a barrier,
rank 0 merges the per-rank manifests into the folder's one manifest (rank order = dataset order, so the merged run
equals a single-process run row for row). The ranks come from the environment `accelerate launch` / `torchrun`
set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `launch_ranks` sets the same for `--num-processes N`.
Synchronisation is a gloo group on CPU tensors, whatever device the model runs on.

Locking: every rank holds the folder's ``.lock`` shared (a single-process extraction takes it exclusively, so the
two exclude each other) and its own ``.lock.rankNNN`` exclusively (a second job with the same ranks is refused).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlmrel_core.engine.store import LOCK, RunInUseError

BARRIER_TIMEOUT = datetime.timedelta(hours=12)  # the final barrier waits for the slowest rank's whole share


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job, with the collectives extraction needs."""

    rank: int
    world_size: int
    group: Any = None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def all_true(self, value: bool) -> bool:
        """True on every rank only if ``value`` is true on every rank (so all ranks fail together, none hangs)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if value else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def block(self, n: int, align: int = 1) -> slice:
        """This rank's contiguous share of n items: whole units of ``align`` items (the last may be short), the
        numbers of units differing by at most one. ``align`` keeps e.g. a gate's tumbling windows inside one rank."""
        if align < 1:
            raise ValueError(f"align must be >= 1, got {align}")
        units = -(-n // align)
        start = units * self.rank // self.world_size * align
        stop = units * (self.rank + 1) // self.world_size * align
        return slice(min(start, n), min(stop, n))


def from_environment() -> DataParallel | None:
    """The data-parallel context a launcher set up, or None in an ordinary single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=BARRIER_TIMEOUT)
        group = None
    else:  # the caller's group may be NCCL: collectives here use CPU tensors, so they get their own gloo group
        group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    return DataParallel(rank=rank, world_size=world_size, group=group)


def _lock_fd(path: Path, mode: int) -> int | None:
    """An fd holding ``mode`` on ``path``'s current file, or None if another process holds a conflicting lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was replaced between open and lock: lock the current one


@contextmanager
def rank_lock(run_dir: str | Path, rank: int) -> Iterator[None]:
    """Hold the folder's lock shared and this rank's lock exclusively, or raise `RunInUseError` at once."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shared = _lock_fd(run_dir / LOCK, fcntl.LOCK_SH)
    if shared is None:
        raise RunInUseError(f"{run_dir} is in use by a single-process extraction; wait for it or choose another --out")
    own_path = run_dir / f"{LOCK}.rank{rank:03d}"
    own = _lock_fd(own_path, fcntl.LOCK_EX)
    if own is None:
        os.close(shared)
        raise RunInUseError(f"{run_dir} is in use by another data-parallel extraction (rank {rank} is taken)")
    try:
        os.ftruncate(own, 0)
        os.write(own, f"{os.getpid()} {time.time():.0f}\n".encode())
        yield
    finally:
        own_path.unlink(missing_ok=True)
        os.close(own)
        os.close(shared)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def argv_without_num_processes(argv: Sequence[str]) -> list[str]:
    """The command line each rank runs: the same, minus --num-processes (the environment says the rank)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out


def launch_ranks(argv: Sequence[str], num_processes: int, poll_seconds: float = 0.2) -> int:
    """Run ``python -m vlmrel_core.cli.main *argv`` as ``num_processes`` ranks on this machine (gloo, CPU).

    If one rank fails or is killed, the others are stopped (their finished shards stay, as with `accelerate
    launch`), and the first non-zero exit status is returned: run the same command again to resume.
    """
    env = dict(os.environ, WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [
        subprocess.Popen([sys.executable, "-m", "vlmrel_core.cli.main", *argv],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(num_processes)))
        for r in range(num_processes)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                return failed[0] if failed[0] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        return 130
