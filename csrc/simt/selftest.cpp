// The self-test kernels (selftest_kernels.cuh) as functions of sarkernels._simt on CPU
// tensors, for python_tests/test_simt_executor.py.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "simt/module.h"
#include "simt/selftest_kernels.cuh"

namespace sarkernels::kernels::selftest {
namespace {

void check(const at::Tensor& t, const char* name, at::ScalarType dtype,
           std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name,
              ": expected a contiguous CPU tensor, got device ", t.device(),
              t.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, ": expected shape ", shape, ", got ",
              t.sizes());
}

template <typename F>
void with_half_type(at::ScalarType dtype, const char* what, F&& f) {
  if (dtype == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    TORCH_CHECK(dtype == at::kHalf, what, ": expected dtype bfloat16 or float16, got ", dtype);
    f(__half{});
  }
}

const LaunchPlan kOneWarp{dim3(1), dim3(32), 0};

at::Tensor mma_fragments(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                         at::ScalarType dtype) {
  check(a, "a", at::kInt, {32, 4});
  check(b, "b", at::kInt, {32, 2});
  check(c, "c", at::kFloat, {32, 4});
  at::Tensor d = at::empty({32, 4}, c.options());
  with_half_type(dtype, "mma_fragments", [&](auto type) {
    using T = decltype(type);
    launch(std::is_same_v<T, __half> ? "selftest::mma_probe<f16>" : "selftest::mma_probe<bf16>",
           kOneWarp, nullptr, mma_probe<T>, reinterpret_cast<const uint32_t*>(a.data_ptr<int>()),
           reinterpret_cast<const uint32_t*>(b.data_ptr<int>()), c.data_ptr<float>(),
           d.data_ptr<float>());
  });
  return d;
}

template <int N, bool Trans>
void run_ldmatrix(const at::Tensor& rows, const at::Tensor& lane_rows, at::Tensor& out) {
  launch("selftest::ldmatrix_probe", ldmatrix_probe_plan(int(rows.size(0))), nullptr,
         ldmatrix_probe<N, Trans>, reinterpret_cast<const uint16_t*>(rows.data_ptr()),
         int(rows.size(0)), lane_rows.data_ptr<int>(),
         reinterpret_cast<uint32_t*>(out.data_ptr<int>()));
}

at::Tensor ldmatrix(const at::Tensor& rows, const at::Tensor& lane_rows, int64_t n, bool trans) {
  check(rows, "rows", at::kShort, {rows.size(0), 8});
  check(lane_rows, "lane_rows", at::kInt, {32});
  TORCH_CHECK(lane_rows.min().item<int>() >= 0 && lane_rows.max().item<int>() < rows.size(0),
              "lane_rows: expected indices into the ", rows.size(0), " rows");
  at::Tensor out = at::empty({32, n}, lane_rows.options());
  if (n == 1) {
    trans ? run_ldmatrix<1, true>(rows, lane_rows, out) : run_ldmatrix<1, false>(rows, lane_rows, out);
  } else if (n == 2) {
    trans ? run_ldmatrix<2, true>(rows, lane_rows, out) : run_ldmatrix<2, false>(rows, lane_rows, out);
  } else {
    TORCH_CHECK(n == 4, "ldmatrix: n must be 1, 2 or 4, got ", n);
    trans ? run_ldmatrix<4, true>(rows, lane_rows, out) : run_ldmatrix<4, false>(rows, lane_rows, out);
  }
  return out;
}

at::Tensor warp_mma(const at::Tensor& a, const at::Tensor& b) {
  check(a, "a", a.scalar_type(), {16, 16});
  check(b, "b", a.scalar_type(), {16, 8});
  at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  with_half_type(a.scalar_type(), "warp_mma", [&](auto type) {
    using T = decltype(type);
    launch("selftest::mma_tile", mma_tile_plan(), nullptr, mma_tile<T>,
           reinterpret_cast<const T*>(a.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
           d.data_ptr<float>());
  });
  return d;
}

at::Tensor warp_gemm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(M % kGemmBM == 0 && N % kGemmBN == 0 && K % kGemmBK == 0 && K > 0,
              "warp_gemm: expected M, N multiples of 64 and K of 32, got ", a.sizes(), " @ ",
              b.sizes());
  check(a, "a", a.scalar_type(), {M, K});
  check(b, "b", a.scalar_type(), {K, N});
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
  with_half_type(a.scalar_type(), "warp_gemm", [&](auto type) {
    using T = decltype(type);
    launch("selftest::gemm", gemm_plan(int(M), int(N)), nullptr, gemm<T>,
           reinterpret_cast<const T*>(a.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
           c.data_ptr<float>(), int(M), int(N), int(K));
  });
  return c;
}

at::Tensor warp_votes_py(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % 32 == 0 && x.size(0) > 0,
              "warp_votes: x must be 1-D with a multiple of 32 elements, got ", x.sizes());
  check(x, "x", at::kInt, {x.size(0)});
  at::Tensor out = at::empty({x.size(0), 7}, x.options());
  const int threads = x.size(0) % 64 == 0 ? 64 : 32;
  launch("selftest::warp_votes", LaunchPlan{dim3(unsigned(x.size(0) / threads)), dim3(threads), 0},
         nullptr, warp_votes, x.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

at::Tensor tail_ballot_py(const at::Tensor& x, int64_t tail_mask) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) >= 1 && x.size(0) <= 1024,
              "tail_ballot: x must be 1-D with 1 to 1024 elements, got ", x.sizes());
  check(x, "x", at::kInt, {x.size(0)});
  at::Tensor out = at::empty_like(x);
  launch("selftest::tail_ballot", LaunchPlan{dim3(1), dim3(unsigned(x.size(0))), 0}, nullptr,
         tail_ballot, x.data_ptr<int>(), out.data_ptr<int>(), unsigned(tail_mask));
  return out;
}

