"""schedule_verify_lens, pure PyTorch/Python: the executable spec (docs/drafting.md).

DSpark's Algorithm 1, written one candidate at a time. The arithmetic is fixed so
that every backend gives the same integers (``csrc/include/dspark/schedule.h``):

* ``c = clamp(confidence, 0, 1)`` in fp32, NaN counts as 0;
* survival ``a[r, j] = c[r, 0] * ... * c[r, j]``, an fp32 running product (left to right);
* candidates ``(r, j)`` in the order ``a`` descending, ``r`` ascending, ``j`` ascending;
* ``tau_k = R + sum of the first k survivals``, each survival counted as
  ``floor(a * 2^40) / 2^40`` so the sum is exact (integers) in any order;
* ``Theta_k = tau_k * SPS(R + k)`` in fp64 (computed as ``double(tau_k * 2^40) * sps``);
* ``k`` runs from 0 (``Theta_0 = R * SPS(R)``: verify no draft) to
  ``min(R * gamma, Bmax - R)`` (``B = R + k`` never exceeds ``Bmax = len(sps) - 1``);
* lossless mode (``early_stop=True``): admit while ``Theta_k > Theta_{k-1}``, stop at the
  first admission that does not improve; async mode: the ``k`` of the largest
  ``Theta_k`` (the smallest such ``k`` on ties);
* ``verify_lens[r]`` = how many of the first ``k`` candidates belong to request ``r``
  (always a prefix of its block), ``cu_verify = [0, cumsum(verify_lens)]``.
"""

from __future__ import annotations

import torch

SCALE = 2**40  # fixed-point units of survival


def survival(confidence: torch.Tensor) -> torch.Tensor:
    """fp32 running products of the clamped confidences, ``[R, gamma]``."""
    c = confidence.to(torch.float32)
    c = torch.where(c > 0, torch.clamp(c, max=1.0), torch.zeros_like(c))  # NaN -> 0
    a = torch.empty_like(c)
    running = torch.ones(c.shape[0], dtype=torch.float32, device=c.device)
    for j in range(c.shape[1]):
        running = running * c[:, j]
        a[:, j] = running
    return a


def schedule_verify_lens(confidence: torch.Tensor, sps: torch.Tensor,
                         early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    device = confidence.device
    num_req, gamma = confidence.shape
    bmax = sps.shape[0] - 1
    a = survival(confidence.cpu()).tolist()
    table = sps.cpu().to(torch.float64).tolist()

    order = sorted(((a[r][j], r, j) for r in range(num_req) for j in range(gamma)),
                   key=lambda t: (-t[0], t[1], t[2]))
    max_admit = max(0, min(num_req * gamma, bmax - num_req))

    tau = num_req * SCALE
    best_theta = float(tau) * table[num_req] if num_req <= bmax else float("nan")
    best_k = 0
    for k in range(1, max_admit + 1):
        tau += int(order[k - 1][0] * SCALE)  # floor: a * 2^40 is exact in fp64
        theta = float(tau) * table[num_req + k]
        if theta > best_theta:
            best_theta, best_k = theta, k
        elif early_stop:
            break

    lens = [0] * num_req
    for _, r, _ in order[:best_k]:
        lens[r] += 1
    verify_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(num_req + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(verify_lens, 0)
    return verify_lens.to(device), cu.to(device)
