// pybind11 module `_xla_ops_cuda`: exports every CUDA handler registered with XLA_OPS_REGISTER.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

PYBIND11_MODULE(_xla_ops_cuda, m) {
  m.doc() = "xla_ops CUDA handlers (XLA FFI)";
  m.def("registrations", []() {
    py::dict out;
    for (const auto& r : xla_ops::Registry()) out[py::str(r.name)] = py::capsule(r.handler);
    return out;
  });
}
