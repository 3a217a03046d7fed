"""What is compiled and usable here, and why a backend is not."""
import torch

from . import ops


def info():
    """A dict: package and torch versions, the _C build information (or why it failed to
    load) and, per backend, whether it is compiled, usable now, and the reason if not."""
    build = dict(ops._C.build_info) if ops._C is not None else None
    backends = {"reference": {"compiled": True, "usable": True, "why_not": None}}
    for dev in ("cpu", "cuda"):
        compiled = dev in ops._KERNEL_DEVICES
        if ops._C is None:
            why = f"sarkernels._C did not load ({ops.LOAD_ERROR})"
        elif not compiled:
            why = (f"_C was built without {dev} kernels"
                   + ("" if build["cuda"] else " (no nvcc or a CPU-only torch at build time)"))
        elif dev == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device visible"
        else:
            why = None
        backends[dev] = {"compiled": compiled, "usable": why is None, "why_not": why}
    from . import __version__
    return {"sarkernels": __version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "build": build, "backends": backends,
            "threads": torch.get_num_threads()}


def format_info(d):
    lines = [f"sarkernels {d['sarkernels']}  (torch {d['torch']}, torch CUDA {d['torch_cuda']}, "
             f"{d['threads']} CPU threads)"]
    b = d["build"]
    if b:
        lines.append(f"_C built with {b['compiler']} against torch {b['torch_version']}; CUDA "
                     + (f"{b['cuda_version']} for archs {b['cuda_archs']}" if b["cuda"] else "not built"))
    lines.append(f"{'backend':<10} {'compiled':<9} {'usable':<7} why not")
    for name, s in d["backends"].items():
        lines.append(f"{name:<10} {str(s['compiled']):<9} {str(s['usable']):<7} {s['why_not'] or ''}")
    return "\n".join(lines)
