#include "simt/fiber.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#if SK_SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the SIMT executor's context switch is written for x86-64"
#endif

extern "C" {
// sk_simt_switch(save, to): pushes the callee-saved state, stores rsp in *save, loads `to`
// as rsp and pops the state saved there. A fresh context "returns" into sk_simt_trampoline,
// which calls sk_simt_fiber_boot(entry = r12, arg = rbx) with an ABI-aligned stack.
__attribute__((visibility("hidden"))) void sk_simt_switch(void** save, void* to);
__attribute__((visibility("hidden"))) void sk_simt_trampoline();
__attribute__((visibility("hidden"), noreturn)) void sk_simt_fiber_boot(void (*entry)(void*),
                                                                        void* arg);
}

asm(R"(
  .text
  .p2align 4
  .globl sk_simt_switch
  .hidden sk_simt_switch
  .type sk_simt_switch, @function
sk_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sk_simt_switch, .-sk_simt_switch

  .p2align 4
  .globl sk_simt_trampoline
  .hidden sk_simt_trampoline
  .type sk_simt_trampoline, @function
sk_simt_trampoline:
  movq %r12, %rdi
  movq %rbx, %rsi
  call sk_simt_fiber_boot@PLT
  ud2
  .size sk_simt_trampoline, .-sk_simt_trampoline
)");

namespace sarkernels::simt {
namespace {

constexpr size_t kGuard = 64 * 1024;  // large: frames bigger than a page must not skip it

#if SK_SIMT_ASAN
// The context that switched last: the resumed side records its stack bounds there (the
// OS thread's own stack is learned this way the first time it switches to a fiber).
thread_local Context* t_switched_from = nullptr;
thread_local Context t_abandoned;

void finish_switch(void* fake_stack) {
  const void* bottom;
  size_t size;
  __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
  t_switched_from->stack_bottom = bottom;
  t_switched_from->stack_size = size;
}
#endif

}  // namespace

Stack::Stack() {
  void* p = mmap(nullptr, kGuard + kSize, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  if (mprotect(p, kGuard, PROT_NONE) != 0) {
    munmap(p, kGuard + kSize);
    throw std::bad_alloc();
  }
  base_ = static_cast<unsigned char*>(p);
}

Stack::~Stack() {
  if (base_) munmap(base_, kGuard + kSize);
}

unsigned char* Stack::bottom() const { return base_ + kGuard; }

void Stack::unpoison() const {
#if SK_SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(bottom(), kSize);
#endif
}

void prepare(Context& ctx, const Stack& stack, void (*entry)(void*), void* arg) {
  // The frame sk_simt_switch pops: control words, r15, r14, r13, r12, rbx, rbp, return
  // address; the trampoline then runs with rsp = top - 16, 16-byte aligned for its call.
  auto* top = reinterpret_cast<uint64_t*>(stack.bottom() + Stack::kSize);
  uint64_t* frame = top - 10;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  frame[0] = mxcsr | uint64_t(fpucw) << 32;
  frame[1] = frame[2] = frame[3] = 0;                 // r15, r14, r13
  frame[4] = reinterpret_cast<uint64_t>(entry);       // r12
  frame[5] = reinterpret_cast<uint64_t>(arg);         // rbx
  frame[6] = 0;                                       // rbp: ends frame-pointer walks
  frame[7] = reinterpret_cast<uint64_t>(&sk_simt_trampoline);
  frame[8] = frame[9] = 0;
  ctx.sp = frame;
  ctx.stack_bottom = stack.bottom();
  ctx.stack_size = Stack::kSize;
  ctx.fake_stack = nullptr;
}

void switch_context(Context& from, Context& to) {
#if SK_SIMT_ASAN
  t_switched_from = &from;
  __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_bottom, to.stack_size);
#endif
  sk_simt_switch(&from.sp, to.sp);
#if SK_SIMT_ASAN
  finish_switch(from.fake_stack);
#endif
}

void leave_context(Context& to) {
#if SK_SIMT_ASAN
  t_switched_from = &t_abandoned;
  __sanitizer_start_switch_fiber(nullptr, to.stack_bottom, to.stack_size);
  sk_simt_switch(&t_abandoned.sp, to.sp);
#else
  void* unused;
  sk_simt_switch(&unused, to.sp);
#endif
  __builtin_unreachable();
}

}  // namespace sarkernels::simt

extern "C" void sk_simt_fiber_boot(void (*entry)(void*), void* arg) {
#if SK_SIMT_ASAN
  sarkernels::simt::finish_switch(nullptr);
#endif
  entry(arg);
  std::abort();  // entry leaves by switching away for good
}