int64_t atomic_count_py(int64_t blocks, int64_t threads) {
  int counter = 0;
  launch("selftest::atomic_count", LaunchPlan{dim3(unsigned(blocks)), dim3(unsigned(threads)), 0},
         nullptr, atomic_count, &counter);
  return counter;
}

at::Tensor cp_async_groups_py(const at::Tensor& src) {
  check(src, "src", at::kFloat, {4, 32, 4});
  at::Tensor out = at::empty({5, 32, 5, 4}, src.options());
  launch("selftest::cp_async_groups", cp_async_groups_plan(), nullptr, cp_async_groups,
         src.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor read_unwritten_shared_py(int64_t bytes) {
  at::Tensor out = at::empty({bytes}, at::kByte);
  launch("selftest::read_unwritten_shared", LaunchPlan{dim3(1), dim3(32), size_t(bytes)}, nullptr,
         read_unwritten_shared, out.data_ptr<uint8_t>(), int(bytes));
  return out;
}

at::Tensor shared_exchange_py(const at::Tensor& x, bool barrier) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) >= 2 && x.size(0) <= 1024,
              "shared_exchange: x must be 1-D with 2 to 1024 elements, got ", x.sizes());
  check(x, "x", at::kFloat, {x.size(0)});
  at::Tensor out = at::empty_like(x);
  launch("selftest::shared_exchange",
         LaunchPlan{dim3(1), dim3(unsigned(x.size(0))), size_t(4) * x.size(0)}, nullptr,
         shared_exchange, x.data_ptr<float>(), out.data_ptr<float>(), barrier);
  return out;
}

void oob_write_py(at::Tensor& t) {
  check(t, "t", at::kFloat, {t.numel()});
  launch("selftest::oob_write", oob_write_plan(int(t.numel())), nullptr, oob_write,
         t.data_ptr<float>(), int(t.numel()));
}

}  // namespace
}  // namespace sarkernels::kernels::selftest

