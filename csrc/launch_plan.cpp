// dspark_launch_plan: the launch plans of dspark/launch.h behind a plain C entry
// point of the extension (no torch, no GPU), so that CI can check the NVRTC
// launcher's copy of the formulas (dspark_kernels/nvrtc/plans.py) against the
// ones the compiled CUDA launchers call (python_tests/test_nvrtc.py).
//
// what: "random_words" | "schedule" | "verify_block" | "verify_tree" | "kv_commit" |
// "kv_release_pages" | "state_select"; in / out: the arguments and results in the
// order of the function in launch.h (see the cases below). Returns the number of
// results written, or -1 for an unknown `what` or too few arguments / results.
#include <cstdint>
#include <cstring>

#include "dspark/launch.h"
#include "dspark/schedule.h"

extern "C" __attribute__((visibility("default"))) int dspark_launch_plan(const char* what, const int64_t* in,
                                                                          int n_in, int64_t* out, int n_out) {
  using namespace dspark;
  auto is = [&](const char* name, int need_in, int need_out) {
    return std::strcmp(what, name) == 0 && n_in >= need_in && n_out >= need_out;
  };
  if (is("random_words", 1, 1)) {  // n -> blocks
    out[0] = rw::blocks(in[0]);
    return 1;
  }
  if (is("schedule", 3, 8)) {  // R, gamma, bmax -> num_parts, keys, quant, part_count, part_theta, rank, bytes, max_admit
    const sched::Workspace w = sched::workspace(in[0], in[1]);
    const int64_t r[8] = {w.num_parts, w.keys, w.quant, w.part_count, w.part_theta, w.rank, w.bytes,
                          schedule_max_admit(in[0], in[1], in[2])};
    std::memcpy(out, r, sizeof(r));
    return 8;
  }
  if (is("verify_block", 11, 9)) {  // B, N, V, sampling, q_stats, with_filters, block, 4 record sizes
    const vb::Plan p = vb::plan(in[0], in[1], in[2], in[3] != 0, in[4] != 0, in[5] != 0, in[6] != 0, in[7], in[8],
                                in[9], in[10]);
    const int64_t r[9] = {p.num_splits, p.num_race_splits, p.stat_rows, p.partials, p.row_filter,
                          p.desc, p.race_partials, p.z, p.bytes};
    std::memcpy(out, r, sizeof(r));
    return 9;
  }
  if (is("verify_tree", 3, 1)) {  // B, V, sampling -> workspace floats
    out[0] = vt::workspace_floats(in[0], in[1], in[2] != 0);
    return 1;
  }
  if (is("kv_commit", 3, 3)) {  // W, max_row, sizeof(Move) -> tile, smem, tiles
    const kv::CommitPlan c = kv::commit_plan(in[0], in[1], in[2]);
    out[0] = c.tile;
    out[1] = c.smem;
    out[2] = c.tiles;
    return 3;
  }
  if (is("kv_release_pages", 1, 1)) {  // B -> blocks
    out[0] = kv::release_blocks(in[0]);
    return 1;
  }
  if (is("state_select", 1, 1)) {  // row_bytes -> tiles
    out[0] = kv::state_tiles(in[0]);
    return 1;
  }
  return -1;
}
