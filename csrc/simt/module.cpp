// sarkernels._simt: the CUDA kernels compiled for the CPU and run by the SIMT executor.
// This file holds the module and the executor's options; the kernels' bindings come from
// the other files of the extension (SK_SIMT_BINDINGS).
#include "simt/module.h"

#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "simt/executor.h"
#include "simt/fiber.h"

namespace py = pybind11;

namespace sarkernels::simt {
namespace {

std::vector<Bindings>& registry() {
  static std::vector<Bindings> r;  // a function-local static: safe during static init
  return r;
}

constexpr const char* kScheduleNames[] = {"forward", "reverse", "random"};

void set_options_py(const std::string& schedule, uint64_t seed, int threads) {
  for (int i = 0; i < 3; ++i) {
    if (schedule == kScheduleNames[i]) {
      set_options(Options{Schedule(i), seed, threads});
      return;
    }
  }
  throw py::value_error("set_options: schedule must be 'forward', 'reverse' or 'random', got '" +
                        schedule + "'");
}

py::dict options_py() {
  const Options o = options();
  py::dict d;
  d["schedule"] = kScheduleNames[int(o.schedule)];
  d["seed"] = o.seed;
  d["threads"] = o.threads;
  return d;
}

}  // namespace

bool add_bindings(Bindings b) {
  registry().push_back(b);
  return true;
}

}  // namespace sarkernels::simt

PYBIND11_MODULE(_simt, m) {
  namespace simt = sarkernels::simt;
  m.doc() = "CUDA kernels of sarkernels run on the CPU by the SIMT executor";
  py::register_exception<simt::SimtError>(m, "SimtError", PyExc_RuntimeError);
  m.def("set_options", &simt::set_options_py, py::arg("schedule") = "forward",
        py::arg("seed") = 0, py::arg("threads") = 1,
        "Schedule ('forward', 'reverse', 'random' with seed) and OS threads running blocks, "
        "for every later launch in the process.");
  m.def("options", &simt::options_py, "The current set_options values as a dict.");
  py::dict info;
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#else
  info["compiler"] = "gcc " __VERSION__;
#endif
  info["asan"] = bool(SK_SIMT_ASAN);
  m.attr("build_info") = info;
  for (simt::Bindings b : simt::registry()) b(m);
}
