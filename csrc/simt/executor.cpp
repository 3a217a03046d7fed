// The SIMT executor (see executor.h). One Worker per OS thread running blocks: it owns the
// fibers and stacks (reused from block to block and launch to launch), the shared-memory
// arena and the state of the block it runs. Fibers switch to each other directly; the OS
// thread's own context (the "main" context) is resumed only when the block ends, fails or
// can make no progress.
#include "simt/executor.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "simt/fiber.h"

#if SK_SIMT_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace sarkernels::simt {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr size_t kMaxShared = 227 * 1024;  // the most an sm_90 block can have
constexpr size_t kRedzone = 64;            // poisoned bytes after the arena under ASan

enum class Wait : uint8_t { kRunning, kRunnable, kBarrier, kCollective, kExited };

struct CpAsyncCopy {
  void* dst;
  const void* src;
  bool zero_fill;
};

struct Fiber {
  Context ctx;
  ThreadInfo info;
  int rank = 0;  // linear thread id within the block
  Wait wait = Wait::kRunnable;
  std::vector<CpAsyncCopy> copies;  // issued and not yet landed, oldest first
  std::vector<size_t> group_ends;   // copies.size() at each commit, oldest first
  bool abandoned = false;           // its stack holds frames that never returned
};

// A warp collective some lanes of `mask` have reached.
struct Collective {
  const char* name;
  const char* file;  // call site of the first lane to arrive (may be null)
  int line;
  CollectiveFn fn;
  unsigned mask;
  unsigned arrived;
  const void* ins[kWarpSize];
  void* outs[kWarpSize];
};

struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t shared_bytes;
  void (*body)(const void*);
  const void* ctx;
  Options options;
};

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// "0-15, 17, 20-31" for a sorted list of ids.
std::string ranges(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string lanes_str(unsigned bits) {
  std::vector<int> ids;
  for (int l = 0; l < kWarpSize; ++l) {
    if (bits >> l & 1) ids.push_back(l);
  }
  return ranges(ids);
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// "shfl at a.cuh:10 (mask 0xffffffff)"
std::string describe(const char* name, const char* file, int line, unsigned mask) {
  std::string s = name;
  if (file != nullptr) s += std::string(" at ") + file + ":" + std::to_string(line);
  return s + " (mask " + hex(mask) + ")";
}
std::string describe(const Collective& c) { return describe(c.name, c.file, c.line, c.mask); }

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class Worker {
 public:
  Worker() : fibers_(kMaxThreads), warps_(kMaxWarps) {}
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;
  ~Worker() { ::operator delete(arena_, std::align_val_t(64)); }

  void run_block(const Launch& launch, size_t block_index);

  // ---- called by the running fiber (through the free functions of executor.h)
  Fiber& current() { return *current_; }
  bool in_kernel() const { return current_ != nullptr; }
  [[noreturn]] void fail(const std::string& what) const { throw SimtError(prefix() + what); }
  unsigned char* shared() const { return arena_; }
  size_t shared_bytes() const { return launch_->shared_bytes; }
  void sync_threads(const char* file, int line);
  void warp_collective(const char* name, unsigned mask, const void* in, void* out,
                       CollectiveFn fn, const char* file, int line);

 private:
  static void fiber_main(void* self);
  std::string prefix() const;
  void start_block(size_t block_index);
  void shuffle_order();
  int first_runnable() const;
  Fiber& take(int p);
  void make_runnable(Fiber& f);
  void park();
  void yield();
  void release_barrier();
  void exit_current() noexcept;
  void record_error(std::exception_ptr e) noexcept;
  void abandon_block();
  std::string deadlock_report() const;
  unsigned lanes_of(int warp) const;

  std::vector<Fiber> fibers_;
  std::vector<Stack> stacks_;
  std::vector<std::vector<Collective>> warps_;  // pending collectives per warp
  unsigned exited_[kMaxWarps] = {};             // exited lanes per warp
  Context main_;
  Fiber* current_ = nullptr;

  const Launch* launch_ = nullptr;
  dim3 block_idx_;
  int n_ = 0;     // threads in the block
  int live_ = 0;  // not yet returned
  int barrier_arrived_ = 0;
  const char* barrier_file_ = nullptr;
  int barrier_line_ = 0;
  // The schedule: order_[p] is the rank at priority p (0 runs first), pos_[rank] its
  // inverse; runnable_ has bit p set when order_[p] may run.
  int order_[kMaxThreads];
  int pos_[kMaxThreads];
  uint64_t runnable_[kMaxThreads / 64] = {};
  uint64_t rng_ = 0;
  std::exception_ptr error_;

  unsigned char* arena_ = nullptr;
  size_t arena_capacity_ = 0;
};

// The worker whose block runs on this OS thread (null outside run_grid).
thread_local Worker* t_worker = nullptr;

Worker& running(const char* what) {
  Worker* w = t_worker;
  if (w == nullptr || !w->in_kernel()) {
    throw SimtError(std::string("sarkernels simt: ") + what + " used outside a kernel");
  }
  return *w;
}

std::string Worker::prefix() const {
  std::string s = std::string("sarkernels simt: kernel ") + launch_->kernel + ", block " +
                  dim_str(block_idx_);
  if (current_) s += ", thread " + dim_str(current_->info.thread_idx);
  return s + ": ";
}

unsigned Worker::lanes_of(int warp) const {
  const int n = std::min(kWarpSize, n_ - warp * kWarpSize);
  return n >= kWarpSize ? ~0u : (1u << n) - 1;
}

// ------------------------------------------------------------------ scheduling

void Worker::shuffle_order() {
  const Schedule s = launch_->options.schedule;
  for (int i = 0; i < n_; ++i) order_[i] = s == Schedule::kReverse ? n_ - 1 - i : i;
  if (s == Schedule::kRandom) {
    for (int i = n_ - 1; i > 0; --i) std::swap(order_[i], order_[splitmix64(rng_) % (i + 1)]);
  }
  for (int p = 0; p < n_; ++p) pos_[order_[p]] = p;
}

int Worker::first_runnable() const {
  for (int w = 0; w * 64 < n_; ++w) {
    if (runnable_[w]) return w * 64 + __builtin_ctzll(runnable_[w]);
  }
  return -1;
}

// Makes the fiber at priority p the running one.
Fiber& Worker::take(int p) {
  runnable_[p / 64] &= ~(uint64_t(1) << (p % 64));
  current_ = &fibers_[order_[p]];
  current_->wait = Wait::kRunning;
  return *current_;
}

void Worker::make_runnable(Fiber& f) {
  f.wait = Wait::kRunnable;
  const int p = pos_[f.rank];
  runnable_[p / 64] |= uint64_t(1) << (p % 64);
}

// The running fiber has set its wait state: run the next fiber in schedule order, or give
// the OS thread back when none can run (the block ended, failed or deadlocked).
void Worker::park() {
  Fiber& self = *current_;
  const int p = first_runnable();
  if (p < 0) {
    current_ = nullptr;
    switch_context(self.ctx, main_);
  } else {
    switch_context(self.ctx, take(p).ctx);
  }
}

// The running fiber released others: those earlier in the schedule run first.
void Worker::yield() {
  const int p = first_runnable();
  if (p >= 0 && p < pos_[current_->rank]) {
    make_runnable(*current_);
    park();
  }
}

void Worker::fiber_main(void* self) {
  Worker& w = *static_cast<Worker*>(self);
  try {
    w.launch_->body(w.launch_->ctx);
    // Copies still in flight complete on the GPU too.
    Fiber& f = w.current();
    for (const CpAsyncCopy& c : f.copies) {
      if (c.zero_fill) std::memset(c.dst, 0, 16); else std::memcpy(c.dst, c.src, 16);
    }
    f.copies.clear();
    f.group_ends.clear();
  } catch (...) {
    w.record_error(std::current_exception());
  }
  w.exit_current();
}

void Worker::record_error(std::exception_ptr e) noexcept {
  if (error_) return;
  try {
    std::rethrow_exception(e);
  } catch (const SimtError&) {
    error_ = e;
  } catch (const std::exception& x) {
    error_ = std::make_exception_ptr(SimtError(prefix() + "exception: " + x.what()));
  } catch (...) {
    error_ = std::make_exception_ptr(SimtError(prefix() + "unknown exception"));
  }
}

void Worker::exit_current() noexcept {
  Fiber& f = *current_;
  f.wait = Wait::kExited;
  --live_;
  const int warp = f.rank / kWarpSize, lane = f.rank % kWarpSize;
  exited_[warp] |= 1u << lane;
  if (!error_) {
    for (const Collective& c : warps_[warp]) {
      if (c.mask >> lane & 1) {
        record_error(std::make_exception_ptr(SimtError(
            prefix() + "thread exited while lanes " + lanes_str(c.arrived) + " of warp " +
            std::to_string(warp) + " wait for it in " + describe(c))));
        break;
      }
    }
  }
  if (!error_ && barrier_arrived_ > 0 && barrier_arrived_ == live_) release_barrier();
  const int p = error_ ? -1 : first_runnable();
  if (p < 0) {
    current_ = nullptr;
    leave_context(main_);
  }
  leave_context(take(p).ctx);
}

// ------------------------------------------------------------------ blocks

void Worker::start_block(size_t block_index) {
  const Launch& L = *launch_;
  block_idx_ = dim3(unsigned(block_index % L.grid.x), unsigned(block_index / L.grid.x % L.grid.y),
                    unsigned(block_index / (size_t(L.grid.x) * L.grid.y)));
  n_ = int(L.block.x * L.block.y * L.block.z);
  live_ = n_;
  barrier_arrived_ = 0;
  error_ = nullptr;
  rng_ = L.options.seed ^ (0x5851f42d4c957f2dull * (block_index + 1));
  shuffle_order();
  std::fill(std::begin(runnable_), std::end(runnable_), 0);
  std::fill(std::begin(exited_), std::end(exited_), 0u);
  for (int w = 0; w * kWarpSize < n_; ++w) warps_[w].clear();

  const size_t capacity = L.shared_bytes + kRedzone;
  if (arena_capacity_ < capacity) {
#if SK_SIMT_ASAN
    if (arena_) ASAN_UNPOISON_MEMORY_REGION(arena_, arena_capacity_);
#endif
    ::operator delete(arena_, std::align_val_t(64));
    arena_ = static_cast<unsigned char*>(::operator new(capacity, std::align_val_t(64)));
    arena_capacity_ = capacity;
  }
#if SK_SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(arena_, arena_capacity_);
  ASAN_POISON_MEMORY_REGION(arena_ + L.shared_bytes, arena_capacity_ - L.shared_bytes);
#endif
  std::memset(arena_, 0xff, L.shared_bytes);  // NaN in every float type

  while (int(stacks_.size()) < n_) stacks_.emplace_back();
  for (int r = 0; r < n_; ++r) {
    Fiber& f = fibers_[r];
    f.rank = r;
    f.info = ThreadInfo{dim3(r % L.block.x, r / L.block.x % L.block.y, r / (L.block.x * L.block.y)),
                        block_idx_, L.block, L.grid};
    f.copies.clear();
    f.group_ends.clear();
    if (f.abandoned) stacks_[r].unpoison();
    f.abandoned = false;
    prepare(f.ctx, stacks_[r], &Worker::fiber_main, this);
    make_runnable(f);
  }
}

void Worker::abandon_block() {
  for (int r = 0; r < n_; ++r) {
    if (fibers_[r].wait != Wait::kExited) fibers_[r].abandoned = true;
  }
}

void Worker::run_block(const Launch& launch, size_t block_index) {
  launch_ = &launch;
  start_block(block_index);
  t_worker = this;
  switch_context(main_, take(first_runnable()).ctx);
  t_worker = nullptr;
  current_ = nullptr;
  if (!error_ && live_ > 0) {
    error_ = std::make_exception_ptr(SimtError(prefix() + "deadlock: " + deadlock_report()));
  }
  if (error_) {
    abandon_block();
    std::rethrow_exception(std::exchange(error_, nullptr));
  }
}

std::string Worker::deadlock_report() const {
  std::vector<int> at_barrier, exited;
  for (int r = 0; r < n_; ++r) {
    if (fibers_[r].wait == Wait::kBarrier) at_barrier.push_back(r);
    if (fibers_[r].wait == Wait::kExited) exited.push_back(r);
  }
  std::string s = "no thread can proceed;";
  if (!at_barrier.empty()) {
    s += " threads " + ranges(at_barrier) + " wait at __syncthreads (" + barrier_file_ + ":" +
         std::to_string(barrier_line_) + ");";
  }
  for (int w = 0; w * kWarpSize < n_; ++w) {
    for (const Collective& c : warps_[w]) {
      s += " warp " + std::to_string(w) + " lanes " + lanes_str(c.arrived) + " wait in " +
           describe(c) + " for lanes " + lanes_str(c.mask & ~c.arrived) + ";";
    }
  }
  if (!exited.empty()) s += " threads " + ranges(exited) + " have exited;";
  s.pop_back();
  return s;
}

// ------------------------------------------------------------------ synchronisation

void Worker::release_barrier() {
  barrier_arrived_ = 0;
  if (launch_->options.schedule == Schedule::kRandom) {
    shuffle_order();  // a new order for each phase: every live thread is at the barrier
    std::fill(std::begin(runnable_), std::end(runnable_), 0);
  }
  for (int r = 0; r < n_; ++r) {
    if (fibers_[r].wait == Wait::kBarrier) make_runnable(fibers_[r]);
  }
}

void Worker::sync_threads(const char* file, int line) {
  if (barrier_arrived_ == 0) {
    barrier_file_ = file;
    barrier_line_ = line;
  } else if (line != barrier_line_ || std::strcmp(file, barrier_file_) != 0) {
    fail("divergent __syncthreads: " + std::string(barrier_file_) + ":" +
         std::to_string(barrier_line_) + " and " + file + ":" + std::to_string(line));
  }
  if (++barrier_arrived_ == live_) {
    release_barrier();
    yield();
  } else {
    current_->wait = Wait::kBarrier;
    park();
  }
}

void Worker::warp_collective(const char* name, unsigned mask, const void* in, void* out,
                             CollectiveFn fn, const char* file, int line) {
  const int warp = current_->rank / kWarpSize, lane = current_->rank % kWarpSize;
  const unsigned bit = 1u << lane;
  if (!(mask & bit)) {
    fail(describe(name, file, line, mask) + ": the mask leaves out the calling lane " +
         std::to_string(lane));
  }
  if (mask & ~lanes_of(warp)) {
    fail(describe(name, file, line, mask) + ": the mask names lanes " +
         lanes_str(mask & ~lanes_of(warp)) + ", which do not exist (the block has " +
         std::to_string(n_) + " threads)");
  }
  if (mask & exited_[warp]) {
    fail(describe(name, file, line, mask) + ": the mask names lanes " +
         lanes_str(mask & exited_[warp]) + ", which have exited");
  }
  std::vector<Collective>& pending = warps_[warp];
  Collective* c = nullptr;
  for (Collective& p : pending) {
    if (!(p.mask & bit)) continue;
    if (p.mask != mask || p.fn != fn || std::strcmp(p.name, name) != 0) {
      fail("lanes of warp " + std::to_string(warp) + " disagree: lanes " + lanes_str(p.arrived) +
           " wait in " + describe(p) + ", lane " + std::to_string(lane) + " calls " +
           describe(name, file, line, mask));
    }
    c = &p;
    break;
  }
  if (c == nullptr) {
    c = &pending.emplace_back();
    c->name = name;
    c->file = file;
    c->line = line;
    c->fn = fn;
    c->mask = mask;
    c->arrived = 0;
    std::fill(std::begin(c->ins), std::end(c->ins), nullptr);
    std::fill(std::begin(c->outs), std::end(c->outs), nullptr);
  }
  c->ins[lane] = in;
  c->outs[lane] = out;
  c->arrived |= bit;
  if (c->arrived != mask) {
    current_->wait = Wait::kCollective;
    park();
    return;
  }
  // Last lane: compute every lane's result (the others' buffers are on their suspended
  // stacks), then let them go.
  const Collective done = *c;
  pending.erase(pending.begin() + (c - pending.data()));
  done.fn(done.ins, done.outs, mask);
  for (int l = 0; l < kWarpSize; ++l) {
    if ((mask & ~bit) >> l & 1) make_runnable(fibers_[warp * kWarpSize + l]);
  }
  yield();
}

// ------------------------------------------------------------------ workers and launches

std::mutex g_options_mutex;
Options g_options;

// Idle workers, kept for their stacks and arenas.
std::mutex g_pool_mutex;
std::vector<std::unique_ptr<Worker>> g_idle;

std::unique_ptr<Worker> acquire_worker() {
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_idle.empty()) {
      std::unique_ptr<Worker> w = std::move(g_idle.back());
      g_idle.pop_back();
      return w;
    }
  }
  return std::make_unique<Worker>();
}

