"""The reference draft/verify loop and its small models (docs/loop.md).

* ``models``: the MoE target (paged KV cache, hidden states for the drafter) and
  the DSpark drafter (parallel block, context window, Markov and confidence heads);
* ``engine``: ``SpecDecoder``, the continuously batched draft → schedule → verify →
  commit loop on ``dspark_kernels`` ops (``backend="reference"`` for the spec);
* ``train``: the byte-level target trained on the Python standard library's
  source and the drafter distilled from it (cached after the first run);
* ``python -m dspark_kernels.loop``: the main job.
"""

from .engine import OpTimers, Request, SpecDecoder
from .models import Drafter, DrafterConfig, Target, TargetConfig

__all__ = ["OpTimers", "Request", "SpecDecoder", "Drafter", "DrafterConfig", "Target", "TargetConfig"]
