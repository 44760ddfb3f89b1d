"""Drop-in entry points for inference engines, in the engines' own layouts.

* :mod:`dspark_kernels.integrations.vllm` -- vLLM V1 ``rejection_sample`` /
  ``RejectionSampler`` and Model Runner V2's ``rejection_sample``.
* :mod:`dspark_kernels.integrations.sglang` -- sgl-kernel's
  ``tree_speculative_sampling_target_only`` / ``verify_tree_greedy`` and the KV
  commit from SGLang's ``accept_index``.
* :mod:`dspark_kernels.integrations.flashinfer` -- FlashInfer's
  ``chain_speculative_sampling``.

Each adapter takes the engine's arguments, maps them onto ``verify_block`` /
``verify_tree`` / ``kv_commit`` with views and small integer tensors (no host
sync, no copy of an ``[N, V]`` tensor except where the engine hands over
probabilities, see docs/integration.md) and returns what the engine's function
returns. None of them imports an engine: they read the engine's objects by field
name. Import a submodule explicitly (``from dspark_kernels.integrations import vllm``).
"""

__all__ = ["vllm", "sglang", "flashinfer"]