void release_worker(std::unique_ptr<Worker> w) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_idle.push_back(std::move(w));
}

void check_launch(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes) {
  auto bad = [&](const std::string& what) {
    throw SimtError(std::string("sarkernels simt: kernel ") + kernel + ": " + what);
  };
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64) {
    bad("block " + dim_str(block) + " must have 1 to 1024 threads and z <= 64");
  }
  if (grid.x >= (1u << 31) || grid.y > 65535 || grid.z > 65535) {
    bad("grid " + dim_str(grid) + " exceeds (2^31-1, 65535, 65535)");
  }
  if (shared_bytes > kMaxShared) {
    bad(std::to_string(shared_bytes) + " bytes of shared memory exceed the " +
        std::to_string(kMaxShared) + " a block can have");
  }
}

}  // namespace

// ------------------------------------------------------------------ executor.h

const ThreadInfo& self() { return running("threadIdx/blockIdx").current().info; }

unsigned char* shared_memory() { return running("shared memory").shared(); }

void sync_threads(const char* file, int line) { running("__syncthreads").sync_threads(file, line); }

void warp_collective(const char* name, unsigned mask, const void* in, void* out,
                     CollectiveFn fn, const char* file, int line) {
  running(name).warp_collective(name, mask, in, out, fn, file, line);
}

