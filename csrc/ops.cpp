// The CPU / CUDA kernels of the dspark ops. The schemas are not here: each op is
// declared once, in Python, by its OpSpec beside its public function
// (dspark_kernels/<area>.py), and dspark_kernels/_registry.py defines every schema
// before it loads this library. A kernel's C++ signature must match its schema
// (the dispatcher checks it when the library is loaded).
#include <torch/library.h>

#include "drafting.h"
#include "kv.h"
#include "random_words.h"
#include "token_logprobs.h"
#include "verify_block.h"
#include "verify_tree.h"

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("verify_block", &dspark::verify_block_cpu);
  m.impl("random_words", &dspark::random_words_cpu);
  m.impl("kv_commit", &dspark::kv_commit_cpu);
  m.impl("kv_release_pages", &dspark::kv_release_pages_cpu);
  m.impl("window_commit", &dspark::window_commit_cpu);
  m.impl("state_select", &dspark::state_select_cpu);
  m.impl("schedule_verify_lens", &dspark::schedule_verify_lens_cpu);
  m.impl("draft_sample_block", &dspark::draft_sample_block_cpu);
  m.impl("verify_tree", &dspark::verify_tree_cpu);
  m.impl("token_logprobs", &dspark::token_logprobs_cpu);
}

#ifdef DSPARK_WITH_CUDA
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("verify_block", &dspark::verify_block_cuda);
  m.impl("random_words", &dspark::random_words_cuda);
  m.impl("kv_commit", &dspark::kv_commit_cuda);
  m.impl("kv_release_pages", &dspark::kv_release_pages_cuda);
  m.impl("window_commit", &dspark::window_commit_cuda);
  m.impl("state_select", &dspark::state_select_cuda);
  m.impl("schedule_verify_lens", &dspark::schedule_verify_lens_cuda);
  m.impl("verify_tree", &dspark::verify_tree_cuda);
}
#endif
