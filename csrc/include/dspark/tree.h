// The decision rules of verify_tree (docs/verification.md, "verify_tree"), shared by the
// CPU and CUDA kernels (__host__ __device__). The PyTorch reference
// (dspark_kernels/reference/verify_tree.py) states the same rules in tensor form; the
// Triton kernel restates them in Triton's language. The per-token rules (accept test,
// residual, race) are those of sampling.h, unchanged: a chain is verify_block.
//
//   nodes       request-local j = 0..n-1, topological: -1 <= parents[j] < j (-1 = the root)
//   depth       root 0, depth(j) = depth(parents[j]) + 1
//   coins       child of rank r among its siblings: accept stream at offset + depth(parent), index r
//   emitted     resample stream at offset + depth(current node), index v
//   residual    w = log max(p' - q_c, 0) (residual_log_weight); p' <- w - lse(w) with
//               lse = max + float(log(sum_fp64 exp_fp32(w - max))); no finite w: p' kept
// No torch header: also compiles under NVRTC.
#pragma once

#include "philox.h"
#include "sampling.h"

namespace dspark {

// Window index (kv_commit) of local node j; the root is 0.
DSPARK_HD int32_t tree_window_index(int64_t node) { return static_cast<int32_t>(node + 1); }

// Target row (within the request's rows) of the distribution after `node` (-1 = root).
DSPARK_HD int64_t tree_target_row(int64_t start, int64_t b, int64_t node) { return start + b + 1 + node; }

// A parent index that keeps the nodes topological and inside the request.
DSPARK_HD bool tree_parent_ok(int64_t parent, int64_t local) { return parent >= -1 && parent < local; }

DSPARK_HD int64_t tree_child_depth(int64_t parent_depth) { return parent_depth + 1; }

// Random-stream positions: the coins of a node's children and the node's emitted sample
// share offset + depth(node); the rank of the child among its siblings is the coin's index.
DSPARK_HD uint64_t tree_position(uint64_t offset, int64_t depth) {
  return offset + static_cast<uint64_t>(depth);
}

// A child id that can be accepted; -1 (padding) and ids outside [0, V) are skipped:
// never accepted, p' unchanged (they were not drawn from q).
DSPARK_HD bool tree_child_valid(int64_t x, int64_t V) { return x >= 0 && x < V; }

// Children deeper than max_depth are never visited (the outputs have max_depth + 1 columns).
DSPARK_HD bool tree_may_descend(int64_t depth, int64_t max_depth) { return depth < max_depth; }

// The log-normaliser of residual log-weights w: m = max finite w, sum = fp64 sum of
// fp32 exp(w - m) over finite w.
DSPARK_HD float tree_residual_lse(float m, double sum) { return m + static_cast<float>(log(sum)); }

DSPARK_HD float tree_normalised(float w, float lse) { return w > DSPARK_NEG_INF ? w - lse : DSPARK_NEG_INF; }

}  // namespace dspark
