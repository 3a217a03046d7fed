"""benchmarks/sass_census.py (issue 23): the control-flow graph, loop and path code on small
synthetic SASS listings, the model's tile walk against a brute-force one, and the CI budgets:
the sm_90a kernels of `make cuda-check` must not issue more instructions per score on their
main loop than benchmarks/census_budgets.json records (+ its margin), nor spill."""
import importlib.util
import itertools
import json
import os
import re
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "sass_census", os.path.join(ROOT, "benchmarks", "sass_census.py"))
sc = sys.modules["sass_census"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sc)
BUDGETS = os.path.join(ROOT, "benchmarks", "census_budgets.json")


def listing(code, name="_Z4testv"):
    """An nvdisasm-style listing of one function: lines are labels ('.L_x_0:') or
    instructions ('@P0 BRA `(.L_x_0)'), given addresses 16 apart."""
    out = [f'\t.section\t.text.{name},"ax",@progbits', f"{name}:"]
    addr = 0
    for line in code.strip().splitlines():
        line = line.split("#")[0].strip()
        if line.endswith(":"):
            out.append(line)
        elif line:
            out.append(f"        /*{addr:04x}*/                   {line} ;")
            addr += 16
    return sc.parse_nvdisasm("\n".join(out))[name]


def analyse(code, work="hmma", inner=None, must=None):
    fn = listing(code)
    cfg = sc.build_cfg(fn.instrs, fn.labels)
    loops, reachable = sc.natural_loops(cfg)
    for lp in loops:
        sc.loop_paths(lp, cfg, work, inner, must)
    return fn, cfg, loops, reachable


# A loop whose body skips the tile (no HMMA), or computes it through a diamond: a short
# side (1 FFMA) or a long side (3 ops, the per-element mask); padding after EXIT.
DIAMOND = """
    MOV R0, RZ
.L_x_0:
    ISETP.GE.AND P0, PT, R0, R1, PT
    @P0 BRA `(.L_x_1)                  # skip the tile
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    @P1 BRA `(.L_x_2)
    FFMA R2, R2, R3, R2
    BRA `(.L_x_3)
.L_x_2:
    FMUL R2, R2, R3
    FSETP.GT.AND P3, PT, R2, RZ, PT
    FSEL R2, R2, RZ, P3
.L_x_3:
    HMMA.16816.F32.BF16 R4, R8, R14, R4
.L_x_1:
    IADD3 R0, R0, 0x1, RZ
    ISETP.LT.AND P2, PT, R0, R5, PT
    @P2 BRA `(.L_x_0)
    EXIT
.L_x_9:
    BRA `(.L_x_9)
    NOP
    NOP
"""


def test_diamond_loop_paths():
    fn, cfg, loops, reachable = analyse(DIAMOND)
    assert len(loops) == 1, "the unreachable padding self-loop is no loop"
    paths = loops[0].paths
    # header 2 + HMMA block 2 + short side 2 (FFMA, BRA) + join 1 + latch 3
    assert paths["full"]["total"] == 10 and paths["full"]["hmma"] == 2
    assert paths["partial"]["total"] == 11 and paths["partial"]["hmma"] == 2
    assert paths["partial"]["fp32"] == 3 and paths["full"].get("ffma") == 1
    assert paths["skip"]["total"] == 5 and paths["skip"].get("hmma", 0) == 0
    assert paths["full"]["mma_flop"] == 2 * 4096
    # NOPs are not instructions; the padding is unreachable
    assert sum(cfg.counts[b].get("total", 0) for b in reachable) == 15


def test_required_loads_pick_the_prefetching_path():
    code = """
    .L_x_0:
        HMMA.16816.F32.BF16 R4, R8, R12, R4
        @P0 BRA `(.L_x_1)                   # last iteration: no prefetch
        LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64]
        LDGSTS.E.BYPASS.128 [R2+0x10], desc[UR4][R6.64+0x10]
    .L_x_1:
        @P1 BRA `(.L_x_0)
        EXIT
    """
    _, _, loops, _ = analyse(code)
    assert loops[0].paths["full"].get("ldgsts", 0) == 0  # nothing asked: the shortest
    _, _, loops, _ = analyse(code, must=("ldgsts", 2))
    assert loops[0].paths["full"]["ldgsts"] == 2 and loops[0].paths["full"]["total"] == 5
    _, _, loops, _ = analyse(code, must=("ldgsts", 9))  # unreachable bound: the most there is
    assert loops[0].paths["skip"]["ldgsts"] == 2


