"""Every Python block of the README runs when pasted alone into a fresh interpreter (a
block that needs files or a checkout the reader must fetch says "not runnable alone")."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", [b for b in BLOCKS if "not runnable alone" not in b],
                         ids=lambda b: re.sub(r"\W+", "-", b.strip().split("\n")[-1])[:40])
def test_a_readme_block_runs_alone(block, tmp_path, monkeypatch):
    # fresh globals: a name the block does not import or define itself is a NameError
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
