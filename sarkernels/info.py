"""What is compiled and usable here, and why a backend is not."""
import torch

from . import ops


def info():
    """A dict: package and torch versions, the _C build information (None if it did not
    load), per backend (reference, cpu, cuda, simt) whether it is compiled and usable, why
    not, and per op whether a kernel or the reference runs; and which attention kernel runs
    where."""
    from . import __version__
    return {"sarkernels": __version__, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "build": ops.build_info(),
            "backends": ops.backends(), "attention_rule": ops.ATTENTION_RULE,
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
    ops_names = list(d["backends"]["reference"]["ops"])
    lines.append("")
    lines.append(f"{'op':<42} " + " ".join(f"{name:<10}" for name in d["backends"]))
    for op in ops_names:
        lines.append(f"{op:<42} " + " ".join(f"{s['ops'][op]:<10}" for s in d["backends"].values()))
    lines.append(f"set_attention: {d['attention_rule']}")
    return "\n".join(lines)