# for_each_needed_tile unrolled by its two stages: two visits an iteration, each with its
# commit; the second visit's issue skipped when the list ends there, the iteration left
# after the first when it is the list's last.
UNROLLED = """
.L_x_0:
    @P0 BRA `(.L_x_1)
    LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64]
.L_x_1:
    LDGDEPBAR
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    @P2 BRA `(.L_x_4)
    @P1 BRA `(.L_x_2)
    LDGSTS.E.BYPASS.128 [R2+0x10], desc[UR4][R6.64]
.L_x_2:
    LDGDEPBAR
    HMMA.16816.F32.BF16 R4, R8, R14, R4
.L_x_3:
    LDGDEPBAR                            # an inner loop's commits are not visits
    @P4 BRA `(.L_x_3)
    @P3 BRA `(.L_x_0)
.L_x_4:
    EXIT
"""


def test_a_walk_unrolled_by_stage_makes_a_visit_a_commit():
    fn, cfg, loops, _ = analyse(UNROLLED, must=("ldgsts", 2))
    outer = max(loops, key=lambda lp: len(lp.body))
    assert sc.visits_per_iteration(outer, cfg) == 2
    full = outer.paths["full"]  # both visits issue: the need is per visit times visits
    assert full["hmma"] == 2 and full["ldgsts"] == 2
    _, _, loops, _ = analyse(UNROLLED, must=("ldgsts", 1))
    assert max(loops, key=lambda lp: len(lp.body)).paths["full"]["ldgsts"] == 1


NESTED = """
.L_x_0:                                  # outer loop (key tiles)
    IADD3 R0, R0, 0x1, RZ
.L_x_1:                                  # inner loop (column chunks)
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    IADD3 R1, R1, 0x1, RZ
    ISETP.LT.AND P1, PT, R1, R5, PT
    @P1 BRA `(.L_x_1)
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    ISETP.LT.AND P0, PT, R0, R6, PT
    @P0 BRA `(.L_x_0)
    EXIT
"""


def test_nested_loops():
    _, cfg, loops, _ = analyse(NESTED)
    inner, outer = loops  # innermost first
    assert inner.parent is outer and outer.children == [inner]
    assert (inner.depth, outer.depth) == (1, 0)
    assert inner.body < outer.body
    assert inner.paths["full"]["total"] == 4 and inner.paths["full"]["hmma"] == 1
    # the inner loop counted once inside the outer: 1 + 4 + 3 instructions
    assert outer.paths["full"]["total"] == 8 and outer.paths["full"]["hmma"] == 2
    assert any("counted once" in n for n in outer.notes)
    # scaled: the inner loops do 4 HMMA per outer iteration
    _, _, (inner, outer), _ = analyse(NESTED, inner={"hmma": 4})
    assert outer.paths["full"]["hmma"] == 5 and outer.paths["full"]["total"] == 1 + 16 + 3


# An outer loop that runs one of two copies of an inner loop (a bounds-checked and a plain
# one, as the atomic dQ's items): the inner work asked per iteration is done by the copy
# on the path alone, not shared between the two.
ALTERNATIVES = """
.L_x_0:
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    @P0 BRA `(.L_x_2)
.L_x_1:                                  # plain copy
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    @P1 BRA `(.L_x_1)
    BRA `(.L_x_4)
.L_x_2:                                  # checked copy
    ISETP.LT.AND P3, PT, R1, R5, PT
    HMMA.16816.F32.BF16 R4, R8, R12, R4
    @P2 BRA `(.L_x_2)
.L_x_4:
    @P4 BRA `(.L_x_0)
    EXIT
"""


def test_alternative_inner_loops_each_do_the_inner_work():
    fn, cfg, loops, _ = analyse(ALTERNATIVES, inner={"hmma": 4})
    outer = loops[-1]
    assert len(outer.children) == 2
    for path in ("full", "partial"):
        assert outer.paths[path]["hmma"] == 1 + 4, path  # was 1 + 2: 4 split over both
    # header 2, then the plain copy (2 a trip, x4) and a BRA, or the checked one (3 x4); latch 1
    assert outer.paths["full"]["total"] == 2 + 2 * 4 + 1 + 1
    assert outer.paths["partial"]["total"] == 2 + 3 * 4 + 1
    text = sc.route_listing(fn, cfg, outer, "full")
    assert "inner loop at 0x20" in text and "ISETP" not in text, text


