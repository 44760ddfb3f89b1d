// Launch plans of the CUDA kernels: block sizes, grid formulas, shared memory and
// workspace layouts, as constexpr constants and plain functions of the shapes.
//
// One copy for both launchers: the compiled extension's csrc/cuda/<op>.cu call
// these functions, and the NVRTC launcher (dspark_kernels/nvrtc/) reads the
// constants from this file (parsed at import) and runs the same formulas, checked
// against these functions for a table of shapes in CI
// (python_tests/test_nvrtc.py::test_launch_plans_agree, through the extension's
// dspark_launch_plan, csrc/launch_plan.cpp).
//
// Rules that keep this file parseable by dspark_kernels/nvrtc/_source.py: every
// constant is `constexpr int|int64_t kName = <integer expression>;` on one line,
// inside `namespace <short name> {`; no other code changes a constant.
//
// Torch-free: a host compiler, nvcc and NVRTC all include it (the functions are
// DSPARK_HD because NVRTC rejects unannotated host functions; no kernel calls them).
#pragma once

#include "types.h"

namespace dspark {

namespace launch_util {
DSPARK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
DSPARK_HD int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
DSPARK_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
DSPARK_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
}  // namespace launch_util

// ---------------------------------------------------------------------------- random_words
namespace rw {
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

// Blocks of random_words_kernel for n words (n > 0).
DSPARK_HD int64_t blocks(int64_t n) { return launch_util::min64(launch_util::ceil_div(n, kThreads), kMaxBlocks); }
}  // namespace rw

// ---------------------------------------------------------------------------- schedule_verify_lens
namespace sched {
constexpr int kThreads = 256;
constexpr int kFinishThreads = 1024;

// One workspace: keys, survivals (8 bytes each), block results (8 bytes each), ranks
// (4 bytes); byte offsets. survival_kernel has ceil(R / kThreads) blocks, rank_kernel
// num_parts, finish_kernel one of kFinishThreads.
struct Workspace {
  int64_t num_parts, keys, quant, part_count, part_theta, rank, bytes;
};
DSPARK_HD Workspace workspace(int64_t R, int64_t gamma) {
  const int64_t n = R * gamma;
  Workspace w;
  w.num_parts = launch_util::ceil_div(n, kThreads);
  const int64_t slots = launch_util::max64(n, 1);
  const int64_t parts = launch_util::max64(w.num_parts, 1);
  w.keys = 0;
  w.quant = slots * 8;
  w.part_count = 2 * slots * 8;
  w.part_theta = (2 * slots + parts) * 8;
  w.rank = (2 * slots + 2 * parts) * 8;
  w.bytes = w.rank + slots * 4;
  return w;
}
}  // namespace sched

// ---------------------------------------------------------------------------- verify_block
namespace vb {
constexpr int kStatsThreads = 128;
constexpr int64_t kStatsSplit = 4096;  // multiple of every vector width of stats_kernel / mass_kernel
constexpr int kFilterThreads = 512;
constexpr int kWalkThreads = 256;
constexpr int kRaceThreads = 128;
constexpr int64_t kRaceSplit = 2048;  // multiple of 4 (one Philox call per 4 entries)
constexpr int kFinishThreads = 32;
constexpr int kBlockZThreads = 256;
constexpr int kBlockWalkThreads = 32;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kWorkspaceAlign = 256;

// The workspace of one call: byte offsets of the split partials, filtered-row
// thresholds, race descriptors, race partials and Z_j per target row (method="block"),
// each 256-byte aligned; a part a call does not use has size 0. The record sizes are
// sizeof(StatPartial), sizeof(RowFilter), sizeof(RaceDesc), sizeof(RacePartial).
struct Plan {
  int64_t num_splits, num_race_splits, stat_rows;
  int64_t partials, row_filter, desc, race_partials, z, bytes;
};
DSPARK_HD Plan plan(int64_t B, int64_t N, int64_t V, bool sampling, bool q_stats, bool with_filters, bool block,
                 int64_t stat_partial_size, int64_t row_filter_size, int64_t race_desc_size,
                 int64_t race_partial_size) {
  Plan p;
  const int64_t T = N + B;
  p.num_splits = launch_util::ceil_div(V, kStatsSplit);
  p.num_race_splits = launch_util::ceil_div(V, kRaceSplit);
  p.stat_rows = T + (q_stats ? N : 0);
  const int64_t partials_bytes = launch_util::align_up(p.stat_rows * p.num_splits * stat_partial_size, kWorkspaceAlign);
  const int64_t filter_bytes = with_filters ? launch_util::align_up(p.stat_rows * row_filter_size, kWorkspaceAlign) : 0;
  const int64_t desc_bytes = launch_util::align_up(B * race_desc_size, kWorkspaceAlign);
  const int64_t race_bytes = sampling ? launch_util::align_up(B * p.num_race_splits * race_partial_size, kWorkspaceAlign) : 0;
  const int64_t z_bytes = block ? launch_util::align_up(T * 8, kWorkspaceAlign) : 0;
  p.partials = 0;
  p.row_filter = partials_bytes;
  p.desc = p.row_filter + filter_bytes;
  p.race_partials = p.desc + desc_bytes;
  p.z = p.race_partials + race_bytes;
  p.bytes = p.z + z_bytes;
  return p;
}
}  // namespace vb

// ---------------------------------------------------------------------------- verify_tree
namespace vt {
constexpr int kThreads = 256;  // tree_kernel: grid (B)

// fp32 workspace elements: one row of V per request when sampling (at least 1).
DSPARK_HD int64_t workspace_floats(int64_t B, int64_t V, bool sampling) { return sampling ? B * V : 1; }
}  // namespace vt

// ---------------------------------------------------------------------------- kv ops
namespace kv {
constexpr int kCommitThreads = 128;
constexpr int kMaxCachesPerLaunch = 96;  // keeps CommitParams under the classic 4 KB parameter limit
constexpr int64_t kCommitMaxTile = 4096;  // bytes of a row per CTA
constexpr int64_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without the opt-in attribute
constexpr int kReleaseWarps = 4;
constexpr int kWindowThreads = 128;
constexpr int kStateThreads = 256;
constexpr int64_t kStateTile = 16384;  // bytes per CTA

DSPARK_HD int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }

// kv_commit: the byte tile of a row each CTA moves, its dynamic shared memory
// (W planned moves of move_size bytes, then W staged tiles) and the tiles per row
// (grid (B, tiles, caches of the launch)). A whole row when it fits, so one CTA per
// (request, cache) in the usual case; smaller when W staged rows would not fit in the
// default shared memory.
struct CommitPlan {
  int64_t tile, smem, tiles;
};
DSPARK_HD int64_t commit_smem(int64_t W, int64_t tile, int64_t move_size) { return align16(W * move_size) + W * tile; }
DSPARK_HD CommitPlan commit_plan(int64_t W, int64_t max_row, int64_t move_size) {
  CommitPlan c;
  int64_t tile = launch_util::max64(16, launch_util::min64(align16(max_row), kCommitMaxTile));
  while (commit_smem(W, tile, move_size) > kDefaultSmem && tile > 16) tile = launch_util::max64(16, (tile / 2) & ~int64_t(15));
  c.tile = tile;
  c.smem = commit_smem(W, tile, move_size);
  c.tiles = launch_util::max64(1, launch_util::ceil_div(max_row, tile));
  return c;
}

// kv_release_pages: blocks of kReleaseWarps warps, one warp per request.
DSPARK_HD int64_t release_blocks(int64_t B) { return launch_util::ceil_div(B, kReleaseWarps); }

// state_select: grid (B, tiles of kStateTile bytes).
DSPARK_HD int64_t state_tiles(int64_t row_bytes) { return launch_util::ceil_div(row_bytes, kStateTile); }
}  // namespace kv

}  // namespace dspark
