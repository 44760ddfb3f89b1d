"""`dspark-bench verify`: verify_block against eager PyTorch, the reference and the anchors.

Cases: every preset (vocabulary) x batch size B x γ x dtype x mode, where mode is

* ``greedy``              temperature None: accept while x == argmax p;
* ``sample-pointmass``    T = 1, no draft distribution (q = one-hot at the draft);
* ``sample-draft-logits`` T = 1, q = softmax(draft_logits) (same dtype as the target);
* ``sample-draft-probs``  T = 1, q = draft_probs (float32, as engines hold them).

Inputs are built so that the first rejection lands mid-block: every target row
has a peak token of probability about 0.75 over a N(0, 1) tail; the draft row is
the target row plus N(0, 0.5²) noise with its peak at about 0.9, and the drafts are
sampled from the draft row. Per position that accepts about 0.9 (greedy), 0.8
(draft logits/probs) and 0.7 (point mass); the table's ``acc`` column is the mean
number of accepted drafts per request measured on these inputs.

``--method block`` adds, for every case, the same inputs verified with
``method="block"`` (block verification, docs/verification.md#block-verification) on
our backends, in the same run: its group is labelled ``method=block`` and its note
gives the mean accepted length and the time against token-wise on the same backend.

``--tree`` adds, for every token-wise case, a draft tree of depth γ
(``--tree-branch K``: K children per node at each of the first two levels, a chain
after; ``K1,K2,…`` per level) verified with ``verify_tree``, and the chain of the
same number of verified tokens (γ = the tree's node count) verified with
verify_block, both in the same run as the chain of the same depth (the case
itself). The tree uses the same input model: every window row (the root and each
node) has a target row and a draft row as above; a node's children come from its
draft row: in the greedy and point-mass modes ``K`` distinct tokens sampled
without replacement (the Gumbel top-K, so the first child has exactly the chain
draft's law), verified as point masses; in the draft-logits / draft-probs modes ``K``
i.i.d. samples with that row as each child's q (the lossless configurations,
docs/verification.md#verification-of-draft-trees-verify_tree). The
tree group's notes give the mean accepted length and the time against both chains
on the same backend.

Correctness is checked once per case before timing, on integer outputs:
every backend against the reference on the whole batch when the reference is
cheap (``B·(γ+1)·V <= --reference-cap``), else against the cpu backend (on CPU
copies of the inputs); and, at the first batch size of each case group, against
the reference on a one-request slice (valid because results do not depend on
batch composition). Eager and the anchors use torch's RNG, not our Philox
streams: their greedy outputs must match ours, sampled outputs are not compared.

Bytes (the fewest an op must move; ``GB/s`` and ``%ceil`` use this)::

    bytes_min = (N + B)·V·s_t                  every target row read once
              + N·V·s_d                        draft_logits / draft_probs, if given
              + 4N + 4(B+1) + 16B (+4B)        draft ids, cu offsets, seed+offset (+temperature)
              + 4B(γ+1) + 4B                   output_tokens, num_accepted

with ``N = B·γ``, ``s_t``/``s_d`` the element sizes. The lazy kernels read only
the rows up to the first rejection (and the sampled row again for its race), so
they may move less: ``bytes_lazy`` (JSON only) counts ``Σ_b (a_b + 1)`` target rows
and ``Σ_b min(a_b + 1, n_b)`` draft rows for the measured accept counts ``a_b``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import dspark_kernels

from . import timing
from .baselines import Unavailable, eager_verify_block, flashinfer_chain, vllm_rejection
from .presets import DEFAULT_BATCHES, DEFAULT_GAMMA, DTYPES, QUICK_BATCHES, QUICK_VOCAB, VOCAB_PRESETS
from .report import add_speedups, new_case

NAME = "verify"
HELP = "verify_block: lossless batched acceptance, vs eager PyTorch, the reference and the anchors"

MODES = ("greedy", "sample-pointmass", "sample-draft-logits", "sample-draft-probs")
DEFAULT_MODES = ("greedy", "sample-pointmass", "sample-draft-logits")
OWN = ("cuda", "triton", "cpu", "reference")
BASELINES = ("eager", "flashinfer", "vllm")
ALL_BACKENDS = OWN + BASELINES
REFERENCE_CAP = 2e6
VERIFY_METHODS = ("token", "block")

# Input model (see the module docstring).
TARGET_PEAK = 0.75
DRAFT_PEAK = 0.9
DRAFT_NOISE = 0.5


def add_arguments(p) -> None:
    p.add_argument("--preset", nargs="+", choices=sorted(VOCAB_PRESETS), metavar="NAME",
                   help=f"vocabulary presets (default: all): {', '.join(f'{k}={v}' for k, v in VOCAB_PRESETS.items())}")
    p.add_argument("--vocab", type=int, nargs="+", metavar="V", help="custom vocabulary sizes (added to --preset)")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help=f"batch sizes (default {list(DEFAULT_BATCHES)})")
    p.add_argument("--gamma", type=int, nargs="+", metavar="G", help=f"drafts per request (default {DEFAULT_GAMMA})")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                   help="target logits dtype (default fp32 on CPU, bf16 on GPU)")
    p.add_argument("--mode", nargs="+", choices=MODES + ("all",), help=f"(default {' '.join(DEFAULT_MODES)})")
    p.add_argument("--backend", nargs="+", choices=ALL_BACKENDS, metavar="NAME",
                   help=f"implementations to time: {', '.join(ALL_BACKENDS)} (default: every one that runs here)")
    p.add_argument("--method", nargs="+", choices=VERIFY_METHODS,
                   help="verification method (default token); block also runs token-wise on the same inputs")
    p.add_argument("--tree", action="store_true",
                   help="also verify a draft tree of depth γ with verify_tree against the chains of the same "
                        "depth and of the same number of verified tokens, in the same run")
    p.add_argument("--tree-branch", default="2", metavar="K",
                   help="tree children per node at each of the first two levels (default 2), or K1,K2,... per level")
    p.add_argument("--tp", type=int, metavar="P",
                   help="vocabulary-parallel: P gloo processes on the CPU, distributed.verify_block on the shards "
                        "against all-gather + verify_block, time and bytes per call (bench/verify_tp.py)")
    p.add_argument("--reference-cap", type=float, default=REFERENCE_CAP,
                   help="time the reference only when B*(γ+1)*V is at most this (default %(default).0e)")


@dataclass(frozen=True)
class Group:
    preset: str
    vocab: int
    gamma: int
    dtype: str
    mode: str
    method: str = "token"  # verify_block's method

    def label(self) -> str:
        tail = "" if self.method == "token" else f" method={self.method}"
        return f"{self.preset} V={self.vocab} γ={self.gamma} {self.dtype} {self.mode}{tail}"


def plan(args, device: torch.device) -> tuple[list[Group], list[int]]:
    if args.quick:
        presets = [("quick", QUICK_VOCAB)]
        batches = list(args.batch or QUICK_BATCHES)
        modes = list(args.mode or MODES)
    else:
        presets = [(p, VOCAB_PRESETS[p]) for p in (args.preset or ([] if args.vocab else list(VOCAB_PRESETS)))]
        batches = list(args.batch or DEFAULT_BATCHES)
        modes = list(args.mode or DEFAULT_MODES)
    presets += [(f"custom-{v}", v) for v in (args.vocab or [])]
    if "all" in modes:
        modes = list(MODES)
    gammas = list(args.gamma or [DEFAULT_GAMMA])
    dtypes = list(args.dtype or (["bf16"] if device.type == "cuda" else ["fp32"]))
    methods = ["token", "block"] if "block" in (getattr(args, "method", None) or ()) else ["token"]
    groups = [Group(p, v, g, dt, m, vm) for (p, v) in presets for g in gammas for dt in dtypes for m in modes
              for vm in methods]
    return groups, sorted(set(batches))


# --------------------------------------------------------------------------- inputs


def make_inputs(group: Group, batch: int, device: torch.device, seed: int) -> dict:
    """Inputs of one case (see the module docstring for the distribution)."""
    B, g, V = batch, group.gamma, group.vocab
    N, T = B * g, B * g + B
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(T, V, generator=gen, device=device)
    rows = torch.arange(T, device=device)
    peak = torch.randint(0, V, (T,), generator=gen, device=device)
    tail = math.log(V) + 0.5                       # log E[sum over the tail of e^z]
    boost_t = math.log(TARGET_PEAK / (1 - TARGET_PEAK)) + tail
    z[rows, peak] = boost_t
    req = torch.arange(B, device=device).repeat_interleave(g)
    tgt_row = torch.arange(N, device=device) + req
    d = z[tgt_row] + DRAFT_NOISE * torch.randn(N, V, generator=gen, device=device)
    boost_d = math.log(DRAFT_PEAK / (1 - DRAFT_PEAK)) + tail + DRAFT_NOISE**2 / 2
    d[torch.arange(N, device=device), peak[tgt_row]] = boost_d
    u = torch.rand(N, V, generator=gen, device=device).clamp_(min=1e-20)
    drafts = torch.argmax(d - torch.log(-torch.log(u)), dim=-1).to(torch.int32)  # x ~ softmax(d)
    del u
    dtype = DTYPES[group.dtype]
    sampling = group.mode != "greedy"
    inputs = {
        "batch": B, "gamma": g, "vocab": V, "num_draft": N, "max_num_draft": g,
        "target_logits": z.to(dtype),
        "draft_tokens": drafts,
        "cu_num_draft": (torch.arange(B + 1, device=device) * g).to(torch.int32),
        "draft_logits": d.to(dtype) if group.mode == "sample-draft-logits" else None,
        "draft_probs": torch.softmax(d, dim=-1) if group.mode == "sample-draft-probs" else None,
        "temperature": torch.ones(B, device=device) if sampling else None,
        "seed": torch.arange(B, device=device, dtype=torch.int64) + 7919 * seed,
        "offset": torch.randint(0, 2**20, (B,), generator=gen, device=device, dtype=torch.int64),
    }
    return inputs


_BIG = ("target_logits", "draft_logits", "draft_probs")


def input_bytes(inp: dict) -> int:
    return sum(inp[k].numel() * inp[k].element_size() for k in _BIG if inp.get(k) is not None)


def rotate(inp: dict, copies: int) -> list[dict]:
    """``copies`` input sets with their own copies of the large tensors (same values)."""
    out = [inp]
    for _ in range(copies - 1):
        c = dict(inp)
        for k in _BIG:
            if inp.get(k) is not None:
                c[k] = inp[k].clone()
        out.append(c)
    return out


def slice_first_request(inp: dict) -> dict:
    g = inp["gamma"]
    s = dict(inp, batch=1, num_draft=g)
    s["target_logits"] = inp["target_logits"][: g + 1]
    s["draft_tokens"] = inp["draft_tokens"][:g]
    s["cu_num_draft"] = inp["cu_num_draft"][:2]
    for k in ("draft_logits", "draft_probs"):
        s[k] = inp[k][:g] if inp.get(k) is not None else None
    for k in ("temperature", "seed", "offset"):
        s[k] = inp[k][:1] if inp.get(k) is not None else None
    return s


def to_cpu(inp: dict) -> dict:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def _row_bytes(inp: dict) -> tuple[int, int]:
    """Bytes of one target row and of one draft-distribution row (0 without one)."""
    V = inp["vocab"]
    draft = sum(V * inp[k].element_size() for k in ("draft_logits", "draft_probs") if inp.get(k) is not None)
    return V * inp["target_logits"].element_size(), draft


def _small_bytes(inp: dict) -> int:
    B, N, M = inp["batch"], inp["num_draft"], inp["max_num_draft"]
    total = 4 * N + 4 * (B + 1) + 16 * B + (4 * B if inp.get("temperature") is not None else 0)
    return total + 4 * B * (M + 1) + 4 * B


def min_bytes(inp: dict) -> int:
    """The fewest bytes verify_block must move (module docstring)."""
    target_row, draft_row = _row_bytes(inp)
    return (inp["num_draft"] + inp["batch"]) * target_row + inp["num_draft"] * draft_row + _small_bytes(inp)


def lazy_bytes(inp: dict, num_accepted: torch.Tensor) -> int:
    """Bytes a lazy kernel must move given the accept counts (module docstring)."""
    a = num_accepted.cpu().to(torch.int64)
    n = (inp["cu_num_draft"][1:] - inp["cu_num_draft"][:-1]).cpu().to(torch.int64)
    target_row, draft_row = _row_bytes(inp)
    return int((a + 1).sum()) * target_row + int(torch.minimum(a + 1, n).sum()) * draft_row + _small_bytes(inp)


# --------------------------------------------------------------------------- runners


def own_runner(name: str, method: str = "token"):
    def run(inp: dict):
        return dspark_kernels.verify_block(
            inp["target_logits"], inp["draft_tokens"], inp["cu_num_draft"], draft_logits=inp["draft_logits"],
            draft_probs=inp["draft_probs"], temperature=inp["temperature"], seed=inp["seed"], offset=inp["offset"],
            max_num_draft=inp["max_num_draft"], method=method, backend=name)
    return run


def eager_runner(inp: dict):
    return eager_verify_block(inp["target_logits"], inp["draft_tokens"], inp["cu_num_draft"],
                              draft_logits=inp["draft_logits"], draft_probs=inp["draft_probs"],
                              temperature=inp["temperature"], max_num_draft=inp["max_num_draft"])


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0].cpu(), b[0].cpu()) and torch.equal(a[1].cpu(), b[1].cpu())


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:160]


def select_backends(args, device: torch.device) -> tuple[list[str], bool]:
    """Backends to report, and whether the list was given explicitly."""
    if args.backend:
        return list(dict.fromkeys(args.backend)), True
    if device.type == "cuda":
        return ["cuda", "triton", "reference", "eager", "flashinfer", "vllm"], False
    return ["cpu", "triton", "reference", "eager"], False


def _availability(name: str, device: torch.device, explicit: bool, group: Group, batch: int,
                  reference_cap: float) -> tuple[str, str] | None:
    """(status, note) when `name` is not run for this case, else None."""
    if name in BASELINES:
        return None
    avail = dspark_kernels.backends("verify_block")
    if name == "triton" and device.type == "cpu":
        if not explicit:
            return "skipped", "Triton interpreter on CPU: far too slow to mean anything (--backend triton forces it)"
        if not avail["triton"]:
            return "n/a", "Triton on CPU needs TRITON_INTERPRET=1"
    if name == "cuda" and device.type != "cuda":
        return "n/a", "needs a CUDA device"
    if name == "cpu" and device.type != "cpu":
        return "n/a", "cpu backend runs on CPU tensors (use --device cpu)"
    if not avail.get(name, False):
        return "n/a", "backend not available here (not built / no triton)"
    if name == "reference":
        work = batch * (group.gamma + 1) * group.vocab
        if work > reference_cap:
            return "skipped", f"reference too slow: B*(γ+1)*V = {work:.2g} > {reference_cap:.0e}"
    return None


def run(args, ctx) -> list[dict]:
    device = ctx.device
    groups, batches = plan(args, device)
    if getattr(args, "tp", None):
        from . import verify_tp

        return verify_tp.run(args, ctx, groups, batches)
    names, explicit = select_backends(args, device)
    cpu_ok = dspark_kernels.backends("verify_block")["cpu"]
    ceiling = ctx.ceiling_GBps()
    cases: list[dict] = []
    progress = ctx.progress(len(groups) * len(batches), NAME)
    case_seed = args.seed
    seeds: dict = {}  # a block group verifies exactly the inputs of its token group
    token_cases: dict = {}
    for group in groups:
        for bi, batch in enumerate(batches):
            progress.step(f"{group.label()} B={batch}")
            key = (dataclasses.replace(group, method="token"), batch)
            if key not in seeds:
                case_seed += 1
                seeds[key] = case_seed
            try:
                got = _run_case(args, ctx, group, batch, names, explicit, cpu_ok, ceiling, seeds[key],
                                slice_check=(bi == 0))
                if group.method == "token":
                    token_cases[key] = {c["backend"]: c for c in got}
                else:
                    _compare_with_token(got, token_cases.get(key, {}))
                cases += got
                if getattr(args, "tree", False) and group.method == "token":
                    cases += _run_tree_cases(args, ctx, group, batch, names, explicit, cpu_ok, ceiling, seeds[key],
                                             token_cases[key])
            except torch.cuda.OutOfMemoryError as exc:  # one too-large case must not stop the sweep
                torch.cuda.empty_cache()
                cases.append(new_case(op=NAME, group=group.label(), preset=group.preset, vocab=group.vocab,
                                      batch=batch, gamma=group.gamma, dtype=group.dtype, mode=group.mode,
                                      backend="*", status="error", note=_short(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    progress.close()
    return cases


def _compare_with_token(cases: list[dict], token: dict) -> None:
    """Notes on block cases: mean accepted length and time against token-wise (same backend, same run)."""
    for c in cases:
        t = token.get(c["backend"])
        if c["status"] != "ok" or t is None or t["status"] != "ok":
            continue
        c["note"] = (f"{c['note']}; " if c["note"] else "") + (
            f"accepted {c['mean_accepted']:.3f} vs token {t['mean_accepted']:.3f}, "
            f"time x{c['median_s'] / t['median_s']:.2f} token")


def _run_case(args, ctx, group: Group, batch: int, names: list[str], explicit: bool, cpu_ok: bool,
              ceiling: float | None, seed: int, slice_check: bool) -> list[dict]:
    device = ctx.device
    inp = make_inputs(group, batch, device, seed)
    base = dict(op=NAME, group=group.label(), preset=group.preset, vocab=group.vocab, batch=batch,
                gamma=group.gamma, dtype=group.dtype, mode=group.mode, bytes=min_bytes(inp))

    # ---- reference outputs for the checks
    ref_ok = _availability("reference", device, False, group, batch, args.reference_cap) is None
    check_full, check_name = None, None
    if ref_ok:
        check_full, check_name = own_runner("reference", group.method)(inp), "reference"
    elif cpu_ok:
        check_full, check_name = own_runner("cpu", group.method)(to_cpu(inp)), "cpu"
    ref_slice = sl = None
    if slice_check and not ref_ok:
        sl = slice_first_request(inp)
        ref_slice = own_runner("reference", group.method)(sl)
    accepted = check_full[1] if check_full is not None else None
    base["bytes_lazy"] = lazy_bytes(inp, accepted) if accepted is not None else None

    copies = timing.rotation_copies(input_bytes(inp), device)
    inputs = rotate(inp, copies)

    cases: list[dict] = []
    for name in names:
        case = new_case(**base, backend=name)
        cases.append(case)
        why = _availability(name, device, explicit, group, batch, args.reference_cap)
        if why is None and group.method != "token" and name not in OWN:
            why = "skipped", "token-wise only (the baselines have no block verification)"
        if why is not None:
            case["status"], case["note"] = why
            continue
        try:
            if name in OWN:
                fn = own_runner(name, group.method)
            elif name == "eager":
                fn = eager_runner
            else:
                fn = (flashinfer_chain if name == "flashinfer" else vllm_rejection)(inp, group.mode)
            out = fn(inp)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Unavailable as exc:
            case["status"], case["note"] = "n/a", str(exc)
            continue
        except ImportError as exc:
            case["status"], case["note"] = "n/a", _short(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
            case["status"], case["note"] = "error", _short(exc)
            continue
        case["mean_accepted"] = float(out[1].float().mean())
        checks, notes = [], []
        if name in OWN:
            if check_full is not None and name != check_name:
                checks.append(_same(out, check_full))
                notes.append(f"= {check_name}")
            if ref_slice is not None and name != "reference":
                checks.append(_same(fn(sl), ref_slice))
                notes.append("= reference (1-request slice)")
        elif group.mode == "greedy" and check_full is not None:
            checks.append(_same(out, check_full))
            notes.append(f"greedy = {check_name}")
        else:
            notes.append("torch RNG: not compared")
        case["correct"] = all(checks) if checks else None
        try:
            t = timing.time_backend(ctx, name, fn, inputs)
        except Exception as exc:  # noqa: BLE001
            case["status"], case["note"] = "error", "timing: " + _short(exc)
            continue
        case.update(status="ok", note="; ".join(notes), median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n,
                    method=t.method, copies=t.copies)
        case["GBps"] = base["bytes"] / t.median_s / 1e9
        case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None

    add_speedups(cases)
    return cases




# --------------------------------------------------------------------------- trees (--tree)


def tree_layout(args, gamma: int):
    from dspark_kernels.loop.tree import TreeLayout, parse_branches

    return TreeLayout.build(gamma, parse_branches(getattr(args, "tree_branch", "2")))


def _sibling_ranks(parents: tuple[int, ...]) -> list[int]:
    seen: dict[int, int] = {}
    ranks = []
    for p in parents:
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks


def make_tree_inputs(group: Group, batch: int, device: torch.device, seed: int, layout) -> dict:
    """Inputs of one tree case (module docstring): B copies of ``layout``, rows in verify_tree's layout."""
    B, V, n = batch, group.vocab, layout.num_nodes
    N, T = B * n, B * (n + 1)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    z = torch.randn(T, V, generator=gen, device=device)
    rows = torch.arange(T, device=device)
    peak = torch.randint(0, V, (T,), generator=gen, device=device)
    tail = math.log(V) + 0.5
    z[rows, peak] = math.log(TARGET_PEAK / (1 - TARGET_PEAK)) + tail
    d = z + DRAFT_NOISE * torch.randn(T, V, generator=gen, device=device)
    d[rows, peak] = math.log(DRAFT_PEAK / (1 - DRAFT_PEAK)) + tail + DRAFT_NOISE**2 / 2
    parents = torch.tensor(layout.parents, dtype=torch.int64, device=device)
    req = torch.arange(B, device=device).repeat_interleave(n)
    parent_row = req * (n + 1) + 1 + parents.repeat(B)             # the window row whose children these are
    q = d[parent_row]                                              # [N, V]
    iid = group.mode in ("sample-draft-logits", "sample-draft-probs")
    if iid:   # siblings drawn i.i.d. from their parent's draft row
        u = torch.rand(N, V, generator=gen, device=device).clamp_(min=1e-20)
        tokens = torch.argmax(q - torch.log(-torch.log(u)), dim=-1)
        del u
    else:     # K distinct tokens per parent, sampled without replacement (Gumbel top-K), verified as point masses
        ranks = torch.tensor(_sibling_ranks(layout.parents), device=device).repeat(B)
        k = min(int(ranks.max()) + 1 if N else 1, V)
        u = torch.rand(T, V, generator=gen, device=device).clamp_(min=1e-20)
        top = (d - torch.log(-torch.log(u))).topk(k, dim=-1).indices          # [T, K] per window row
        del u
        tokens = top[parent_row, ranks.clamp(max=k - 1)]
    dtype = DTYPES[group.dtype]
    return {
        "batch": B, "gamma": layout.depth, "vocab": V, "num_draft": N, "max_num_draft": layout.depth,
        "target_logits": z.to(dtype), "draft_tokens": tokens.to(torch.int32),
        "parents": parents.repeat(B).to(torch.int32),
        "cu_num_draft": (torch.arange(B + 1, device=device) * n).to(torch.int32),
        "draft_logits": q.to(dtype) if group.mode == "sample-draft-logits" else None,
        "draft_probs": torch.softmax(q, dim=-1) if group.mode == "sample-draft-probs" else None,
        "temperature": torch.ones(B, device=device) if group.mode != "greedy" else None,
        "seed": torch.arange(B, device=device, dtype=torch.int64) + 7919 * seed,
        "offset": torch.randint(0, 2**20, (B,), generator=gen, device=device, dtype=torch.int64),
    }