void cp_async16(void* dst, const void* src, bool zero_fill) {
  Fiber& f = running("cp.async").current();
  check_aligned16(dst, "cp.async destination");
  check_shared(dst, 16, "cp.async destination");
  if (!zero_fill) check_aligned16(src, "cp.async source");
  f.copies.push_back({dst, src, zero_fill});
}

void cp_async_commit() {
  Fiber& f = running("cp.async.commit_group").current();
  f.group_ends.push_back(f.copies.size());
}

void cp_async_wait(int pending) {
  Fiber& f = running("cp.async.wait_group").current();
  if (pending < 0) fail("cp.async.wait_group " + std::to_string(pending) + ": must be >= 0");
  const size_t groups = f.group_ends.size();
  if (groups <= size_t(pending)) return;
  const size_t landed_groups = groups - size_t(pending);
  const size_t landed = f.group_ends[landed_groups - 1];
  for (size_t i = 0; i < landed; ++i) {
    const CpAsyncCopy& c = f.copies[i];
    if (c.zero_fill) std::memset(c.dst, 0, 16); else std::memcpy(c.dst, c.src, 16);
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + landed);
  f.group_ends.erase(f.group_ends.begin(), f.group_ends.begin() + landed_groups);
  for (size_t& e : f.group_ends) e -= landed;
}

