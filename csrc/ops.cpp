// The op schemas (the contract of sarkernels.ops) and the _C module's build information.
// Backends register implementations in their own files; fake impls and autograd are
// registered in Python (sarkernels/ops.py).
#include <torch/extension.h>
#include <torch/library.h>
#ifdef SARKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(sarkernels, m) {
  m.def(
      "set_attention(Tensor q, Tensor k, Tensor v, Tensor q_sets, Tensor k_sets, bool strict, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "set_attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor q_sets, Tensor k_sets, bool strict, float scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor slots) -> ()");
  m.def(
      "interleave_position_instructions(Tensor tokens, Tensor positions, Tensor instruction, "
      "Tensor? prefix, int num_heads, int grid_h, int grid_w, float rope_base, bool merge) -> "
      "Tensor");
  m.def(
      "interleave_position_instructions_backward(Tensor grad, Tensor positions, "
      "Tensor instruction, int prefix_len, int num_heads, int grid_h, int grid_w, "
      "float rope_base, bool merge) -> (Tensor grad_tokens, Tensor grad_instruction, "
      "Tensor grad_prefix)");
}

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
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
  info["openmp"] = at::get_parallel_info().find("OpenMP") != std::string::npos;
  m.attr("build_info") = info;
}
