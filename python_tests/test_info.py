import json
import subprocess
import sys
import threading

import pytest
import torch

import sarkernels

OPS = ["set_attention", "set_attention_backward", "kv_cache_append",
       "interleave_position_instructions", "interleave_position_instructions_backward"]
# Implementation backend -> (use_backend name, op namespace).
SELECT = {"cpu": ("kernels", "sarkernels"), "simt": ("simt", "sarkernels_simt")}


def test_info_lists_every_backend_and_op():
    d = sarkernels.info()
    assert list(d["backends"]) == ["reference", "cpu", "cuda", "simt"]
    for s in d["backends"].values():
        assert list(s["ops"]) == OPS
        assert s["usable"] == (s["why_not"] is None)
        assert s["compiled"] or not s["usable"]
        if not s["compiled"]:
            assert set(s["ops"].values()) == {"reference"}
    assert set(d["backends"]["reference"]["ops"].values()) == {"reference"}
    assert not d["backends"]["cuda"]["usable"] or torch.cuda.is_available()
    assert d["attention_rule"]
    if d["build"] is not None:
        assert d["build"]["torch_version"] == torch.__version__


def what_runs(backend, ns, op, run):
    """'kernel' if the profiler sees the compiled op ns::op while `run` runs, else 'reference'."""
    with torch.profiler.profile() as prof, sarkernels.use_backend(backend):
        run()
    return "kernel" if f"{ns}::{op}" in {e.name for e in prof.events()} else "reference"


@pytest.mark.parametrize("impl", sorted(SELECT))
def test_info_tells_what_runs(impl):
    backend, ns = SELECT[impl]
    s = sarkernels.info()["backends"][impl]
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    sets = torch.zeros(1, 3, dtype=torch.long)
    attention = lambda: sarkernels.set_attention(q, q, q, sets, sets)
    if not s["usable"]:
        with pytest.raises(RuntimeError, match="backend"):
            with sarkernels.use_backend(backend):
                attention()
        return
    tokens = torch.randn(1, 2, 8, requires_grad=True)
    positions, table = torch.tensor([[0, 1]]), torch.randn(2, 8)
    interleave = lambda: sarkernels.interleave_position_instructions(tokens, positions, table)
    cache, new = torch.zeros(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    runs = {"set_attention": attention,
            "set_attention_backward": lambda: attention().sum().backward(),
            "kv_cache_append": lambda: sarkernels.kv_cache_append(cache, cache.clone(), new, new,
                                                                  positions),
            "interleave_position_instructions": interleave,
            "interleave_position_instructions_backward": lambda: interleave().sum().backward()}
    for op, run in runs.items():
        assert what_runs(backend, ns, op, run) == s["ops"][op], op


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "sarkernels", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["backends"] == sarkernels.info()["backends"]
    table = subprocess.run([sys.executable, "-m", "sarkernels", "info"], capture_output=True,
                           text=True, check=True).stdout
    assert "backend" in table and "reference" in table and "kv_cache_append" in table


def test_use_backend_validates_and_restores():
    q = torch.randn(1, 1, 2, 8)
    sets = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="use_backend"):
        with sarkernels.use_backend("fast"):
            pass
    # "simt" on CUDA tensors is refused; a meta tensor stands in for any non-CPU device
    with pytest.raises(RuntimeError, match="simt"):
        with sarkernels.use_backend("simt"):
            sarkernels.set_attention(*[q.to("meta")] * 3, sets.to("meta"), sets.to("meta"))
    with sarkernels.use_backend("reference"):
        with torch.profiler.profile() as prof:
            sarkernels.set_attention(q, q, q, sets, sets)
    assert not any(e.name.startswith("sarkernels") for e in prof.events())


def test_use_backend_is_per_thread():
    """A backend chosen in one thread does not leak into another running meanwhile."""
    seen, chosen, release = {}, threading.Event(), threading.Event()

    def chooser():
        with sarkernels.use_backend("reference"):
            chosen.set()
            release.wait(10)

    def observer():
        chosen.wait(10)
        q = torch.randn(1, 1, 2, 8)
        sets = torch.zeros(1, 2, dtype=torch.long)
        with torch.profiler.profile() as prof:
            sarkernels.set_attention(q, q, q, sets, sets)
        seen["ops"] = {e.name for e in prof.events() if e.name.startswith("sarkernels")}
        release.set()

    threads = [threading.Thread(target=chooser), threading.Thread(target=observer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect = {"sarkernels::set_attention"} if sarkernels.info()["backends"]["cpu"]["usable"] else set()
    assert seen["ops"] == expect


def test_import_without_compiled_extension_falls_back_to_reference():
    code = """
import sys, torch
sys.modules['sarkernels._C'] = None  # makes the import fail like a broken build
sys.modules['sarkernels._simt'] = None
import sarkernels
d = sarkernels.info()
assert d['build'] is None and not d['backends']['cpu']['usable'], d
assert 'did not load' in d['backends']['cpu']['why_not']
assert not d['backends']['simt']['usable']
q = torch.randn(1, 2, 5, 16); s = torch.arange(5)[None]
out = sarkernels.set_attention(q, q, q, s, s)
ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
torch.testing.assert_close(out, ref)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
