"""Run a function on P local processes joined in a gloo (CPU) process group.

``spawn(fn, world, *args)`` starts ``world`` fresh interpreters (``torch.multiprocessing``
spawn), initialises torch.distributed on each (gloo over TCP on 127.0.0.1, a free port)
and calls ``fn(rank, world, *args)``; it returns every rank's return value in rank
order. A bounded wait: after ``timeout_s`` the processes are killed and it raises, as it
does when any rank raises (with that rank's traceback). Used by the tests,
``dspark-bench verify --tp`` and ``python -m dspark_kernels.loop --tp``; ``fn`` must be
importable (a module-level function).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn, world: int, port: int, result_dir: str, timeout_s: float, threads: int, args) -> None:
    path = os.path.join(result_dir, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        payload = ("ok", value)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        payload = ("error", traceback.format_exc())
    with open(path + ".tmp", "wb") as f:
        pickle.dump(payload, f)
    os.replace(path + ".tmp", path)


def spawn(fn, world: int, *args, timeout_s: float = 120.0, threads: int = 1) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each in its own process."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dspark_spawn_") as result_dir:
        ctx = mp.start_processes(_child, args=(fn, world, free_port(), result_dir, timeout_s, threads, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed.launch.spawn: {fn.__name__} on {world} processes did not "
                                       f"finish within {timeout_s:.0f} s (killed)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            path = os.path.join(result_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"distributed.launch.spawn: rank {rank} exited without a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"distributed.launch.spawn: rank {rank} of {world} raised:\n{value}")
            results.append(value)
        return results
