// The _simt extension's Python module is defined once (module.cpp); each file of the
// extension adds its functions with SK_SIMT_BINDINGS, so new files join without editing it:
//   SK_SIMT_BINDINGS(m) { m.def("my_op", &my_op); }
#pragma once
#include <pybind11/pybind11.h>

namespace sarkernels::simt {
using Bindings = void (*)(pybind11::module_&);
bool add_bindings(Bindings b);  // called during static initialisation
}  // namespace sarkernels::simt

#define SK_SIMT_BINDINGS_CAT2(a, b) a##b
#define SK_SIMT_BINDINGS_CAT(a, b) SK_SIMT_BINDINGS_CAT2(a, b)
#define SK_SIMT_BINDINGS(m)                                                          \
  static void SK_SIMT_BINDINGS_CAT(sk_simt_bindings_, __LINE__)(pybind11::module_&); \
  [[maybe_unused]] static const bool SK_SIMT_BINDINGS_CAT(sk_simt_added_, __LINE__) = \
      ::sarkernels::simt::add_bindings(&SK_SIMT_BINDINGS_CAT(sk_simt_bindings_, __LINE__)); \
  static void SK_SIMT_BINDINGS_CAT(sk_simt_bindings_, __LINE__)(pybind11::module_ & m)
