// Every dspark op's schema and its CPU / CUDA registrations, in one place.
// Fake (meta) kernels are registered from Python (dspark_kernels/_fake.py), so
// torch.compile and CUDA-graph capture see exact output shapes.
#include <torch/library.h>

#include "random_words.h"
#include "verify_block.h"

TORCH_LIBRARY(dspark, m) {
  // Batched lossless acceptance (DESIGN.md §5). Outputs: output_tokens
  // [B, max_num_draft + 1] int32 (-1 padded) and num_accepted [B] int32.
  m.def(
      "verify_block(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, *, "
      "Tensor? draft_logits=None, Tensor? draft_probs=None, Tensor? temperature=None, "
      "Tensor? top_k=None, Tensor? top_p=None, Tensor seed, Tensor offset, SymInt max_num_draft) "
      "-> (Tensor output_tokens, Tensor num_accepted)");
  // The raw 32-bit Philox words of the randomness contract (int64 in [0, 2^32)),
  // for tests and engines that want to check their own RNG against ours.
  m.def("random_words(Tensor seed, Tensor position, Tensor index, int salt) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("verify_block", &dspark::verify_block_cpu);
  m.impl("random_words", &dspark::random_words_cpu);
}

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("verify_block", &dspark::verify_block_cuda);
  m.impl("random_words", &dspark::random_words_cuda);
}
#endif
