"""dspark_kernels: fused operators for block-parallel speculative decoding.

Every op is a documented Python function here and a custom op
``torch.ops.dspark.<op>``; ``backends()`` says which implementations run on this
install. Environment: ``DSPARK_NO_EXTENSION=1`` imports without loading the
compiled extension, ``DSPARK_KERNELS_LIBRARY=path`` loads that library instead,
``DSPARK_DEBUG=1`` runs the data-dependent checks on CUDA tensors too.
"""

from . import _registry
from ._registry import backends
from .verification import token_logprobs, verify_block, verify_tree
from .randomness import SALT_ACCEPT, SALT_DRAFT, SALT_RESAMPLE, random_words
from .drafting import draft_sample_block, schedule_verify_lens
from .kv import kv_commit, kv_release_pages, state_select, window_commit
from .moe import fused_moe, grouped_gemm, grouped_gemm_masked, moe_align
from .attention import draft_block_attention

# Every op above is declared; now load the compiled kernels and register the rest.
_registry.finalize()

__all__ = ["backends", "verify_block", "verify_tree", "token_logprobs", "random_words", "SALT_DRAFT", "SALT_ACCEPT", "SALT_RESAMPLE",
           "draft_sample_block", "schedule_verify_lens", "kv_commit", "kv_release_pages", "window_commit",
           "state_select", "moe_align", "grouped_gemm", "grouped_gemm_masked", "fused_moe", "draft_block_attention"]
__version__ = "0.1.0"
