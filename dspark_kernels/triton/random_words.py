"""random_words: the Triton kernel lives with the shared Philox helpers (``philox.py``)."""

from .philox import random_words  # noqa: F401
