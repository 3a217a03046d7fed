// The sarkernels ops on CUDA tensors: the one-source kernels of csrc/kernels/ (through
// csrc/kernel_ops.h) on the current stream under a device guard. No host sync except the
// error-flag read of kv_cache_append / interleave with check=True outside stream capture.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernel_ops.h"

namespace sarkernels {
namespace {

struct CudaTarget {
  using Guard = c10::cuda::CUDAGuard;

  static cudaStream_t stream(const at::Tensor& t) {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  }

  static void poison(const at::Tensor&) {}

  static bool error_raised(const at::Tensor& flag, bool check, cudaStream_t stream) {
    cudaStreamCaptureStatus capture;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (!check || capture != cudaStreamCaptureStatusNone) return false;
    int host = 0;
    C10_CUDA_CHECK(cudaMemcpyAsync(&host, flag.data_ptr<int>(), sizeof host,
                                   cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    return host != 0;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(sarkernels, CUDA, m) { register_kernel_ops<CudaTarget>(m); }

}  // namespace sarkernels
