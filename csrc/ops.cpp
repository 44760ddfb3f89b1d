// Every dspark op's schema and its CPU / CUDA registrations, in one place.
// Fake (meta) kernels are registered from Python (dspark_kernels/_registration.py), so
// torch.compile and CUDA-graph capture see exact output shapes.
#include <torch/library.h>

#include "drafting.h"
#include "kv.h"
#include "random_words.h"
#include "verify_block.h"

TORCH_LIBRARY(dspark, m) {
  // Batched lossless acceptance (docs/verification.md). Outputs: output_tokens
  // [B, max_num_draft + 1] int32 (-1 padded) and num_accepted [B] int32.
  m.def(
      "verify_block(Tensor target_logits, Tensor draft_tokens, Tensor cu_num_draft, *, "
      "Tensor? draft_logits=None, Tensor? draft_probs=None, Tensor? temperature=None, "
      "Tensor? top_k=None, Tensor? top_p=None, Tensor seed, Tensor offset, SymInt max_num_draft) "
      "-> (Tensor output_tokens, Tensor num_accepted)");
  // The raw 32-bit Philox words of the randomness contract (int64 in [0, 2^32)),
  // for tests and engines that want to check their own RNG against ours.
  m.def("random_words(Tensor seed, Tensor position, Tensor index, int salt) -> Tensor");
  // KV rollback (docs/kv.md; dspark_kernels/kv.py states the semantics). kv_commit
  // moves the accepted path into place in every cache and returns new_len [B] int32;
  // kv_release_pages drops references past new_len and returns the freed pages
  // [B, P] int32 (-1 padded) and their counts [B] int32.
  m.def(
      "kv_commit(Tensor(a!)[] caches, Tensor block_table, int page_size, Tensor committed_len, "
      "Tensor accept_path, Tensor num_accept) -> Tensor");
  m.def(
      "kv_release_pages(Tensor block_table, Tensor new_len, Tensor old_len, int page_size, "
      "Tensor(a!) refcount) -> (Tensor freed, Tensor num_freed)");
  m.def("window_commit(Tensor(a!) window, Tensor rows, Tensor cu, Tensor positions, Tensor keep) -> ()");
  m.def("state_select(Tensor states, Tensor index, Tensor(a!) out) -> ()");
  // DSpark's prefix scheduler (Algorithm 1; dspark_kernels/drafting.py states the
  // rules): verify_lens [R] int32 and cu_verify [R + 1] int32.
  m.def(
      "schedule_verify_lens(Tensor confidence, Tensor sps, bool early_stop=True) "
      "-> (Tensor verify_lens, Tensor cu_verify)");
  // Block drafting with the DSpark Markov head: draft_tokens [B, gamma] int32 and the
  // sampled-from fp32 logits [B, gamma, V] (or [0] when return_logits is false).
  m.def(
      "draft_sample_block(Tensor base_logits, Tensor anchor, *, Tensor? markov_w1=None, "
      "Tensor? markov_w2=None, Tensor? temperature=None, Tensor? top_k=None, Tensor? top_p=None, "
      "Tensor seed, Tensor offset, bool return_logits=True) -> (Tensor draft_tokens, Tensor draft_logits)");
  // MoE for the verify pass (dspark_kernels/moe.py states the semantics). No C++
  // kernels: the CPU key runs PyTorch and the CUDA key Triton, both registered from
  // Python (_registration.py). grouped_gemm_out is grouped_gemm(out=...).
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_m) "
      "-> (Tensor sorted_token_ids, Tensor expert_ids, Tensor num_tokens_post_pad)");
  m.def("grouped_gemm(Tensor a, Tensor w, Tensor expert_offsets) -> Tensor");
  m.def("grouped_gemm_out(Tensor a, Tensor w, Tensor expert_offsets, *, Tensor(a!) out) -> ()");
  // The masked (expert-parallel) layout: out [E, max_m, N], rows i >= masked_m[e] zero.
  m.def("grouped_gemm_masked(Tensor a, Tensor w, Tensor masked_m) -> Tensor");
  m.def(
      "fused_moe(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, *, "
      "str activation=\"silu\") -> Tensor");
  // fp8 e4m3 weights with block scales [E, ceil(N/bn), ceil(K/bk)], activations quantised
  // per token per bk columns (a separate op so that builds without it keep working).
  m.def(
      "fused_moe_fp8(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, Tensor w13_scale, "
      "Tensor w2_scale, *, int[] block_shape=[128, 128], str activation=\"silu\") -> Tensor");
  // The drafter's block attention (dspark_kernels/attention.py states the rules):
  // out [T, H, D] in q's dtype. No C++ kernels: the CPU key runs PyTorch SDPA and
  // the CUDA key Triton, both registered from Python (_registration.py).
  m.def(
      "draft_block_attention(Tensor q, Tensor k_block, Tensor v_block, Tensor k_ctx, Tensor v_ctx, "
      "Tensor cu_block, Tensor ctx_lens, *, Tensor? sinks=None, float? softmax_scale=None, "
      "int? window=None, SymInt max_block_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("verify_block", &dspark::verify_block_cpu);
  m.impl("random_words", &dspark::random_words_cpu);
  m.impl("kv_commit", &dspark::kv_commit_cpu);
  m.impl("kv_release_pages", &dspark::kv_release_pages_cpu);
  m.impl("window_commit", &dspark::window_commit_cpu);
  m.impl("state_select", &dspark::state_select_cpu);
  m.impl("schedule_verify_lens", &dspark::schedule_verify_lens_cpu);
  m.impl("draft_sample_block", &dspark::draft_sample_block_cpu);
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
}
#endif
