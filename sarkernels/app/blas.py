"""MKL in its strict reproducible mode (conditional numerical reproducibility, strict): a
matrix product's bits then do not depend on the thread count, which otherwise splits some
products' reductions (seen on an AVX-512 Xeon: weight gradients differed between 1 and 2
threads from the second step on), so training gives the same weights on any thread count,
resumed or not. MKL takes the mode only before its first call, so importing the app sets it
(the code path stays MKL's choice for the processor, at no cost in speed seen here); a
process that ran a product before, or that set MKL_CBWR itself, keeps its mode.
``STRICT``: whether this import set it."""
import ctypes
import os

import torch

_AUTO, _STRICT = 2, 0x10000  # mkl_service.h: MKL_CBWR_AUTO, MKL_CBWR_STRICT


def _set_strict():
    if "MKL_CBWR" in os.environ or not torch.backends.mkl.is_available():
        return False
    try:  # torch's wheels link MKL into libtorch_cpu, which exports its service functions
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return lib.mkl_serv_cbwr_set(_AUTO | _STRICT) == 0
    except (OSError, AttributeError):
        return False


STRICT = _set_strict()
