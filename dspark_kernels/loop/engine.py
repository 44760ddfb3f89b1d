"""A ragged, continuously batched draft → schedule → verify → commit loop on our ops.

Written the way a serving engine would drive the library (vLLM / SGLang style):
host-side bookkeeping (slots, page lists, lengths) in Python, all tensor work in
the ops. One ``step()``:

1. admit waiting requests into free slots and prefill them (one ragged target
   pass over every new prompt but its last token, which becomes the anchor);
2. draft: the drafter's parallel block ``[anchor, mask × (γ−1)]`` per request
   (``draft_block_attention`` over its circular context window), then
   ``draft_sample_block`` (Markov head, the request's temperature / top-k / top-p);
3. schedule: ``schedule_verify_lens`` turns the confidences into verify lengths
   ``ℓ_r ≤ γ`` with a profiled steps-per-second table (or every ``ℓ_r = γ``: static);
4. one flattened target forward over ``Σ (ℓ_r + 1)`` tokens ``[anchor, d_1 … d_ℓ]``
   that writes its KV into the paged cache (``fused_moe`` in the MoE layers);
5. ``verify_block`` (draft logits as q; lossless) → accepted drafts + one token;
6. ``kv_commit`` (the accepted chain stays; nothing moves for a chain) and
   ``kv_release_pages`` (pages past the new length go back to the free list);
   ``window_commit`` writes the accepted rows' projected hidden states into the
   drafter's window;
7. emit, stop at EOS or ``max_new_tokens``, free finished requests' pages.

``backend="reference"`` runs every dspark op through its reference implementation;
``None`` picks the fused ops. The models' own matmuls / attention are identical in
both, so the same seeds give the same tokens. ``gamma=0`` (or no drafter) is plain
autoregressive decoding of the target through the same code: verify_block with no
drafts samples the bonus token from the target, which is target sampling.

Random streams: request ``r`` with seed ``s`` drafts and verifies the token at
absolute position ``L+1+i`` at Philox position ``L+i`` (``L`` = the anchor's
position), so a position's noise never repeats across steps and never depends on
the batch.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .. import (draft_sample_block, kv_commit, kv_release_pages, schedule_verify_lens, verify_block,
                window_commit)
from .. import distributed
from .models import Drafter, Target, op_backend
from .tree import SIBLINGS, TreeLayout, tree_step


@dataclass
class VocabParallel:
    """This process's shard of a vocabulary-parallel target LM head: columns
    ``[start, end)`` of ``vocab_size``, ranks of ``group`` (None: the default group)."""

    start: int
    end: int
    vocab_size: int
    group: object = None

    @classmethod
    def split(cls, vocab_size: int, rank: int, world: int, group=None) -> "VocabParallel":
        """Rank ``rank``'s shard of an even split (the first ``vocab_size % world`` get one more)."""
        base, extra = divmod(vocab_size, world)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (1 if rank < extra else 0), vocab_size, group)

    @property
    def columns(self) -> tuple[int, int]:
        return self.start, self.end

    def local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """This shard's columns of a full-vocabulary tensor (e.g. the replicated drafter's logits)."""
        return None if t is None else t[..., self.start:self.end].contiguous()


