// kv_commit on CUDA: argument checks, the cache descriptors and the launches of
// commit_kernel (dspark/kv.cuh, where the algorithm is described). Up to
// kMaxCachesPerLaunch caches go in one launch, their descriptors passed by value
// as kernel parameters: no host-to-device copy, no host buffer to keep alive, and
// the call can be captured in a CUDA graph. No host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "dspark/kv.cuh"
#include "kv.h"

namespace dspark {
namespace {

constexpr const char* kOp = "kv_commit";

kv::IntArray int_array(const at::Tensor& t) { return {t.const_data_ptr(), t.scalar_type() == at::kLong ? 1 : 0}; }

// Raise commit_kernel's dynamic shared-memory limit to `bytes` (once per size and device).
void allow_smem(int64_t bytes, int device, int64_t W) {
  static std::mutex mu;
  static int64_t allowed[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device >= 0 && device < 64 && allowed[device] >= bytes) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= optin, kOp, ": accept_path is too wide for the CUDA kernel: W = ", W, " needs ", bytes,
              " bytes of shared memory, the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kv::commit_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (device >= 0 && device < 64) allowed[device] = bytes;
}

}  // namespace

at::Tensor kv_commit_cuda(at::TensorList caches, const at::Tensor& block_table, int64_t page_size,
                          const at::Tensor& committed_len, const at::Tensor& accept_path,
                          const at::Tensor& num_accept) {
  check_kv_commit_args(caches, block_table, page_size, committed_len, accept_path, num_accept);
  TORCH_CHECK(block_table.is_cuda(), kOp, ": block_table must be a CUDA tensor, got ", block_table.device());
  c10::cuda::CUDAGuard guard(block_table.device());
  const int64_t B = committed_len.size(0);
  const int64_t P = block_table.size(1);
  const int64_t W = accept_path.size(1);
  at::Tensor new_len = at::empty({B}, committed_len.options().dtype(at::kInt));
  if (B == 0) return new_len;
  TORCH_CHECK(B <= 0x7fffffffLL, kOp, ": batch of ", B, " requests is too large for one grid");

  // Index tensors: 1-D ones contiguous, 2-D ones with unit column stride (row stride free).
  const at::Tensor L = committed_len.contiguous();
  const at::Tensor n = num_accept.contiguous();
  const at::Tensor bt = (P <= 1 || block_table.stride(1) == 1) ? block_table : block_table.contiguous();
  const at::Tensor path = (W <= 1 || accept_path.stride(1) == 1) ? accept_path : accept_path.contiguous();

  kv::CommitParams p{};
  p.block_table = int_array(bt);
  p.committed_len = int_array(L);
  p.accept_path = int_array(path);
  p.num_accept = int_array(n);
  p.new_len = new_len.mutable_data_ptr<int32_t>();
  p.bt_stride = bt.stride(0);
  p.path_stride = path.stride(0);
  p.P = P;
  p.W = W;
  p.num_pages = caches.empty() ? 0 : caches[0].size(0);
  p.page_size = page_size;
  p.B = B;

  // Tile, shared memory and tiles per row: dspark/launch.h (kv::commit_plan).
  int64_t max_row = 0;
  for (const at::Tensor& c : caches) max_row = std::max(max_row, kvcheck::row_bytes(c, 2));
  TORCH_CHECK(max_row <= 0x7fffffffLL, kOp, ": a cache row of ", max_row, " bytes is too large");
  const kv::CommitPlan plan = kv::commit_plan(W, max_row, static_cast<int64_t>(sizeof(kv::Move)));
  const int64_t tile = plan.tile;
  const int64_t smem = plan.smem;
  if (smem > kv::kDefaultSmem) allow_smem(smem, block_table.get_device(), W);
  const int64_t tiles = plan.tiles;
  TORCH_CHECK(tiles <= 65535, kOp, ": a cache row of ", max_row, " bytes needs ", tiles,
              " tiles of ", tile, " bytes, more than one grid allows (accept_path width W = ", W, ")");
  p.tile_bytes = static_cast<int32_t>(tile);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = static_cast<int64_t>(caches.size());
  for (int64_t c0 = 0; c0 == 0 || c0 < C; c0 += kv::kMaxCachesPerLaunch) {
    const int64_t count = std::min<int64_t>(kv::kMaxCachesPerLaunch, C - c0);
    for (int64_t i = 0; i < count; ++i) {
      const at::Tensor& t = caches[c0 + i];
      const int64_t es = static_cast<int64_t>(t.element_size());
      kv::CacheDesc& d = p.caches[i];
      d.base = static_cast<char*>(t.data_ptr());
      d.page_stride = t.stride(0) * es;
      d.slot_stride = t.stride(1) * es;
      d.row_bytes = static_cast<int32_t>(kvcheck::row_bytes(t, 2));
      d.vec = kv::vector_bytes(reinterpret_cast<uint64_t>(d.base) | static_cast<uint64_t>(d.page_stride) |
                               static_cast<uint64_t>(d.slot_stride) | static_cast<uint64_t>(d.row_bytes));
    }
    p.num_caches = static_cast<int32_t>(std::max<int64_t>(count, 0));
    p.write_new_len = c0 == 0 ? 1 : 0;
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(p.num_caches > 0 ? tiles : 1),
                    static_cast<unsigned>(std::max<int32_t>(p.num_caches, 1)));
    kv::commit_kernel<<<grid, kv::kCommitThreads, static_cast<size_t>(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return new_len;
}

}  // namespace dspark
