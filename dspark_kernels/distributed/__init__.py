"""Vocabulary-parallel speculative verification and drafting over torch.distributed.

The target's LM head is split by vocabulary (each rank holds ``[T, V / P]`` logits).
These ops verify and sample on the shards, without gathering the logits, and return
the same integers as the single-device ops on the gathered logits (docs/distributed.md):

* ``verify_block(target_logits, draft_tokens, cu_num_draft, *, vocab_start, vocab_size, group, ...)``
* ``verify_tree(target_logits, draft_tokens, parents, cu_num_draft, *, vocab_start, vocab_size, group, ...)``
* ``draft_sample_block(base_logits, anchor, *, vocab_start, vocab_size, group, ...)``
* ``stats``: collectives and payload bytes issued by this process (``stats.reset()``).
"""

from ._comm import CommStats, stats
from .drafting import draft_sample_block
from .tree import verify_tree
from .verify import verify_block

__all__ = ["verify_block", "verify_tree", "draft_sample_block", "stats", "CommStats"]