@dataclass
class Request:
    """One generation request. ``temperature <= 0`` is greedy."""

    prompt: list[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None
    # filled in by the engine
    output: list[int] = field(default_factory=list)
    finished: bool = False
    steps: int = 0            # verify steps this request took part in
    drafted: int = 0          # drafts sent to verification (Σ ℓ)
    accepted: int = 0         # drafts accepted
    # engine state
    slot: int = -1
    committed: int = 0        # tokens whose KV is in the cache; the anchor sits at this position
    anchor: int = -1
    pages: list[int] = field(default_factory=list)

    def __post_init__(self):
        if len(self.prompt) == 0:
            raise ValueError("Request.prompt must hold at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"Request.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def tau(self) -> float:
        """Acceptance length: tokens emitted per verify step."""
        return len(self.output) / max(self.steps, 1)


class OpTimers:
    """Wall time per named region (synchronising CUDA so the time lands where it is spent)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.total = defaultdict(float)
        self.calls = defaultdict(int)

    @contextmanager
    def __call__(self, name: str, device: torch.device):
        if not self.enabled:
            yield
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.total[name] += time.perf_counter() - t0
        self.calls[name] += 1


class SpecDecoder:
    """Continuous-batching speculative decoder over a paged target cache.

    Args:
        target, drafter: the models (``drafter=None`` or ``gamma=0``: autoregressive).
        gamma: block size the drafter proposes per step.
        schedule: ``"dspark"`` (``schedule_verify_lens`` with ``sps``) or ``"static"``
            (verify all γ drafts).
        sps: ``[Bmax + 1]`` steps per second by verify-batch size (tokens); required
            for ``"dspark"`` (see ``profile_sps``). ``Bmax < max_batch·(γ+1)`` caps the batch.
        backend: None (fused ops, each op's default dispatch), ``"reference"`` (every
            op's reference), any backend name every op accepts, or a dict ``{op name:
            backend}`` for some ops (the others dispatch by default), e.g. the Triton
            kernels of the ops that have one.
        max_batch: request slots (the drafter windows are ``[max_batch, W, …]``).
        page_size, max_len: paged KV cache geometry; ``max_len`` bounds a request's
            prompt + output (+ γ + 1 in flight).
        num_pages: pages in the pool (default: enough for every slot at ``max_len``).
        method: verify_block's method for chains, ``"token"`` or ``"block"`` (block
            verification: same law, longer expected accepted length).
        tree: tree mode (loop/tree.py, docs/loop.md#tree-mode): a ``TreeLayout`` or the
            branches per level, e.g. ``(2, 2)``, of a tree of depth ``gamma``; every node
            is verified in one target pass and ``verify_tree`` picks the path. Static
            schedule only.
        tree_siblings: ``"top-k"`` (the drafter's best K children, verified as point
            masses) or ``"sample"`` (sampling requests draw children i.i.d. from the
            drafter's q and verify against it; greedy ones keep the top-K).
        tp: a ``VocabParallel`` shard: this process computes only its columns of the
            target's LM head and verifies with ``dspark_kernels.distributed`` on them
            (the rest of the target and the drafter are replicated); every rank of the
            group runs the same engine on the same requests and emits the same tokens.
    """

    def __init__(self, target: Target, drafter: Drafter | None = None, *, gamma: int = 5,
                 schedule: str = "static", sps: torch.Tensor | None = None, backend: str | None = None,
                 max_batch: int = 16, page_size: int = 16, max_len: int = 1024, num_pages: int | None = None,
                 timers: OpTimers | None = None, method: str = "token",
                 tree: TreeLayout | tuple[int, ...] | None = None, tree_siblings: str = "top-k",
                 tp: "VocabParallel | None" = None):
        if schedule not in ("static", "dspark"):
            raise ValueError(f"schedule must be 'static' or 'dspark', got {schedule!r}")
        if method not in ("token", "block"):
            raise ValueError(f"method must be 'token' or 'block', got {method!r}")
        if tree is not None:
            if drafter is None or gamma < 1:
                raise ValueError("tree mode needs a drafter and gamma (the tree depth) >= 1")
            if schedule != "static":
                raise ValueError("tree mode verifies every node: schedule must be 'static'")
            if not isinstance(tree, TreeLayout):
                tree = TreeLayout.build(gamma, tuple(tree))
            if tree.depth != gamma:
                raise ValueError(f"tree depth ({tree.depth}) must equal gamma ({gamma})")
        if tree_siblings not in SIBLINGS:
            raise ValueError(f"tree_siblings must be one of {SIBLINGS}, got {tree_siblings!r}")
        if tp is not None and (schedule != "static" or method != "token"):
            raise ValueError("a vocabulary-parallel target (tp) needs schedule='static' and method='token'")
        self.method, self.tree, self.tree_siblings, self.tp = method, tree, tree_siblings, tp
        self.gamma = gamma if drafter is not None else 0
        if drafter is not None and gamma > drafter.cfg.max_gamma:
            raise ValueError(f"gamma ({gamma}) exceeds the drafter's max_gamma ({drafter.cfg.max_gamma})")
        if schedule == "dspark" and self.gamma > 0 and sps is None:
            raise ValueError("schedule='dspark' needs an sps table (SpecDecoder.profile_sps)")
        op_backend(backend, "verify_block")    # a dict naming unknown ops fails here
        self.target, self.drafter = target, drafter
        self.schedule, self.backend = schedule, backend
        self.device = target.embed.weight.device
        self.dtype = target.embed.weight.dtype
        self.max_batch, self.page_size, self.max_len = max_batch, page_size, max_len
        self.sps = None if sps is None else sps.to(self.device, torch.float32)
        self.timers = timers or OpTimers(enabled=False)
        cfg = target.cfg
        self.pages_per_req = -(-max_len // page_size)
        self.num_pages = num_pages or max_batch * self.pages_per_req
        dev = self.device
        self.kv_caches = [torch.zeros(self.num_pages, page_size, cfg.n_kv_heads, cfg.head_dim, dtype=self.dtype,
                                      device=dev) for _ in range(2 * cfg.n_layers)]
        self.refcount = torch.zeros(self.num_pages, dtype=torch.int32, device=dev)
        self.free_pages = list(range(self.num_pages - 1, -1, -1))     # pop() hands out low ids first
        if drafter is not None:
            dc = drafter.cfg
            self.windows = [tuple(torch.zeros(max_batch, dc.window, dc.n_kv_heads, dc.head_dim, dtype=self.dtype,
                                              device=dev) for _ in range(2)) for _ in range(dc.n_layers)]
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: list[Request] = []
        self.num_steps = 0

    # ------------------------------------------------------------------ public API

    def add_request(self, req: Request) -> Request:
        window = (self.tree.num_nodes if self.tree is not None else self.gamma) + 1
        need = len(req.prompt) + req.max_new_tokens + window
        if need > self.max_len:
            raise ValueError(f"prompt ({len(req.prompt)}) + max_new_tokens ({req.max_new_tokens}) + verify window "
                             f"({window}: gamma or tree nodes, + 1) exceeds max_len ({self.max_len})")
        vocab = self.target.cfg.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise ValueError(f"Request.prompt holds ids outside [0, {vocab})")
        self.waiting.append(req)
        return req

    @property
    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def generate(self, requests: list[Request]) -> list[Request]:
        """Run every request to completion (they join as slots free up) and return them."""
        for r in requests:
            self.add_request(r)
        while self.has_work():
            self.step()
        return requests

    # ------------------------------------------------------------------ paging

    def _ensure_pages(self, req: Request, length: int) -> None:
        need = -(-length // self.page_size)
        if need > self.pages_per_req:
            raise RuntimeError(f"request needs {need} pages, more than max_len allows")
        while len(req.pages) < need:
            if not self.free_pages:
                raise RuntimeError("KV page pool exhausted (raise num_pages)")
            p = self.free_pages.pop()
            req.pages.append(p)
            self.refcount[p] = 1

    def _block_table(self, reqs: list[Request]) -> torch.Tensor:
        width = max(1, max(len(r.pages) for r in reqs))
        rows = [r.pages + [-1] * (width - len(r.pages)) for r in reqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _release(self, reqs: list[Request], block_table: torch.Tensor, new_len: torch.Tensor,
                 old_len: torch.Tensor) -> None:
        """Pages past ``new_len`` lose their reference; the op says which came back to the pool."""
        freed, num_freed = kv_release_pages(block_table, new_len, old_len, self.page_size, self.refcount,
                                            backend=op_backend(self.backend, "kv_release_pages"))
        freed, num_freed, new_len = freed.tolist(), num_freed.tolist(), new_len.tolist()
        for r, row, n, length in zip(reqs, freed, num_freed, new_len):
            self.free_pages.extend(reversed(row[:n]))
            del r.pages[-(-length // self.page_size):]

    # ------------------------------------------------------------------ one step

    def _ragged_rows(self, reqs: list[Request], new_tokens: list[list[int]]):
        """Flatten per-request new tokens at positions ``committed …`` into the target's row arrays."""
        dev = self.device
        tokens, positions, row_req, row_idx = [], [], [], []
        for b, (r, toks) in enumerate(zip(reqs, new_tokens)):
            tokens += toks
            positions += range(r.committed, r.committed + len(toks))
            row_req += [b] * len(toks)
            row_idx += range(len(toks))
        as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
        seq_lens = [r.committed + len(t) for r, t in zip(reqs, new_tokens)]
        return (as_t(tokens), as_t(positions), as_t(row_req), as_t(row_idx), as_t(seq_lens),
                max(seq_lens), max(len(t) for t in new_tokens))

    def _target_pass(self, reqs, new_tokens, **tree):
        for r, toks in zip(reqs, new_tokens):
            self._ensure_pages(r, r.committed + len(toks))
        block_table = self._block_table(reqs)
        tokens, positions, row_req, row_idx, seq_lens, max_seq, max_rows = self._ragged_rows(reqs, new_tokens)
        with self.timers("target forward", self.device):
            logits, hidden = self.target.forward_paged(tokens, positions, row_req, row_idx, seq_lens, self.kv_caches,
                                                       block_table, self.page_size, max_seq, max_rows,
                                                       backend=self.backend,
                                                       vocab_slice=self.tp.columns if self.tp else None, **tree)
        return block_table, positions, row_req, row_idx, logits, hidden

    def _slot_offsets(self, reqs: list[Request], counts: list[int]) -> torch.Tensor:
        """``cu [max_batch + 1]`` over all slots (idle slots own no rows), rows in slot order."""
        per_slot = [0] * self.max_batch
        for r, n in zip(reqs, counts):
            per_slot[r.slot] = n
        cu = [0]
        for n in per_slot:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int32, device=self.device)

    def _commit_context(self, reqs, counts, hidden, positions, keep) -> None:
        """Project the target hidden states of kept rows into each drafter layer's window."""
        if self.drafter is None or hidden.shape[0] == 0:
            return
        cu = self._slot_offsets(reqs, counts)
        with self.timers("drafter context", self.device):
            ctx = self.drafter.context_kv(hidden.to(self.dtype), positions)
        with self.timers("window_commit", self.device):
            for (k_win, v_win), (k, v) in zip(self.windows, ctx):
                window_commit(k_win, k.contiguous(), cu, positions, keep, backend=op_backend(self.backend, "window_commit"))
                window_commit(v_win, v.contiguous(), cu, positions, keep, backend=op_backend(self.backend, "window_commit"))

    def _admit(self) -> None:
        new = []
        for s in range(self.max_batch):
            if self.slots[s] is None and self.waiting:
                r = self.waiting.pop(0)
                r.slot, self.slots[s] = s, r
                new.append(r)
        if not new:
            return
        # Prefill: every prompt token but the last; the last is the first step's anchor.
        for r in new:
            r.anchor = r.prompt[-1]
        with_rows = [r for r in new if len(r.prompt) > 1]
        if not with_rows:
            return
        toks = [r.prompt[:-1] for r in with_rows]
        _, positions, _, _, _, hidden = self._target_pass(with_rows, toks)
        counts = [len(t) for t in toks]
        for r, n in zip(with_rows, counts):
            r.committed = n
        self._commit_context(with_rows, counts, hidden, positions, None)

    def _sampling_tensors(self, reqs):
        dev = self.device
        temperature = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.top_k for r in reqs], dtype=torch.int32, device=dev)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
        seed = torch.tensor([r.seed for r in reqs], dtype=torch.int64, device=dev)
        offset = torch.tensor([r.committed for r in reqs], dtype=torch.int64, device=dev)
        return temperature, top_k, top_p, seed, offset

    def step(self) -> None:
        """One draft → schedule → verify → commit step over every active request."""
        if self.tree is not None:
            tree_step(self)
            return
        self._admit()
        reqs = sorted(self.active, key=lambda r: r.slot)
        if not reqs:
            return
        dev, gamma, nb = self.device, self.gamma, len(reqs)
        temperature, top_k, top_p, seed, offset = self._sampling_tensors(reqs)
        anchor = torch.tensor([r.anchor for r in reqs], dtype=torch.int64, device=dev)
        # At most remaining − 1 drafts: a step emits up to ℓ + 1 tokens.
        cap = [min(gamma, r.max_new_tokens - len(r.output) - 1) for r in reqs]
        if gamma > 0:
            slot = torch.tensor([r.slot for r in reqs], dtype=torch.int64, device=dev)
            with self.timers("drafter forward", dev):
                base_logits, confidence = self.drafter.forward_block(anchor, offset, gamma, self.windows, slot,
                                                                     self.max_batch, backend=self.backend)
            with self.timers("draft_sample_block", dev):
                draft_tokens, draft_logits = draft_sample_block(
                    base_logits, anchor, markov_w1=self.drafter.markov_w1.detach().float(),
                    markov_w2=self.drafter.markov_w2.detach().float(), temperature=temperature, top_k=top_k,
                    top_p=top_p, seed=seed, offset=offset,
                    backend=op_backend(self.backend, "draft_sample_block"))
            if self.schedule == "dspark":
                with self.timers("schedule_verify_lens", dev):
                    lens_t, _ = schedule_verify_lens(
                        confidence, self.sps, backend=op_backend(self.backend, "schedule_verify_lens"))
                lens = lens_t.tolist()
            else:
                lens = [gamma] * nb
            lens = [min(n, c) for n, c in zip(lens, cap)]
            drafts = draft_tokens.tolist()
        else:
            lens, drafts = [0] * nb, [[]] * nb
        new_tokens = [[r.anchor] + d[:n] for r, d, n in zip(reqs, drafts, lens)]
        old_len = torch.tensor([r.committed + n + 1 for r, n in zip(reqs, lens)], dtype=torch.int32, device=dev)
        block_table, positions, row_req, row_idx, logits, hidden = self._target_pass(reqs, new_tokens)

        cu = torch.tensor([0] + [sum(lens[: b + 1]) for b in range(nb)], dtype=torch.int32, device=dev)
        if sum(lens) > 0:
            pick = torch.tensor([b * gamma + i for b in range(nb) for i in range(lens[b])], dtype=torch.int64,
                                device=dev)
            flat_drafts = draft_tokens.reshape(-1)[pick]
            flat_logits = draft_logits.reshape(nb * gamma, -1)[pick]
        else:
            flat_drafts = torch.zeros(0, dtype=torch.int32, device=dev)
            flat_logits = None
        with self.timers("verify_block", dev):
            if self.tp is not None:
                out, num_accepted = distributed.verify_block(
                    logits, flat_drafts, cu, vocab_start=self.tp.start, vocab_size=self.tp.vocab_size,
                    group=self.tp.group, draft_logits=self.tp.local(flat_logits), temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, offset=offset, max_num_draft=max(gamma, 1))
            else:
                out, num_accepted = verify_block(logits, flat_drafts, cu, draft_logits=flat_logits,
                                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                                 offset=offset, max_num_draft=max(gamma, 1),
                                                 method=self.method if sum(lens) > 0 else "token",
                                                 backend=op_backend(self.backend, "verify_block"))
        with self.timers("kv_commit + release", dev):
            path = torch.arange(gamma + 1, dtype=torch.int32, device=dev).expand(nb, -1)
            committed = torch.tensor([r.committed for r in reqs], dtype=torch.int32, device=dev)
            new_len = kv_commit(self.kv_caches, block_table, self.page_size, committed, path, num_accepted + 1,
                                backend=op_backend(self.backend, "kv_commit"))
            self._release(reqs, block_table, new_len, old_len)
        keep = row_idx <= num_accepted.long()[row_req]
        self._commit_context(reqs, [n + 1 for n in lens], hidden, positions, keep)
        self._emit(reqs, out, num_accepted, lens)

    def _emit(self, reqs: list[Request], out: torch.Tensor, num_accepted: torch.Tensor, lens: list[int]) -> None:
        """Append each request's accepted tokens and its emitted one; stop at EOS / max_new_tokens."""
        out, num_accepted = out.tolist(), num_accepted.tolist()
        finished = []
        for r, row, a, n in zip(reqs, out, num_accepted, lens):
            emitted = row[: a + 1]
            r.steps += 1
            r.drafted += n
            r.committed += a + 1
            for j, tok in enumerate(emitted):
                r.output.append(tok)
                if tok == r.eos_id or len(r.output) >= r.max_new_tokens:
                    r.finished = True
                    a = min(a, j + 1)     # accepted drafts past the stop are not output: not counted
                    break
            r.accepted += a
            r.anchor = emitted[-1]
            if r.finished:
                finished.append(r)
        if finished:
            self._finish(finished)
        self.num_steps += 1

    def _finish(self, reqs: list[Request]) -> None:
        block_table = self._block_table(reqs)
        old = torch.tensor([r.committed for r in reqs], dtype=torch.int32, device=self.device)
        self._release(reqs, block_table, torch.zeros_like(old), old)
        for r in reqs:
            self.slots[r.slot] = None
            r.slot = -1

    # ------------------------------------------------------------------ SPS profile

    def profile_sps(self, max_tokens: int | None = None, context_len: int = 64, repeats: int = 3,
                    points: int = 8) -> torch.Tensor:
        """Measure the target verify pass: steps per second by verify-batch size (tokens).

        Times ``forward_paged`` on ``n`` tokens spread over ``ceil(n / (γ+1))`` requests
        with ``context_len`` cached tokens each, at ``points`` sizes from 1 to
        ``max_tokens`` (default ``max_batch · (γ+1)``), interpolates linearly, and makes
        the table non-increasing. Returns the ``[max_tokens + 1]`` table ``sps`` that
        ``schedule="dspark"`` needs (entry 0 unused). Uses a scratch cache.
        """
        max_tokens = max_tokens or self.max_batch * (self.gamma + 1)
        per_req = self.gamma + 1
        dev, cfg = self.device, self.target.cfg
        sizes = sorted({max(1, round(max_tokens ** (i / max(points - 1, 1)))) for i in range(points)} | {max_tokens})
        times = []
        for n in sizes:
            nreq = -(-n // per_req)
            counts = [per_req] * (n // per_req) + ([n % per_req] if n % per_req else [])
            pages_each = -(-(context_len + per_req) // self.page_size)
            caches = [torch.zeros(nreq * pages_each, self.page_size, cfg.n_kv_heads, cfg.head_dim, dtype=self.dtype,
                                  device=dev) for _ in range(2 * cfg.n_layers)]
            table = torch.arange(nreq * pages_each, dtype=torch.int32, device=dev).reshape(nreq, pages_each)
            row_req = torch.tensor([b for b, c in enumerate(counts) for _ in range(c)], device=dev)
            row_idx = torch.tensor([i for c in counts for i in range(c)], device=dev)
            positions = context_len + row_idx
            tokens = torch.zeros(n, dtype=torch.int64, device=dev)
            seq_lens = torch.tensor([context_len + c for c in counts], device=dev)
            best = math.inf
            for _ in range(repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                self.target.forward_paged(tokens, positions, row_req, row_idx, seq_lens, caches, table,
                                          self.page_size, context_len + per_req, per_req, backend=self.backend)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                best = min(best, time.perf_counter() - t0)
            times.append(best)
        grid = torch.arange(max_tokens + 1, dtype=torch.float64)
        t = torch.tensor(times, dtype=torch.float64)
        x = torch.tensor(sizes, dtype=torch.float64)
        idx = torch.searchsorted(x, grid.clamp(min=x[0], max=x[-1])).clamp(1, len(x) - 1) if len(x) > 1 else None
        if idx is None:
            interp = t.expand(max_tokens + 1).clone()
        else:
            x0, x1, t0_, t1_ = x[idx - 1], x[idx], t[idx - 1], t[idx]
            w = ((grid.clamp(min=x[0], max=x[-1]) - x0) / (x1 - x0)).clamp(0, 1)
            interp = t0_ + w * (t1_ - t0_)
        interp = torch.cummax(interp, 0).values     # a bigger batch never runs faster
        return (1.0 / interp).float()
