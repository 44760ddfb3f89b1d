"""Timing and bandwidth ceilings for the benchmarks (docs/performance.md).

Every timed callable takes one argument, the index of the input copy to use
(``fn(i)`` with ``0 <= i < copies``), so that the caller can rotate several
copies of the inputs and keep the working set larger than the cache.

* CPU: ``time.perf_counter`` around each call after a warm-up; the number of
  calls adapts to ``max_time`` unless ``repeat`` is given.
* GPU: CUDA events around each call (launch overhead included, as an engine
  without graphs sees it); for calls under ``graph_threshold_s`` the calls over
  every copy are captured once into a CUDA graph and its replays are timed
  (time per replay / copies), which removes the launch gaps. A callable that
  cannot be captured (a host sync, an unsupported op) silently keeps the event
  timing; ``Timing.method`` says which was used.

Results are medians with the 20th and 80th percentiles as the spread.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable

import torch

DEFAULT_L2_BYTES = 60 * 2**20  # H200: 60 MB (torch reports it as L2_cache_size)


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    n: int
    method: str  # "cpu-perf_counter" | "cuda-events" | "cuda-graph"
    copies: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float], method: str, copies: int = 1) -> Timing:
    s = sorted(samples)
    return Timing(median_s=statistics.median(s), p20_s=_quantile(s, 0.2), p80_s=_quantile(s, 0.8), n=len(s),
                  method=method, copies=copies)


def _num_repeats(estimate_s: float, max_time: float, repeat: int | None, min_repeat: int, max_repeat: int) -> int:
    if repeat is not None:
        return max(1, int(repeat))
    n = int(max_time / max(estimate_s, 1e-9))
    return max(min_repeat, min(max_repeat, n))


def time_cpu(fn: Callable[[int], object], *, copies: int = 1, warmup: int = 1, repeat: int | None = None,
             max_time: float = 1.0, min_repeat: int = 3, max_repeat: int = 200) -> Timing:
    """Median wall time of ``fn(i)`` on the CPU (perf_counter per call)."""
    for i in range(warmup):
        fn(i % copies)
    samples: list[float] = []
    t0 = time.perf_counter()
    fn(0)
    samples.append(time.perf_counter() - t0)
    n = _num_repeats(samples[0], max_time, repeat, min_repeat, max_repeat)
    for r in range(1, n):
        t0 = time.perf_counter()
        fn(r % copies)
        samples.append(time.perf_counter() - t0)
    return summarize(samples, "cpu-perf_counter", copies)


def _events_once(fn: Callable[[int], object], copies: int, n: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for r in range(n):
        starts[r].record()
        fn(r % copies)
        ends[r].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def _graph_samples(fn: Callable[[int], object], copies: int, max_time: float, repeat: int | None,
                   min_repeat: int, max_repeat: int) -> list[float] | None:
    """Per-call times from replays of one graph holding one call per copy; None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs ask
            for i in range(copies):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - any failure means "not capturable"; fall back to events
        torch.cuda.synchronize()
        return None
    first = _events_once(lambda _i: graph.replay(), 1, 3)
    est = statistics.median(first) / copies
    n = _num_repeats(est * copies, max_time, repeat, min_repeat, max_repeat)
    samples = _events_once(lambda _i: graph.replay(), 1, n)
    return [t / copies for t in samples]


def time_cuda(fn: Callable[[int], object], *, copies: int = 1, warmup: int = 2, repeat: int | None = None,
              max_time: float = 0.3, min_repeat: int = 10, max_repeat: int = 2000, graph: str = "auto",
              graph_threshold_s: float = 1e-3) -> Timing:
    """Median device time of ``fn(i)`` (CUDA events, or CUDA-graph replays for short calls).

    ``graph``: "auto" (capture when the event median is under ``graph_threshold_s``),
    "on" (always try) or "off".
    """
    for i in range(max(warmup, copies)):  # every copy once: first-touch, compilation
        fn(i % copies)
    torch.cuda.synchronize()
    est = statistics.median(_events_once(fn, copies, max(3, min(copies, 10))))
    n = _num_repeats(est, max_time, repeat, min_repeat, max_repeat)
    events = summarize(_events_once(fn, copies, n), "cuda-events", copies)
    if graph == "off" or (graph == "auto" and events.median_s >= graph_threshold_s):
        return events
    samples = _graph_samples(fn, copies, max_time, repeat, min_repeat, max_repeat)
    if samples is None:
        return events
    return summarize(samples, "cuda-graph", copies)


def rotation_copies(bytes_per_copy: int, device: torch.device, *, max_copies: int = 32,
                    budget_bytes: int = 2 * 2**30, cache_multiple: float = 3.0) -> int:
    """How many input copies to rotate so the working set is ``cache_multiple`` x the L2.

    GPU only ("when cheap": at most ``max_copies`` and ``budget_bytes`` in all; at
    least 2 copies whenever two fit in the budget). CPU runs use one copy.
    """
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    want = math.ceil(cache_multiple * l2 / max(bytes_per_copy, 1))
    fit = max(1, budget_bytes // max(bytes_per_copy, 1))
    return int(max(1, min(max_copies, fit, max(want, 2))))


def gpu_copy_ceiling(nbytes: int = 2**30, repeat: int = 20) -> dict:
    """Measured device-to-device copy bandwidth: (bytes read + bytes written) / median time."""
    free, _total = torch.cuda.mem_get_info()
    nbytes = int(min(nbytes, free // 4))
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(7)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = statistics.median(_events_once(lambda _i: dst.copy_(src), 1, repeat))
    return {"kind": "gpu-d2d-copy", "bytes": nbytes, "median_s": t, "GBps": 2 * nbytes / t / 1e9}


def cpu_copy_ceiling(nbytes: int = 256 * 2**20, repeat: int = 10) -> dict:
    """Measured CPU memcpy bandwidth (torch copy_ with the same threads as the ops): 2 x bytes / time."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    dst = torch.empty_like(src)
    timing = time_cpu(lambda _i: dst.copy_(src), warmup=2, repeat=repeat)
    return {"kind": "cpu-memcpy", "bytes": nbytes, "median_s": timing.median_s,
            "GBps": 2 * nbytes / timing.median_s / 1e9, "threads": torch.get_num_threads()}


def time_backend(ctx, name: str, fn, inputs: list) -> "Timing":
    """Time ``fn(inputs[i])`` rotating over the input copies: CUDA events (and graphs)
    for GPU backends, perf_counter otherwise; the reference, slow, gets two timed calls
    after the correctness check that served as its warm-up."""
    if ctx.device.type == "cuda" and name != "reference":
        return time_cuda(lambda i: fn(inputs[i]), copies=len(inputs), repeat=ctx.repeat,
                         max_time=ctx.max_time, graph=ctx.graph)

    def sync_call(i):
        out = fn(inputs[i])
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    if name == "reference":
        return time_cpu(sync_call, copies=len(inputs), repeat=ctx.repeat, max_time=ctx.max_time, warmup=0,
                        min_repeat=2)
    return time_cpu(sync_call, copies=len(inputs), repeat=ctx.repeat, max_time=ctx.max_time)
