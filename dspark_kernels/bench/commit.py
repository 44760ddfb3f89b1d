"""`dspark-bench commit`: kv_commit (KV rollback after verification) against an eager loop.

Cases: cache preset x accepted-path kind x batch size B.

* presets (one kv_commit call moves every cache of the model):
  ``mla``  DeepSeek-V3-like MLA: 61 caches [pages, 64, 576] bf16 (one latent row per
           token per layer, 1152 B), page 64;
  ``gqa``  GQA: 36 layers x (K, V), 72 caches [pages, 16, 8, 128] bf16 (2 KB rows), page 16.
* path kinds over a window of W = γ + 1 = 8 positions, num_accept uniform in [1, W]:
  ``chain`` accept_path = [0, 1, ..., a]: every move is the identity, nothing moves;
            the time is that of a no-op launch;
  ``tree``  accept_path = [0] + an increasing subset of 1..W-1 (e.g. [0, 2, 3, 5]):
            every entry past the first differing one moves.
* committed_len[b] is uniform in [0, page_size), so windows cross page boundaries;
  every request has its own (shuffled) pages.

Bytes (``GB/s`` and ``%ceil`` use this, the fewest bytes the op must move)::

    bytes = 2 · Σ_b (real moves of b) · Σ_caches row_bytes     read + write of each moved row
          + 4·B·(3 + W) + 4·B·⌈(committed_len + W) / page_size⌉ metadata (lengths, path,
                                                                 new_len, block-table entries)

A chain moves no cache bytes (``cache_bytes`` = 0 in the JSON), so its GB/s only
counts the metadata.

Baselines in the same run: ``eager`` is what an engine writes without this op: per
cache ``flat.index_copy_(0, dst, flat.index_select(0, src))`` over all B·W window
entries (entries past num_accept copy a row onto itself), with the slot indices
computed on the device (no host sync); ``reference`` is the per-token Python loop
(timed only when B·W·caches <= --reference-cap). Correctness is checked once per
case before timing: every destination row must hold its source row's old bytes
(and a chain must leave every window row unchanged), for every backend.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

import dspark_kernels

from . import timing
from .report import add_speedups, new_case

NAME = "commit"
HELP = "kv_commit: KV-cache rollback (chains and trees) vs a per-layer eager index_copy_ loop"

OWN = ("cuda", "cpu", "reference")
ALL_BACKENDS = OWN + ("eager",)
KINDS = ("chain", "tree")
WINDOW = 8
REFERENCE_CAP = 20_000
MEMORY_CAP = 8 * 2**30  # bytes of caches at most (input copies are dropped to fit)


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    caches_per_layer: int
    row: tuple[int, ...]
    page_size: int
    dtype: str = "bf16"

    @property
    def num_caches(self) -> int:
        return self.layers * self.caches_per_layer

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row) * 2  # bf16

    def label(self) -> str:
        row = "x".join(map(str, self.row))
        return f"{self.name} {self.num_caches} caches [{row}] {self.dtype} page {self.page_size}"


PRESETS = {
    "mla": Preset("mla", 61, 1, (576,), 64),
    "gqa": Preset("gqa", 36, 2, (8, 128), 16),
}
QUICK_PRESETS = {
    "quick-mla": Preset("quick-mla", 4, 1, (64,), 16),
    "quick-gqa": Preset("quick-gqa", 3, 2, (2, 16), 4),
}
DEFAULT_BATCHES_GPU = (1, 16, 64, 256)
DEFAULT_BATCHES_CPU = (1, 16, 64)
QUICK_BATCHES = (1, 4)


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), help="cache presets (default: all)")
    p.add_argument("--kind", nargs="+", choices=KINDS, help="accepted-path kinds (default: both)")
    p.add_argument("--batch", type=int, nargs="+", metavar="B",
                   help=f"batch sizes (default {list(DEFAULT_BATCHES_GPU)} on GPU, {list(DEFAULT_BATCHES_CPU)} on CPU)")
    p.add_argument("--window", type=int, default=WINDOW, metavar="W", help="verify window W = γ + 1 (default 8)")
    p.add_argument("--backend", nargs="+", choices=ALL_BACKENDS, metavar="NAME",
                   help=f"implementations to time: {', '.join(ALL_BACKENDS)} (default: every one that runs here)")
    p.add_argument("--reference-cap", type=float, default=REFERENCE_CAP,
                   help="time the reference only when B*W*caches is at most this (default %(default).0f)")


# --------------------------------------------------------------------------- inputs


def make_inputs(preset: Preset, kind: str, batch: int, W: int, device: torch.device, seed: int,
                copies: int) -> dict:
    """Caches holding `copies` disjoint page sets (one block table per copy) and the paths."""
    rng = random.Random(seed)
    ps = preset.page_size
    pages_per_req = (ps - 1 + W + ps - 1) // ps
    num_pages = copies * batch * pages_per_req
    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(num_pages, generator=gen).view(copies, batch, pages_per_req)
    committed = torch.tensor([rng.randrange(ps) for _ in range(batch)], dtype=torch.int32)
    counts, paths = [], []
    for _ in range(batch):
        n = rng.randint(1, W)
        path = list(range(n)) if kind == "chain" else [0] + sorted(rng.sample(range(1, W), n - 1))
        counts.append(n)
        paths.append(path + [-1] * (W - n))
    caches = []
    for _ in range(preset.num_caches):
        c = torch.empty((num_pages, ps, *preset.row), dtype=torch.bfloat16, device=device)
        c.view(torch.int16).random_(-(2**15), 2**15 - 1)  # random bits (some NaNs: bytes are compared)
        caches.append(c)
    return {
        "preset": preset, "kind": kind, "batch": batch, "W": W, "copies": copies,
        "caches": caches,
        "block_tables": [perm[i].to(torch.int32).to(device) for i in range(copies)],
        "page_size": ps,
        "committed_len": committed.to(device),
        "accept_path": torch.tensor(paths, dtype=torch.int32).to(device),
        "num_accept": torch.tensor(counts, dtype=torch.int32).to(device),
    }


def real_moves(inp: dict) -> int:
    path, n = inp["accept_path"].cpu(), inp["num_accept"].cpu()
    j = torch.arange(inp["W"])
    return int(((j[None, :] < n[:, None]) & (path != j[None, :])).sum())


def cache_bytes(inp: dict) -> int:
    return 2 * real_moves(inp) * inp["preset"].num_caches * inp["preset"].row_bytes


def min_bytes(inp: dict) -> int:
    B, W, ps = inp["batch"], inp["W"], inp["page_size"]
    L = inp["committed_len"].cpu().to(torch.int64)
    table_entries = int(((L + W + ps - 1) // ps).sum())
    return cache_bytes(inp) + 4 * B * (3 + W) + 4 * table_entries


# --------------------------------------------------------------------------- runners


def own_runner(name: str, inp: dict):
    def run(i: int):
        return dspark_kernels.kv_commit(inp["caches"], inp["block_tables"][i], inp["page_size"],
                                        inp["committed_len"], inp["accept_path"], inp["num_accept"], backend=name)
    return run


def eager_runner(inp: dict):
    """Per-cache gather + index_copy_ over all B·W window entries; indices on the device."""
    ps, W = inp["page_size"], inp["W"]
    flats = [c.view(c.shape[0] * c.shape[1], -1) for c in inp["caches"]]
    L = inp["committed_len"].to(torch.int64)[:, None]
    path = inp["accept_path"].to(torch.int64)
    n = inp["num_accept"].to(torch.int64)[:, None]
    j = torch.arange(W, device=L.device)[None, :]

    def run(i: int):
        bt = inp["block_tables"][i].to(torch.int64)
        src_pos = torch.where(j < n, L + path, L + j)  # past num_accept: a row onto itself
        dst_pos = (L + j).expand_as(src_pos)

        def slot(pos):
            return (bt.gather(1, pos // ps) * ps + pos % ps).flatten()

        src, dst = slot(src_pos), slot(dst_pos)
        for flat in flats:
            flat.index_copy_(0, dst, flat.index_select(0, src))
        return (L[:, 0] + n[:, 0]).to(torch.int32)
    return run


def _snapshot(inp: dict, i: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the bytes every window row must hold after the commit, per cache), dst slots, src slots."""
    ps, W = inp["page_size"], inp["W"]
    bt = inp["block_tables"][i].to(torch.int64)
    L = inp["committed_len"].to(torch.int64)[:, None]
    j = torch.arange(W, device=bt.device)[None, :]
    n = inp["num_accept"].to(torch.int64)[:, None]
    src_pos = torch.where(j < n, L + inp["accept_path"].to(torch.int64), L + j)
    dst_pos = (L + j).expand_as(src_pos)
    src = (bt.gather(1, src_pos // ps) * ps + src_pos % ps).flatten()
    dst = (bt.gather(1, dst_pos // ps) * ps + dst_pos % ps).flatten()
    expect = [c.view(-1, math.prod(c.shape[2:])).view(torch.int16)[src].clone() for c in inp["caches"]]
    return expect, dst, src


def check(run, inp: dict) -> bool:
    """Run once on copy 0; every window row must hold its source's old bytes (chains: unchanged)."""
    expect, dst, _ = _snapshot(inp, 0)
    new_len = run(0)
    if inp["caches"][0].device.type == "cuda":
        torch.cuda.synchronize()
    if not torch.equal(new_len.cpu(), (inp["committed_len"] + inp["num_accept"]).cpu().to(torch.int32)):
        return False
    return all(torch.equal(c.view(-1, math.prod(c.shape[2:])).view(torch.int16)[dst], e)
               for c, e in zip(inp["caches"], expect))


# --------------------------------------------------------------------------- driver


def _plan(args, device: torch.device):
    if args.quick:
        presets = list(QUICK_PRESETS.values())
        batches = list(args.batch or QUICK_BATCHES)
    else:
        presets = [PRESETS[p] for p in (args.preset or sorted(PRESETS))]
        batches = list(args.batch or (DEFAULT_BATCHES_GPU if device.type == "cuda" else DEFAULT_BATCHES_CPU))
    kinds = list(args.kind or KINDS)
    return presets, kinds, sorted(set(batches))


def _availability(name: str, device: torch.device, work: int, cap: float) -> tuple[str, str] | None:
    if name == "eager":
        return None
    if name == "cuda" and device.type != "cuda":
        return "n/a", "needs a CUDA device"
    if name == "cpu" and device.type != "cpu":
        return "n/a", "cpu backend runs on CPU tensors (use --device cpu)"
    if not dspark_kernels.backends("kv_commit").get(name, False):
        return "n/a", "backend not available here (not built)"
    if name == "reference" and work > cap:
        return "skipped", f"reference too slow: B*W*caches = {work:.2g} > {cap:.0f}"
    return None


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:160]


def run(args, ctx) -> list[dict]:
    device = ctx.device
    presets, kinds, batches = _plan(args, device)
    names = list(dict.fromkeys(args.backend)) if args.backend else (
        ["cuda", "reference", "eager"] if device.type == "cuda" else ["cpu", "reference", "eager"])
    ceiling = ctx.ceiling_GBps()
    cases: list[dict] = []
    progress = ctx.progress(len(presets) * len(kinds) * len(batches), NAME)
    seed = args.seed
    for preset in presets:
        for kind in kinds:
            for batch in batches:
                progress.step(f"{preset.name} {kind} B={batch}")
                seed += 1
                try:
                    cases += _run_case(args, ctx, preset, kind, batch, names, ceiling, seed)
                except torch.cuda.OutOfMemoryError as exc:
                    torch.cuda.empty_cache()
                    cases.append(new_case(op=NAME, group=f"{preset.label()} · {kind}", preset=preset.name,
                                          batch=batch, backend="*", status="error", note=_short(exc)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    progress.close()
    return cases


def _run_case(args, ctx, preset: Preset, kind: str, batch: int, names: list[str], ceiling, seed: int) -> list[dict]:
    device = ctx.device
    W = args.window
    pages_per_req = (preset.page_size - 1 + W + preset.page_size - 1) // preset.page_size
    copy_bytes = batch * pages_per_req * preset.page_size * preset.row_bytes * preset.num_caches
    touched = 2 * batch * W * preset.row_bytes * preset.num_caches
    copies = timing.rotation_copies(touched, device)
    copies = max(1, min(copies, MEMORY_CAP // max(copy_bytes, 1)))
    inp = make_inputs(preset, kind, batch, W, device, seed, copies)
    base = dict(op=NAME, group=f"{preset.label()} · {kind} W={W}", preset=preset.name, batch=batch, gamma=W - 1,
                dtype=preset.dtype, mode=kind, bytes=min_bytes(inp), cache_bytes=cache_bytes(inp),
                moves=real_moves(inp), copies=copies,
                mean_accepted=float(inp["num_accept"].float().mean()) - 1.0)
    work = batch * W * preset.num_caches
    cases = []
    for name in names:
        case = new_case(**base, backend=name)
        cases.append(case)
        why = _availability(name, device, work, args.reference_cap)
        if why is not None:
            case["status"], case["note"] = why
            continue
        fn = eager_runner(inp) if name == "eager" else own_runner(name, inp)
        try:
            case["correct"] = check(fn, inp)  # from whatever bytes the caches hold: self-contained
            t = _time(ctx, name, fn, copies)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
            case["status"], case["note"] = "error", _short(exc)
            continue
        note = ""
        if kind == "chain" and name != "eager":
            note = "chain: moves no cache bytes" + (" (a no-op launch)" if name == "cuda" else "")
        if name == "eager":
            note = "index_copy_ of all B·W entries per cache"
        case.update(status="ok", note=note, median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                    method=t.method, copies=t.copies)
        case["GBps"] = base["bytes"] / t.median_s / 1e9
        case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None
    add_speedups(cases)
    return cases


def _time(ctx, name: str, fn, copies: int) -> timing.Timing:
    if ctx.device.type == "cuda" and name != "reference":
        return timing.time_cuda(fn, copies=copies, repeat=ctx.repeat, max_time=ctx.max_time, graph=ctx.graph)

    def sync_call(i):
        out = fn(i)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    if name == "reference":
        return timing.time_cpu(sync_call, copies=copies, repeat=ctx.repeat, max_time=ctx.max_time, warmup=0,
                               min_repeat=2)
    return timing.time_cpu(sync_call, copies=copies, repeat=ctx.repeat, max_time=ctx.max_time)