def test_overhead_is_one_path_around_the_main_loop():
    # prologue 1, main loop (2), then one of two epilogues (1 or 3 instructions), EXIT
    code = """
        MOV R0, RZ
    .L_x_0:
        HMMA.16816.F32.BF16 R4, R8, R12, R4
        @P0 BRA `(.L_x_0)
        @P1 BRA `(.L_x_1)
        FFMA R2, R2, R3, R2
        EXIT
    .L_x_1:
        FMUL R2, R2, R3
        FADD R2, R2, R3
        FADD R2, R2, R3
        EXIT
    """
    _, cfg, loops, reachable = analyse(code)
    (main,) = loops
    over = sc.overhead_path(cfg, loops, reachable, main)
    # MOV + @P1 BRA + the longer epilogue (3 + EXIT), not both epilogues (9 in all)
    assert over["total"] == 2 + 4 and over.get("hmma", 0) == 0


def test_main_loop_is_the_most_work_then_fewest_instructions():
    # two loops with 2 HMMA each: a peeled, masked one (more instructions), then the steady one
    code = """
    .L_x_0:
        HMMA.16816.F32.BF16 R4, R8, R12, R4
        HMMA.16816.F32.BF16 R4, R8, R14, R4
        FSEL R2, R2, RZ, P3
        FSEL R3, R3, RZ, P3
        @P0 BRA `(.L_x_0)
    .L_x_1:
        HMMA.16816.F32.BF16 R4, R8, R12, R4
        HMMA.16816.F32.BF16 R4, R8, R14, R4
        @P1 BRA `(.L_x_1)
        EXIT
    """
    row = sc.census_function(listing(code), "void test()", "sm_90a")
    assert row["main"]["header"] == "0x50" and row["main"]["paths"]["full"]["total"] == 3
    assert len(row["loops"]) == 2
    assert row["overhead"]["total"] == 6  # the peeled loop and EXIT, once per block


def test_branch_successors():
    code = """
        @!PT BRA `(.L_x_2)        # never taken
        @P0 BRA `(.L_x_1)         # taken or not
        BRA.DIV UR4, `(.L_x_2)    # only a diverged warp: not followed
        @P1 EXIT                  # some threads exit
        BRA `(.L_x_1)             # always
    .L_x_1:
        EXIT
    .L_x_2:
        WARPSYNC.COLLECTIVE R2, `(.L_x_1)
        BPT.TRAP 0x1
    """
    fn = listing(code)
    cfg = sc.build_cfg(fn.instrs, fn.labels)
    addr = {a: b for b, a in enumerate(cfg.addr)}
    succ = {a: sorted(cfg.addr[s] for s in cfg.succ[b]) for a, b in addr.items()}
    assert succ[0x00] == [0x10]                 # @!PT BRA
    assert succ[0x10] == [0x20, 0x50]           # @P0 BRA
    assert succ[0x20] == [0x30]                 # BRA.DIV
    assert succ[0x30] == [0x40]                 # @P1 EXIT
    assert succ[0x40] == [0x50]                 # BRA
    assert succ[0x50] == []                     # EXIT
    _, reachable = sc.natural_loops(cfg)
    assert addr[0x60] not in reachable          # the collective fallback


def test_classes_and_names():
    assert sc.op_class("HMMA.16816.F32.BF16") == "hmma"
    assert sc.op_class("LDGSTS.E.BYPASS.128") == "ldgsts"
    assert sc.op_class("UIADD3") == "int" and sc.op_class("ULDC.64") == "mov"
    assert sc.op_class("REDG.E.ADD.F32.FTZ.RN.STRONG.GPU") == "atom"
    assert sc.op_class("NOP") == "nop" and "total" not in sc.op_counts("NOP")
    assert sc.op_counts("MUFU.EX2")["ex2"] == 1
    ours = ("void sarkernels::kernels::attention::set_attention_dkdv_kernel<__nv_bfloat16, 64, "
            "64, 64, 64, true>(sarkernels::SetAttentionBwdParams, "
            "sarkernels::AttentionBwdWorkspace)")
    fam, p = sc.family_of(ours)
    assert fam.key(p) == "dkdv bf16 D64 atomic-dq" and (p["BN"], p["BM"]) == (64, 64)
    assert fam.scores(p, 4) == 16 * 64 and fam.inner(p, 4)["hmma"] == 32
    fa2 = ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
           "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, "
           "false, false, false, false, true, true, false, false>(flash::Flash_fwd_params)")
    fam, p = sc.family_of(fa2)
    assert fam.key(p) == "fa2 fwd bf16 D64 128x128" and fam.scores(p, 4) == 32 * 128
    assert sc.family_of("void other<int>(int)") == (None, None)
    assert sc.blocks_per_sm(255, 128, 49152) == (2, ["registers"])


