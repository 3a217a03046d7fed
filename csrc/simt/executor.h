// The SIMT executor: runs CUDA kernels written against csrc/kernels/ on the CPU.
//
// A block's threads run as cooperative fibers on one OS thread; a fiber runs until it
// reaches a barrier, a warp collective or its end, then the runnable fiber first in the
// schedule's order runs: thread ranks ascending (forward), descending (reverse) or in a
// seeded random permutation drawn per block and redrawn at each __syncthreads (random).
// So between two synchronisation points threads run one after another in that order, and a
// read of shared memory another thread writes without a barrier in between gives different
// results under different schedules. Results are deterministic for a schedule and seed,
// whatever the number of OS threads (but for the order of atomics between blocks).
// Errors (a barrier or collective that cannot complete, a collective whose mask names an
// exited or nonexistent lane, lanes of one mask calling different collectives, an
// unaligned 16-byte access) stop the launch and are thrown from launch() as SimtError
// naming the kernel, block and thread (the lowest-numbered failing block's, also when blocks
// run on several OS threads). A block with no runnable thread left is reported as a deadlock
// listing where every thread waits.
// Torch-free; kernels never include this directly (csrc/kernels/primitives.cuh does).
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

namespace sarkernels::simt {

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct SimtError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The identity of the running fiber (valid inside a kernel only).
struct ThreadInfo {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
const ThreadInfo& self();

// The block's dynamic shared memory, filled with NaN bytes (0xff) at block start.
unsigned char* shared_memory();

// __syncthreads: completes when every live thread of the block has arrived at the same
// call site (file:line, named in errors).
void sync_threads(const char* file, int line);

// A warp-level collective. Every lane of `mask` calls it with the same `name` and `fn`,
// its own input bytes and an output buffer. When the last lane arrives, fn runs once with
// every participating lane's pointers (nullptr for lanes outside `mask`); then all resume.
// file:line, the kernel's call site, only serves error messages.
using CollectiveFn = void (*)(const void* const* ins, void* const* outs, unsigned mask);
void warp_collective(const char* name, unsigned mask, const void* in, void* out,
                     CollectiveFn fn, const char* file = nullptr, int line = 0);

// cp.async: the 16-byte copy is queued and lands at cp_async_wait(n) once at most n newer
// groups are pending (zero_fill writes zeros instead of reading src).
void cp_async16(void* dst, const void* src, bool zero_fill);
void cp_async_commit();
void cp_async_wait(int pending);

// Report a misaligned 16-byte access (it faults on the GPU), and an address outside the
// block's shared memory where the instruction needs shared memory (ldmatrix, cp.async).
void check_aligned16(const void* p, const char* what);
void check_shared(const void* p, size_t bytes, const char* what);

// Stops the launch with an error naming the kernel, block and thread.
[[noreturn]] void fail(const std::string& what);

enum class Schedule { kForward, kReverse, kRandom };
struct Options {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;     // for kRandom
  int threads = 1;       // OS threads running blocks
};
Options options();
void set_options(const Options& o);

// Runs every block of the grid; body(thread) is called once per thread (fiber).
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              void (*body)(const void* ctx), const void* ctx);

template <typename... KArgs, typename... Args>
void launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
            void (*fn)(KArgs...), Args&&... args) {
  struct Ctx {
    void (*fn)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> args;
  } ctx{fn, {std::forward<Args>(args)...}};
  run_grid(kernel, grid, block, shared_bytes,
           [](const void* c) {
             const Ctx& x = *static_cast<const Ctx*>(c);
             std::apply(x.fn, x.args);  // each thread gets its own copy of the by-value args
           },
           &ctx);
}

}  // namespace sarkernels::simt