void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    fail(std::string(what) + ": address " + buf + " is not 16-byte aligned");
  }
}

void check_shared(const void* p, size_t bytes, const char* what) {
  Worker& w = running(what);
  const auto lo = reinterpret_cast<uintptr_t>(w.shared()), q = reinterpret_cast<uintptr_t>(p);
  if (q < lo || q - lo > w.shared_bytes() || bytes > w.shared_bytes() - (q - lo)) {
    const long long offset = static_cast<long long>(q - lo);
    w.fail(std::string(what) + ": " + std::to_string(bytes) + " bytes at offset " +
           std::to_string(offset) + " from the start of shared memory are outside its " +
           std::to_string(w.shared_bytes()) + " bytes");
  }
}

void fail(const std::string& what) {
  Worker* w = t_worker;
  if (w == nullptr || !w->in_kernel()) throw SimtError("sarkernels simt: " + what);
  w->fail(what);
}

Options options() {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  return g_options;
}

void set_options(const Options& o) {
  if (o.threads < 1) {
    throw SimtError("sarkernels simt: options.threads must be >= 1, got " + std::to_string(o.threads));
  }
  std::lock_guard<std::mutex> lock(g_options_mutex);
  g_options = o;
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              void (*body)(const void* ctx), const void* ctx) {
  if (t_worker != nullptr) {
    throw SimtError(std::string("sarkernels simt: kernel ") + kernel + " launched inside a kernel");
  }
  check_launch(kernel, grid, block, shared_bytes);
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  if (blocks == 0) return;
  const Launch launch{kernel, grid, block, shared_bytes, body, ctx, options()};

  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  size_t error_block = blocks;
  std::exception_ptr error;
  auto work = [&] {
    std::unique_ptr<Worker> w = acquire_worker();
    for (size_t b; !stop.load() && (b = next++) < blocks;) {
      try {
        w->run_block(launch, b);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (b < error_block) {  // the lowest failing block: the same error on any pool size
          error_block = b;
          error = std::current_exception();
        }
        stop = true;
      }
    }
    release_worker(std::move(w));
  };
  const size_t threads = std::min<size_t>(size_t(launch.options.threads), blocks);
  std::vector<std::thread> pool;
  for (size_t i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace sarkernels::simt
