"""CPU smoke test of benchmarks/attention_training.py on its --tiny shapes (timings there
are not results): a row per shape and competitor, and the correctness check both runs and
catches a wrong kernel."""
import json

import pytest
import torch
import torch.nn.functional as F

import attention_training as bench

TINY = ["--tiny", "--device", "cpu", "--flex", "eager", "--repeats", "5"]


@pytest.fixture
def one_thread():
    """One thread: on a shared 2-core machine OpenMP's barriers wait out whole time slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_rows():
    return {(shape, who) for shape, (layout, _, _) in bench.SHAPES.items()
            for who in bench.COMPETITORS if who != "sdpa_causal" or layout == "causal"}


def table_rows(stdout):
    """(shape key, competitor) of each markdown row after the header."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")][1:]
    cells = ([c.strip() for c in line.strip("| ").split(" | ")] for line in lines)
    return [(row[0].split()[0], row[1]) for row in cells]


def test_tiny_run_has_every_row_and_checks_ours(tmp_path, capsys, one_thread):
    out = tmp_path / "rows.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == len(set(rows)) and set(rows) == expected_rows()
    data = json.loads(out.read_text())
    assert [(r["shape"].split()[0], r["who"]) for r in data["rows"]] == rows
    for row in data["rows"]:
        if row["who"] in ("ours", "sdpa_dense"):  # these run everywhere: both timings exist
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
        else:  # a timing or the reason there is none
            assert row["fwd_ms"] or row.get("error"), row
        if row["who"] == "ours":
            assert row["check"].startswith("ok: max err ours/SDPA vs float64 out "), row
            assert all(f" {grad} " in row["check"] for grad in ("dq", "dk", "dv"))


def test_wrong_kernel_fails_the_check(monkeypatch, capsys, one_thread):
    # Full attention where the shape is causal: the check must catch it, and no target passes.
    monkeypatch.setitem(bench.SETUPS, "ours", lambda c, args: F.scaled_dot_product_attention)
    assert bench.main([*TINY, "--shapes", "a"]) == 1
    by_who = {line.split(" | ")[1]: line for line in capsys.readouterr().out.splitlines()
              if line.startswith("| a ")}
    assert "| WRONG: max err ours/SDPA vs float64 out " in by_who["ours"]
    assert "| fail (ours failed the check) |" in by_who["sdpa_causal"]
