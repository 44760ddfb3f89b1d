"""Baselines for the verify benchmark: plain eager PyTorch, and the anchors when importable.

``eager_verify_block`` does the same lossless verification as ``verify_block`` the way a
straightforward PyTorch implementation would: softmax of every row in fp32, gather
``p(x)`` and ``q(x)``, compare with uniforms, a cumulative product of the accepts, and a
residual ``max(p - q, 0)`` sampled for *every* draft row (plus a bonus sample for
every request) by an exponential race, then a gather of the emitted token. It uses
torch's generator, not our Philox streams, so sampled outputs differ from ours;
greedy outputs are deterministic and must match exactly. No host sync: it is
CUDA-graph capturable when ``max_num_draft`` is given.

The anchors (``flashinfer_chain`` and ``vllm_rejection``) are wrapped so that an
engine's real cost is timed: softmax of the logits they need as probabilities,
then the library call. Each factory raises ``Unavailable`` with the reason when it
cannot run here (not installed, needs CUDA, mode not supported).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from collections.abc import Callable

import torch


class Unavailable(Exception):
    """A baseline that cannot run here; the message says why."""


def _request_of_draft(cu: torch.Tensor, num_draft: int) -> torch.Tensor:
    """Request index of each flattened draft token [N] (int64), without a host sync."""
    j = torch.arange(num_draft, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu[1:].to(torch.int64).contiguous(), j, right=True)


def _race(weights: torch.Tensor) -> torch.Tensor:
    """Categorical sample per row of non-negative weights: argmax(w / E), E ~ Exp(1)."""
    e = torch.empty_like(weights).exponential_()
    return torch.argmax(weights / e, dim=-1)


def eager_verify_block(target_logits: torch.Tensor, draft_tokens: torch.Tensor, cu_num_draft: torch.Tensor, *,
                       draft_logits: torch.Tensor | None = None, draft_probs: torch.Tensor | None = None,
                       temperature: torch.Tensor | None = None,
                       max_num_draft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager-PyTorch speculative verification (same contract as ``verify_block``, torch RNG)."""
    device = target_logits.device
    B = cu_num_draft.shape[0] - 1
    N = draft_tokens.shape[0]
    V = target_logits.shape[1]
    M = int(max_num_draft)
    cu = cu_num_draft.to(torch.int64)
    req = _request_of_draft(cu, N)                       # [N]
    pos = torch.arange(N, device=device) - cu[req]       # [N] position inside the request
    tgt_row = torch.arange(N, device=device) + req       # [N] target row of each draft
    n_b = cu[1:] - cu[:-1]                               # [B]
    x = draft_tokens.to(torch.int64)
    valid = (x >= 0) & (x < V)
    xc = x.clamp(0, V - 1)
    greedy = temperature is None

    if greedy:
        argmax = torch.argmax(target_logits.float(), dim=-1)          # [T]
        accept = valid & (x == argmax[tgt_row])
    else:
        t_row = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).float()
        p = torch.softmax(target_logits.float() / t_row.repeat_interleave(n_b + 1, output_size=N + B)[:, None],
                          dim=-1)                                        # [T, V]
        p_draft = p[tgt_row]                                             # [N, V]
        p_x = p_draft.gather(1, xc[:, None]).squeeze(1)
        if draft_logits is not None:
            q = torch.softmax(draft_logits.float() / t_row[req][:, None], dim=-1)
        elif draft_probs is not None:
            q = draft_probs.float()
        else:
            q = None
        q_x = q.gather(1, xc[:, None]).squeeze(1) if q is not None else torch.ones_like(p_x)
        u = torch.rand(N, device=device, dtype=torch.float64)
        accept = valid & (p_x > 0) & (u * q_x.double() < p_x.double())
        if q is None:  # point mass: the residual is p without the draft token
            residual = p_draft.scatter(1, xc[:, None], 0.0)
        else:
            residual = torch.clamp(p_draft - q, min=0.0)
        zero = residual.sum(-1, keepdim=True) <= 0
        residual = torch.where(zero, p_draft, residual)
        resampled = _race(residual)                                      # [N]
        bonus_rows = cu[1:] + torch.arange(B, device=device)             # row n_b of each request
        bonus = _race(p[bonus_rows])                                     # [B]

    # Padded [B, M] accept matrix, prefix length by cumulative product.
    # (every pos < M by the contract max_num_draft >= n_b; no boolean masks: no host sync)
    acc = torch.zeros(B, max(M, 1), dtype=torch.int32, device=device)
    acc[req, pos.clamp(max=max(M - 1, 0))] = accept.to(torch.int32)
    num_accepted = torch.minimum(torch.cumprod(acc, dim=1).sum(1), n_b).to(torch.int32)

    # Emitted token: the row at the first rejection, or the bonus row.
    stop_row = cu[:-1] + num_accepted.to(torch.int64)                    # draft index of the stop
    all_acc = num_accepted.to(torch.int64) == n_b
    if greedy:
        emitted = argmax[stop_row + torch.arange(B, device=device)]
    else:
        emitted = torch.where(all_acc, bonus, resampled[stop_row.clamp(max=max(N - 1, 0))] if N > 0 else bonus)

    out = torch.full((B, M + 1), -1, dtype=torch.int32, device=device)
    cols = torch.arange(M + 1, device=device)[None, :]
    src = (cu[:-1, None] + cols).clamp(max=max(N - 1, 0))
    drafts_padded = x[src].to(torch.int32) if N > 0 else torch.full_like(out, -1)
    na = num_accepted[:, None].to(torch.int64)
    out = torch.where(cols < na, drafts_padded, out)
    out = torch.where(cols == na, emitted[:, None].to(torch.int32), out)
    return out, num_accepted


