// The sarkernels op library (schemas from schemas.h) and the _C module's build information.
// Backends register implementations in their own files (cpu/ops_cpu.cpp, cuda/ops_cuda.cu).
#include <torch/extension.h>
#include <torch/library.h>

#include "sarkernels/attention_limits.h"
#include "schemas.h"
#ifdef SARKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(sarkernels, m) { sarkernels::define_ops(m); }

// setup.py / CMake pass what they built against and for.
#ifndef SARKERNELS_TORCH_VERSION
#define SARKERNELS_TORCH_VERSION "unknown"
#endif
#ifndef SARKERNELS_ARCHS
#define SARKERNELS_ARCHS ""
#endif

namespace {
std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sarkernels compiled kernels; the ops live in torch.ops.sarkernels";
  py::dict info;
  info["compiler"] = compiler();
  info["torch_version"] = SARKERNELS_TORCH_VERSION;
#ifdef SARKERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = SARKERNELS_ARCHS;
  py::dict limits;  // of the fused attention kernels compiled in (sarkernels/ops.py reads it)
  for (const auto& l : sarkernels::kFusedAttentionLimits) limits[l.dtype] = l.max_head_dim;
  m.attr("attention_max_head_dim") = limits;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
  info["openmp"] = at::get_parallel_info().find("OpenMP") != std::string::npos;
  m.attr("build_info") = info;
}
