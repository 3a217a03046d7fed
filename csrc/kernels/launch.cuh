// Launching a kernel: one plan (grid, block, dynamic shared memory) per kernel, computed by
// a host function beside the kernel, and one launch() that runs it on the current CUDA
// stream (nvcc) or under the SIMT executor (host compiler).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/platform.cuh"

namespace sarkernels::kernels {

struct LaunchPlan {
  dim3 grid;
  dim3 block;
  size_t smem = 0;  // dynamic shared memory, bytes
};

// Whole warps for a block whose threads stride over `work` items, at most max_threads.
inline unsigned block_threads(int64_t work, unsigned max_threads = 128) {
  const int64_t threads = (work + 31) / 32 * 32;
  return static_cast<unsigned>(threads < 32 ? 32 : threads > max_threads ? max_threads : threads);
}

// What CUDA allows in one grid dimension.
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

// A grid dimension from a block count, or an error naming the kernel beyond `limit`.
inline unsigned grid_dim(const char* kernel, int64_t blocks, int64_t limit) {
  if (blocks > limit) {
    throw std::invalid_argument(std::string("sarkernels: ") + kernel + " needs " +
                                std::to_string(blocks) + " blocks in one grid dimension (at most " +
                                std::to_string(limit) + ")");
  }
  return static_cast<unsigned>(blocks);
}

template <typename... KArgs, typename... Args>
void launch(const char* name, const LaunchPlan& plan, cudaStream_t stream,
            void (*kernel)(KArgs...), Args&&... args) {
  if (size_t(plan.grid.x) * plan.grid.y * plan.grid.z == 0) return;
#if SK_EMULATED
  (void)stream;
  ::sarkernels::simt::launch(name, plan.grid, plan.block, plan.smem, kernel,
                             std::forward<Args>(args)...);
#else
  auto check = [name](cudaError_t e) {
    if (e != cudaSuccess) {
      throw std::runtime_error(std::string("sarkernels: CUDA kernel ") + name +
                               " failed to launch: " + cudaGetErrorString(e));
    }
  };
  if (plan.smem > 48 * 1024) {
    int device = 0, most = 0;
    check(cudaGetDevice(&device));
    check(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (plan.smem > size_t(most)) {
      throw std::runtime_error(std::string("sarkernels: CUDA kernel ") + name + " needs " +
                               std::to_string(plan.smem) + " bytes of shared memory per block, " +
                               "this GPU gives at most " + std::to_string(most));
    }
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.smem)));
  }
  kernel<<<plan.grid, plan.block, plan.smem, stream>>>(std::forward<Args>(args)...);
  check(cudaGetLastError());
#endif
}

}  // namespace sarkernels::kernels