SK_SIMT_BINDINGS(m) {
  namespace st = sarkernels::kernels::selftest;
  using sarkernels::kernels::launch;
  using sarkernels::kernels::LaunchPlan;
  const LaunchPlan warp = st::kOneWarp;
  m.def("mma_fragments", &st::mma_fragments,
        "mma.sync m16n8k16 on registers a [32,4], b [32,2] (int32 bit patterns of 16-bit "
        "pairs of dtype) and c [32,4] float; returns d [32,4]");
  m.def("ldmatrix", &st::ldmatrix,
        "ldmatrix x{n}[.trans]: rows [R,8] int16 in shared memory, lane l addresses row "
        "lane_rows[l]; returns the registers [32,n] int32");
  m.def("warp_mma", &st::warp_mma, "one mma tile through cp.async and ldmatrix: a [16,16] @ b [16,8]");
  m.def("warp_gemm", &st::warp_gemm, "a [M,K] @ b [K,N] (bf16/fp16) in float by a 4-warp mma GEMM");
  m.def("warp_votes", &st::warp_votes_py, "shuffles and votes per thread of x int32 [32k]: [32k,7]");
  m.def("tail_ballot", &st::tail_ballot_py, "ballot(x > 0) with tail_mask in the last warp");
  m.def("atomic_count", &st::atomic_count_py, "atomic_add of 1 by every thread of the grid");
  m.def("cp_async_groups", &st::cp_async_groups_py, "snapshots of shared memory along cp.async groups");
  m.def("read_unwritten_shared", &st::read_unwritten_shared_py, "shared memory nobody wrote, as bytes");
  m.def("shared_exchange", &st::shared_exchange_py, py::arg("x"), py::arg("barrier"),
        "out[t] = x[(t + n/2) % n] through shared memory, with or without the barrier");
  m.def("sync_warp_loop", [warp](int64_t iters, int64_t threads) {
    launch("selftest::sync_warp_loop", LaunchPlan{dim3(1), dim3(unsigned(threads)), 0}, nullptr,
           st::sync_warp_loop, int(iters));
  }, "iters __syncwarp()s by a block of `threads` (for timing the executor)");
  // Planted bugs.
  m.def("oob_write", &st::oob_write_py, "writes one element past the end of t");
  m.def("shared_overflow", [] {
    at::Tensor out = at::empty({32}, at::kFloat);
    launch("selftest::shared_overflow", LaunchPlan{dim3(1), dim3(32), 32 * 4}, nullptr,
           st::shared_overflow, out.data_ptr<float>());
  });
  m.def("divergent_barrier", [] {
    at::Tensor out = at::empty({64}, at::kInt);
    launch("selftest::divergent_barrier", LaunchPlan{dim3(1), dim3(64), 0}, nullptr,
           st::divergent_barrier, out.data_ptr<int>());
  });
  m.def("partial_shuffle", [warp](bool others_wait_at_barrier) {
    at::Tensor out = at::empty({32}, at::kInt);
    launch("selftest::partial_shuffle", warp, nullptr, st::partial_shuffle, out.data_ptr<int>(),
           others_wait_at_barrier);
  });
  m.def("mixed_collectives", [warp] {
    at::Tensor out = at::empty({32}, at::kInt);
    launch("selftest::mixed_collectives", warp, nullptr, st::mixed_collectives, out.data_ptr<int>());
  });
  m.def("misaligned16", [warp] {
    at::Tensor x = at::zeros({8}, at::kFloat), out = at::empty({4}, at::kFloat);
    launch("selftest::misaligned16", warp, nullptr, st::misaligned16, x.data_ptr<float>(),
           out.data_ptr<float>());
  });
  m.def("stack_overflow", [warp] {
    at::Tensor out = at::empty({32}, at::kInt);
    launch("selftest::stack_overflow", warp, nullptr, st::stack_overflow, out.data_ptr<int>());
  });
  m.def("lane_id_outside_kernel", [] { return sarkernels::kernels::lane_id(); });
  m.def("ldmatrix_from_global", [warp] {
    at::Tensor rows = at::zeros({8, 8}, at::kShort);
    launch("selftest::ldmatrix_from_global", warp, nullptr, st::ldmatrix_from_global,
           reinterpret_cast<const uint16_t*>(rows.data_ptr()));
  });
}
