import json
import subprocess
import sys

import torch

import sarkernels
from sarkernels import ops


def test_info_tells_the_truth():
    d = sarkernels.info()
    assert d["backends"]["reference"]["usable"]
    cpu = d["backends"]["cpu"]
    assert cpu["compiled"] == (ops._C is not None and "cpu" in ops.kernel_devices())
    assert cpu["usable"] == cpu["compiled"]
    cuda = d["backends"]["cuda"]
    assert cuda["usable"] == (cuda["compiled"] and torch.cuda.is_available())
    if not cuda["usable"]:
        assert cuda["why_not"]
    if ops._C is not None:
        assert d["build"]["torch_version"] == torch.__version__
    else:
        assert ops.LOAD_ERROR in cpu["why_not"]


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "sarkernels", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["backends"] == sarkernels.info()["backends"]
    table = subprocess.run([sys.executable, "-m", "sarkernels", "info"], capture_output=True,
                           text=True, check=True).stdout
    assert "backend" in table and "reference" in table


def test_use_backend_validates_and_restores():
    import pytest
    with pytest.raises(ValueError, match="use_backend"):
        with sarkernels.use_backend("fast"):
            pass
    with sarkernels.use_backend("reference"):
        assert ops._backend["name"] == "reference"
    assert ops._backend["name"] == "auto"


def test_import_without_compiled_extension_falls_back_to_reference():
    code = """
import sys, torch
sys.modules['sarkernels._C'] = None  # makes 'from . import _C' fail like a broken build
import sarkernels
d = sarkernels.info()
assert d['build'] is None and not d['backends']['cpu']['usable'], d
assert 'did not load' in d['backends']['cpu']['why_not']
q = torch.randn(1, 2, 5, 16); s = torch.arange(5)[None]
out = sarkernels.set_attention(q, q, q, s, s)
ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
torch.testing.assert_close(out, ref)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
