"""dspark_kernels: fused operators for block-parallel speculative decoding.

Ops are registered as ``torch.ops.dspark.*`` and exposed as documented Python
functions here. ``backends()`` says which implementations can run.
"""

from ._backend import backends
from . import _registration  # noqa: F401  (schemas, fakes, fallbacks)
from .ops import verify_block
from .drafting import draft_sample_block, schedule_verify_lens
from .kv import kv_commit, kv_release_pages, state_select, window_commit
from .moe import fused_moe, grouped_gemm, grouped_gemm_masked, moe_align
from .attention import draft_block_attention

__all__ = ["backends", "verify_block", "draft_sample_block", "schedule_verify_lens",
           "kv_commit", "kv_release_pages", "window_commit", "state_select",
           "moe_align", "grouped_gemm", "grouped_gemm_masked", "fused_moe", "draft_block_attention"]
__version__ = "0.1.0"