def brute_visits(q_sets, k_sets, strict, bm, bn, warp_rows, rows_are_queries):
    """mask.h's classes tile by tile, as the kernels walk them (for the model's test)."""
    vis = (lambda q, k: k < q) if strict else (lambda q, k: k <= q)
    rows, cols = (q_sets, k_sets) if rows_are_queries else (k_sets, q_sets)
    rb, cb = (bm, bn) if rows_are_queries else (bn, bm)
    out = dict(full=0, partial=0, skip=0)

    def kind(r, c):
        if not len(r) or not len(c):
            return "skip"
        q, k = (r, c) if rows_are_queries else (c, r)
        if not vis(max(q), min(k)):
            return "skip"
        return "full" if vis(min(q), max(k)) else "partial"
    for r0, c0 in itertools.product(range(0, len(rows), rb), range(0, len(cols), cb)):
        block, tile = rows[r0:r0 + rb], cols[c0:c0 + cb]
        block_kind = kind(block, tile)
        if block_kind == "skip":
            continue
        # The query-tile kernels take their fast path only where the whole block sees the
        # whole tile; the dK/dV kernel decides per warp.
        fast = block_kind == "full" or not rows_are_queries
        for w in range(0, rb, warp_rows):
            k = kind(block[w:w + warp_rows], tile)
            out["partial" if k == "full" and (len(tile) < cb or not fast) else k] += 1
    return out


@pytest.mark.parametrize("strict", [False, True])
def test_model_visits_mirror_the_kernels(strict):
    gen = np.random.default_rng(0)
    q_sets = np.sort(gen.integers(0, 9, 150))
    k_sets = np.sort(gen.integers(0, 9, 170))
    for family, (bm, bn), rows_q in (("ours fwd", (64, 64), True), ("ours dkdv", (32, 64), False)):
        row = dict(family=family, warps=4, params=dict(BM=bm, BN=bn, D=64, DC=64))
        got = sc.visits(row, q_sets, k_sets, strict, False)
        warp_rows = (bm if rows_q else bn) // 4
        assert {k: got[k] for k in ("full", "partial", "skip")} == \
            brute_visits(q_sets, k_sets, strict, bm, bn, warp_rows, rows_q)
    fa2 = dict(family="fa2 fwd", warps=4, params=dict(BM=128, BN=128, D=64))
    got = sc.visits(fa2, np.arange(513), np.arange(513), False, True)
    assert got["full"] + got["partial"] == 4 * sum(range(1, 6))  # lower triangle of 5 x 5
    assert got["partial"] == 4 * (5 + 4)  # the diagonal, and the ragged last query block


def test_budget_check_reports_regressions():
    row = dict(key="fwd bf16 D64", local_instructions=0,
               main=dict(per_score=1.10, scores=1024, paths=dict(full=dict(total=1126))))
    budgets = dict(margin=0.02, kernels={"fwd bf16 D64": dict(per_score=1.08, instructions=1104),
                                         "dq bf16 D64": dict(per_score=1.1, instructions=1130)})
    assert sc.check_budgets([row], budgets) == ["dq bf16 D64: kernel (or its main loop) not found"]
    row["main"]["per_score"] = 1.11
    assert "per score > budget" in sc.check_budgets([row], budgets)[0]
    row["local_instructions"] = 3
    assert any("local-memory" in f for f in sc.check_budgets([row], budgets))


def test_budgets_of_the_compiled_kernels():
    """The CI check: `make test` compiles build/cuda-check (make cuda-check) first."""
    budgets = json.load(open(BUDGETS))
    objects = sc.default_objects()
    if not objects:
        pytest.skip("no build/cuda-check objects (run make cuda-check)")
    if not (sc.find_tool("nvdisasm") and sc.find_tool("cuobjdump")):
        pytest.skip("nvdisasm/cuobjdump not installed (pip install nvidia-cuda-nvdisasm "
                    "nvidia-cuda-cuobjdump, as the Makefile does)")
    have = sc.nvcc_version()
    if have != budgets["nvcc"]:
        pytest.skip(f"budgets are for nvcc {budgets['nvcc']}, this nvcc is {have}")
    pattern = "^(" + "|".join(re.escape(k) for k in budgets["kernels"]) + ")$"
    rows = sc.census(objects, budgets["arch"], pattern)
    built_by = {r["tool"] for r in rows}
    if built_by != {budgets["nvcc"]}:
        pytest.skip(f"objects built by ptxas {built_by}, budgets for {budgets['nvcc']}")
    fails = sc.check_budgets(rows, budgets)
    assert not fails, ("instruction budgets exceeded (re-record with `python "
                       "benchmarks/sass_census.py --write-budgets benchmarks/census_budgets.json`"
                       " only for a deliberate change):\n" + "\n".join(fails))