def tree_runner(name: str):
    def run(inp: dict):
        return dspark_kernels.verify_tree(
            inp["target_logits"], inp["draft_tokens"], inp["parents"], inp["cu_num_draft"],
            draft_logits=inp["draft_logits"], draft_probs=inp["draft_probs"], temperature=inp["temperature"],
            seed=inp["seed"], offset=inp["offset"], max_depth=inp["max_num_draft"], backend=name)
    return run


def _same_all(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def _run_tree_cases(args, ctx, group: Group, batch: int, names: list[str], explicit: bool, cpu_ok: bool,
                    ceiling: float | None, seed: int, chain_depth: dict) -> list[dict]:
    """The tree of depth γ and the chain of the tree's node count, on our backends; notes against both chains."""
    device = ctx.device
    layout = tree_layout(args, group.gamma)
    n = layout.num_nodes
    shape = "x".join(map(str, layout.branches))
    tree_group = f"{group.label()} tree {shape} ({n} nodes)"
    chain_group = f"{dataclasses.replace(group, gamma=n).label()} (chain of the tree's {n} nodes)"
    trees = make_tree_inputs(group, batch, device, seed, layout)
    chains = make_inputs(dataclasses.replace(group, gamma=n), batch, device, seed)
    out: list[dict] = []
    runs = {}
    for label, gamma, inp, runner in ((chain_group, n, chains, own_runner),
                                      (tree_group, group.gamma, trees, tree_runner)):
        cost_group = dataclasses.replace(group, gamma=n)        # both verify n tokens + the root / bonus row
        base = dict(op=NAME, group=label, preset=group.preset, vocab=group.vocab, batch=batch, gamma=gamma,
                    dtype=group.dtype, mode=group.mode, bytes=min_bytes(inp) + (4 * inp["num_draft"]
                                                                               if runner is tree_runner else 0))
        ref_ok = _availability("reference", device, False, cost_group, batch, args.reference_cap) is None
        check, check_name = None, None
        if ref_ok:
            check, check_name = runner("reference")(inp), "reference"
        elif cpu_ok:
            check, check_name = runner("cpu")(to_cpu(inp)), "cpu"
        inputs = rotate(inp, timing.rotation_copies(input_bytes(inp), device))
        cases = {}
        for name in names:
            case = new_case(**base, backend=name, tree_nodes=n if runner is tree_runner else None,
                            tree_branches=list(layout.branches) if runner is tree_runner else None)
            out.append(case)
            why = _availability(name, device, explicit, cost_group, batch, args.reference_cap)
            if why is None and name not in OWN:
                why = "skipped", "trees: our backends only (chains of the same depth: the group above)"
            if why is not None:
                case["status"], case["note"] = why
                continue
            fn = runner(name)
            try:
                got = fn(inp)
                t = timing.time_backend(ctx, name, fn, inputs)
            except Exception as exc:  # noqa: BLE001 - reported in the table, the sweep goes on
                case["status"], case["note"] = "error", _short(exc)
                continue
            num_accepted = got[1]
            case["mean_accepted"] = float(num_accepted.float().mean())
            case["correct"] = _same_all(got, check) if check is not None and name != check_name else None
            case.update(status="ok", note=f"= {check_name}" if case["correct"] is not None else "",
                        median_s=t.median_s, p20_s=t.p20_s, p80_s=t.p80_s, n=t.n, method=t.method, copies=t.copies)
            case["GBps"] = base["bytes"] / t.median_s / 1e9
            case["pct_ceiling"] = 100.0 * case["GBps"] / ceiling if ceiling else None
            cases[name] = case
        runs[runner] = cases
        add_speedups([c for c in out if c["group"] == label])
    for name, c in runs[tree_runner].items():
        parts = []
        for what, other in ((f"chain γ={group.gamma}", chain_depth.get(name)),
                            (f"chain γ={n}", runs[own_runner].get(name))):
            if other is not None and other.get("status") == "ok":
                parts.append(f"{what} {other['mean_accepted']:.3f} (time x{c['median_s'] / other['median_s']:.2f})")
        if parts:
            summary = f"accepted {c['mean_accepted']:.3f} vs " + ", ".join(parts)
            c["note"] = f"{c['note']}; {summary}" if c["note"] else summary
    return out