# --------------------------------------------------------------------------- anchors


def _probs(logits: torch.Tensor, per_row_temp: torch.Tensor | None) -> torch.Tensor:
    """softmax(logits / T) in fp32, one temperature per row (None: T = 1)."""
    x = logits.float()
    if per_row_temp is not None:
        x = x / per_row_temp[:, None]
    return torch.softmax(x, dim=-1)


def flashinfer_chain(inputs: dict, mode: str) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
    """FlashInfer ``chain_speculative_sampling``: softmax of target (and draft) + the call.

    Needs a uniform number of drafts per request ([B, γ, V] layout). Point-mass drafts
    are given as one-hot probabilities (what an engine would build).
    """
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except ImportError as exc:
        raise Unavailable(f"flashinfer not installed ({exc.__class__.__name__})") from None
    if inputs["target_logits"].device.type != "cuda":
        raise Unavailable("needs CUDA")
    if mode == "greedy":
        raise Unavailable("no greedy chain kernel")
    B, gamma, V = inputs["batch"], inputs["gamma"], inputs["vocab"]

    def run(inp: dict):
        t_tok = inp["temperature"].repeat_interleave(gamma + 1)
        tp = _probs(inp["target_logits"], t_tok).view(B, gamma + 1, V)
        ids = inp["draft_tokens"].view(B, gamma).to(torch.int32)
        if inp.get("draft_logits") is not None:
            dp = _probs(inp["draft_logits"], inp["temperature"].repeat_interleave(gamma)).view(B, gamma, V)
        elif inp.get("draft_probs") is not None:
            dp = inp["draft_probs"].float().view(B, gamma, V)
        else:
            dp = torch.zeros(B * gamma, V, device=tp.device).scatter_(1, ids.view(-1, 1).long(), 1.0).view(B, gamma, V)
        out = chain_speculative_sampling(dp, ids, tp)
        out = out[0] if isinstance(out, tuple) else out
        num_accepted = ((out != -1).sum(1) - 1).to(torch.int32)
        return out, num_accepted

    return run


def vllm_rejection(inputs: dict, mode: str) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
    """vLLM V1 ``rejection_sample``: temperature + softmax of the draft rows, a bonus sample, the call.

    vLLM samples the bonus token outside the rejection sampler; we time an
    exponential-race sample of the bonus rows as its stand-in.
    """
    try:
        from vllm.v1.sample import rejection_sampler as rs
    except Exception as exc:  # noqa: BLE001 - ImportError, or vLLM failing at import time
        raise Unavailable(f"vllm not importable ({exc.__class__.__name__})") from None
    if inputs["target_logits"].device.type != "cuda":
        raise Unavailable("needs CUDA")
    params = list(inspect.signature(rs.rejection_sample).parameters)
    wants_probs = "target_probs" in params
    B, gamma = inputs["batch"], inputs["gamma"]
    greedy = mode == "greedy"
    num_draft = [gamma] * B
    device = inputs["target_logits"].device
    tgt_rows = (torch.arange(B * gamma, device=device) + torch.arange(B, device=device).repeat_interleave(gamma))
    bonus_rows = torch.arange(1, B + 1, device=device) * (gamma + 1) - 1
    cu = torch.arange(1, B + 1, device=device, dtype=torch.int32) * gamma  # vLLM: cumsum without the 0

    def run(inp: dict):
        temp = inp.get("temperature")
        meta = SimpleNamespace(all_greedy=greedy, all_random=not greedy,
                               temperature=temp if temp is not None else torch.zeros(B, device=device),
                               generators={}, top_k=None, top_p=None, max_num_logprobs=None)
        logits = inp["target_logits"]
        if greedy:
            bonus = torch.argmax(logits[bonus_rows].float(), -1)
            target = logits[tgt_rows].float()
        else:
            bonus = _race(_probs(logits[bonus_rows], temp))
            target = logits[tgt_rows].float() / temp.repeat_interleave(gamma)[:, None]
            if wants_probs:
                target = torch.softmax(target, -1)
        draft_probs = None
        if inp.get("draft_logits") is not None:
            draft_probs = _probs(inp["draft_logits"], temp.repeat_interleave(gamma))
        elif inp.get("draft_probs") is not None:
            draft_probs = inp["draft_probs"].float().contiguous()
        out = rs.rejection_sample(inp["draft_tokens"].to(torch.int32).contiguous(), num_draft, gamma, cu,
                                  draft_probs, target.contiguous(), bonus.view(B, 1).to(torch.int32).contiguous(),
                                  meta)
        num_accepted = ((out != -1).sum(1) - 1).to(torch.int32)
        return out, num_accepted

    return run
