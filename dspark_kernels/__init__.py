"""dspark_kernels: fused operators for block-parallel speculative decoding.

Ops are registered as ``torch.ops.dspark.*`` and exposed as documented Python
functions here. ``backends()`` says which implementations can run.
"""

from ._backend import backends
from . import _registration  # noqa: F401  (schemas, fakes, fallbacks)
from .ops import verify_block

__all__ = ["backends", "verify_block"]
__version__ = "0.1.0"
