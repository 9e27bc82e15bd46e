"""Run a function on W spawned processes joined in a torch.distributed group.

The distributed tests' single harness: a gloo group on 127.0.0.1 (CPU, CI) or, with
SAU_TEST_DIST=nccl on a CUDA machine, an NCCL group of one rank per GPU. Each rank's
return value is saved with torch.save and read back with weights_only=True, so results
must be tensors, numbers, strings, lists, tuples and dicts.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def dist_backend() -> str:
    """The group backend: gloo by default, nccl with SAU_TEST_DIST=nccl (needs CUDA)."""
    return os.environ.get("SAU_TEST_DIST", "gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, backend, out_dir, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # No rank tears its connections down while a peer may still be inside a
        # collective: gloo aborts the process (SIGABRT) when that happens. Only on
        # success: after a failure the peers may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that succeeded leaves without the interpreter's finalization: one run in
    # about 15 of the FSDP2 + in-backward test aborted there ("terminate called without
    # an active exception", no Python frame left), after its results were saved. A
    # failing rank never gets here: its exception reaches spawn's error file as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) on `world` spawned processes; returns the results by rank.

    fn must be a module-level function (it is pickled by reference). A failing rank
    fails the call with its traceback.
    """
    backend = dist_backend()
    with tempfile.TemporaryDirectory(prefix="sau-dist-") as out:
        mp.spawn(_entry, args=(world, _free_port(), backend, out, fn, args), nprocs=world)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def count_collectives(fn) -> int:
    """fn() with every all_reduce / all_gather call counted."""
    counts = {"n": 0}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather")}

    def counting(original):
        def wrapper(*args, **kwargs):
            counts["n"] += 1
            return original(*args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(dist, name, counting(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return counts["n"]
