// The sarkernels_simt ops: the CUDA kernels of csrc/kernels/ run on CPU tensors by the SIMT
// executor, through the glue CUDA uses (csrc/kernel_ops.h). Outputs are poisoned with NaN
// before the kernels run, and the error flags are read on every call (free here), so the
// ops raise exactly where the CPU backend does.
#include <torch/library.h>

#include <limits>

#include "kernel_ops.h"
#include "schemas.h"
#include "simt/module.h"

namespace sarkernels {
namespace {

struct SimtTarget {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static cudaStream_t stream(const at::Tensor&) { return nullptr; }

  static void poison(const at::Tensor& t) { t.fill_(std::numeric_limits<double>::quiet_NaN()); }

  static bool error_raised(const at::Tensor& flag, bool /*check*/, cudaStream_t) {
    return flag.item<int>() != 0;
  }
};

}  // namespace

TORCH_LIBRARY(sarkernels_simt, m) { define_ops(m); }

TORCH_LIBRARY_IMPL(sarkernels_simt, CPU, m) { register_kernel_ops<SimtTarget>(m); }

// Of the fused attention kernels compiled in (sarkernels/ops.py reads it).
SK_SIMT_BINDINGS(m) {
  pybind11::dict limits;
  for (const auto& l : kFusedAttentionLimits) limits[l.dtype] = l.max_head_dim;
  m.attr("attention_max_head_dim") = limits;
}

}  // namespace sarkernels
