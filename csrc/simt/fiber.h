// Fibers for the SIMT executor: mmap'd stacks with a guard region and an x86-64 context
// switch that saves only what the System V ABI makes callee-saved (rbx, rbp, r12-r15, rsp,
// MXCSR and the x87 control word), about 20x cheaper than swapcontext's signal-mask syscall.
// Switches are announced to AddressSanitizer when it is on, so it knows which stack runs.
#pragma once
#include <cstddef>

#if defined(__SANITIZE_ADDRESS__)
#define SK_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SK_SIMT_ASAN 1
#endif
#endif
#ifndef SK_SIMT_ASAN
#define SK_SIMT_ASAN 0
#endif

namespace sarkernels::simt {

// A suspended (or running) execution context.
struct Context {
  void* sp = nullptr;                  // saved stack pointer while suspended
  const void* stack_bottom = nullptr;  // lowest address of its stack (for ASan)
  size_t stack_size = 0;
  void* fake_stack = nullptr;          // ASan's use-after-return stack while suspended
};

// A fiber stack; overflowing it runs into an inaccessible guard region and faults.
class Stack {
 public:
  static constexpr size_t kSize = 256 * 1024;
  Stack();
  ~Stack();
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  Stack(Stack&& o) noexcept : base_(o.base_) { o.base_ = nullptr; }
  unsigned char* bottom() const;
  // Forget ASan's stack poisoning left by frames that never returned (an abandoned fiber).
  void unpoison() const;

 private:
  unsigned char* base_;  // start of the mapping: guard region, then the stack
};

// Makes `ctx` start entry(arg) on `stack` when first switched to; entry must never return.
void prepare(Context& ctx, const Stack& stack, void (*entry)(void*), void* arg);
// Suspends the running context into `from` and resumes `to`; returns once something
// switches back to `from`.
void switch_context(Context& from, Context& to);
// Resumes `to` for good: the running context is abandoned (an exited fiber).
[[noreturn]] void leave_context(Context& to);

}  // namespace sarkernels::simt
