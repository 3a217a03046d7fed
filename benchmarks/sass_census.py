"""Instruction census of the CUDA kernels' main loops, from their SASS (issue 23), and an
issue-slot model of their speed at the benchmark shapes. No GPU needed: everything here is
static machine code.

    python benchmarks/sass_census.py                       # our bf16 D=64/128 kernels (sm_90a)
    python benchmarks/sass_census.py --all --kernels 'fwd bf16 D64'    # every HMMA loop too
    python benchmarks/sass_census.py --model --fa2 benchmarks/census_fa2.json
    python benchmarks/sass_census.py --budget-check benchmarks/census_budgets.json
    python benchmarks/sass_census.py --write-budgets benchmarks/census_budgets.json
    python benchmarks/sass_census.py --build-fa2 DIR --json benchmarks/census_fa2.json

Inputs: CUDA objects or cubins (default: the `make cuda-check` objects in
build/cuda-check/cuda_check, or $SASS_CENSUS_OBJDIR). Per kernel instantiation the SASS
(nvdisasm) is cut into basic blocks; dominators give the natural loops; the loops that hold
the kernel's work (HMMA, or FFMA for the scalar decode kernel) are measured along three
paths from the loop header to a back edge, found by dynamic programming over the loop body
with its back edges removed:
  full     the most work, then the fewest instructions (a fully visible tile),
  partial  the most work, then the most instructions (a tile with the per-element mask),
  skip     the fewest instructions (a tile the warp skips).
The main loop is the loop with the most work on its full path (ties: fewest instructions,
which picks FlashAttention-2's steady-state loop over its peeled masking iteration).

Every path must issue the global loads of one steady-state iteration (the family's
`must`, e.g. the cp.async copies of the next K/V tile): without that bound the shortest
path would be the last iteration, which prefetches nothing.

Counting rules (they are assumptions; the output repeats them):
  * NOPs are not instructions (SASS pads code with them); they are counted apart.
  * An inner loop inside a measured loop is one node of its DAG, counted once, unless its
    family says how much of some counter the inner loops issue per iteration: then the
    inner loops issuing it are scaled to that (e.g. the loops over 16-byte chunks of a
    tile, the dK/dV kernel's atomic-dQ loop over column chunks).
  * A tile walk unrolled by its two stages (16-bit tiles) makes two visits an iteration,
    each with its own cp.async commit (LDGDEPBAR): its counts are per visit, the
    iteration's over its commits.
  * BRA.DIV (taken only by a diverged warp, into the WARPSYNC.COLLECTIVE fallback) is not
    followed; CALL counts as one instruction (its callee, a slow path, is not followed).
  * Per-block overhead: the instructions outside the main loop along the longest path from
    entry to exit (other loops counted once a trip), once per warp.
Tools: cuobjdump and nvdisasm from PATH, $CUDA_HOME/bin or PyPI's nvidia-cuda-cuobjdump /
nvidia-cuda-nvdisasm wheels (site-packages/nvidia/cu13/bin), and c++filt.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OBJDIR = os.path.join(ROOT, "build", "cuda-check", "cuda_check")

# ---------------------------------------------------------------- instruction classes
# One table: class -> base opcodes (the opcode up to its first dot). First match wins; a
# leading U (uniform datapath) is accepted for the integer, move and predicate classes.
CLASSES = (
    ("nop", "NOP"),
    ("hmma", "HMMA IMMA DMMA HGMMA IGMMA QGMMA BMMA"),
    ("ldsm", "LDSM"),
    ("lds", "LDS"),
    ("sts", "STS"),
    ("ldgsts", "LDGSTS"),
    ("ldg", "LDG LD"),
    ("stg", "STG ST"),
    ("atom", "RED REDG ATOM ATOMG ATOMS REDUX"),
    ("local", "LDL STL"),
    ("mufu", "MUFU"),
    ("fp32", "FFMA FADD FMUL FMNMX FSETP FSEL FSET FCHK FSWZADD FFMA32I FADD32I FMUL32I "
             "HFMA2 HADD2 HMUL2 HMNMX2 HSETP2 HSET2"),
    ("fp64", "DFMA DADD DMUL DSETP DMNMX"),
    ("cvt", "F2FP F2F I2F F2I I2FP F2IP FRND I2I"),
    ("int", "IMAD IADD3 IADD LOP3 LOP SHF SHL SHR LEA ISETP IMNMX VIMNMX VIADDMNMX IABS SEL "
            "VIADD PRMT POPC FLO BREV IDP IMUL SGXT BMSK ISCADD IMUL32I IADD32I LOP32I "
            "VABSDIFF VABSDIFF4"),
    ("mov", "MOV S2R S2UR CS2R R2UR LDC MOV32I"),
    ("pred", "PLOP3 P2R R2P PSETP VOTE VOTEU P2UR"),
    ("shfl", "SHFL"),
    ("branch", "BRA BRX JMP JMX CALL RET EXIT BSSY BSYNC BREAK WARPSYNC ENDCOLLECTIVE BPT "
               "KILL YIELD NANOSLEEP BMOV"),
    ("barrier", "BAR DEPBAR LDGDEPBAR ARRIVES SYNCS MEMBAR ERRBAR CCTL FENCE"),
)
_UNIFORM_OK = {"int", "mov", "pred"}
_CLASS_OF = {}
for _cls, _ops in CLASSES:
    for _op in _ops.split():
        _CLASS_OF.setdefault(_op, _cls)
        if _cls in _UNIFORM_OK:
            _CLASS_OF.setdefault("U" + _op, _cls)
# FLOP of one warp-wide MMA by shape suffix (mma.sync m16n8k16 / m16n8k8)
MMA_FLOP = {"16816": 2 * 16 * 8 * 16, "1688": 2 * 16 * 8 * 8, "884": 2 * 8 * 8 * 4}


def op_class(op):
    return _CLASS_OF.get(op.split(".")[0], "other")


def op_counts(op):
    """The counters one instruction adds: its class, 'total' (not for NOP), and a few
    opcodes counted apart (MUFU.EX2, FFMA) plus the MMA FLOP it performs."""
    cls = op_class(op)
    c = {cls: 1}
    if cls != "nop":
        c["total"] = 1
    if op.startswith("MUFU.EX2"):
        c["ex2"] = 1
    if op.split(".")[0] == "FFMA":
        c["ffma"] = 1
    if op == "LDGDEPBAR":  # cp.async.commit_group: our tile walks commit once a visit
        c["commit"] = 1
    if cls == "hmma":
        shape = op.split(".")[1] if "." in op else ""
        c["mma_flop"] = MMA_FLOP.get(shape, 0)
    return c


def add(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


# ---------------------------------------------------------------- tools
def find_tool(name):
    """PATH, $CUDA_HOME/bin, then the bin folders of PyPI's nvidia-* wheels."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin")]
    try:
        import nvidia  # namespace package of the nvidia-cuda-* wheels
        for base in nvidia.__path__:
            dirs += glob.glob(os.path.join(base, "*", "bin"))
    except ImportError:
        pass
    for d in dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def nvcc_version():
    """'13.0.88' from `nvcc --version`, or None without nvcc."""
    nvcc = find_tool("nvcc")
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def demangle(names):
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


# ---------------------------------------------------------------- objects and cubins
def elf_functions(path):
    """{symbol name: symbol index} of the FUNC symbols of an ELF64 cubin (nvdisasm -fun
    takes symbol indices, so that only the kernels asked for are disassembled)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path}: not an ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = {}
    for _, stype, _, _, off, size, link, _, _, entsize in secs:
        if stype != 2:  # SHT_SYMTAB
            continue
        stroff = secs[link][4]
        for i in range(size // entsize):
            st_name, st_info = struct.unpack_from("<IB", data, off + i * entsize)
            if st_info & 0xF == 2:  # STT_FUNC
                end = data.index(b"\0", stroff + st_name)
                out[data[stroff + st_name:end].decode()] = i
    return out


def extract_cubins(obj, arch, tmp):
    """The cubins of `arch` inside a CUDA object (cuobjdump -xelf), or obj if a cubin."""
    if obj.endswith(".cubin"):
        return [obj]
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump (see Makefile)")
    where = tempfile.mkdtemp(dir=tmp)
    subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(obj)], cwd=where, check=True,
                   capture_output=True)
    return sorted(glob.glob(os.path.join(where, f"*.{arch}.cubin")))


def ptxas_log(obj):
    """{(mangled name, arch): (registers, spill store bytes, spill load bytes)} from the
    ptxas -v log beside an object (NAME.ptxas.log, as make cuda-check writes), if any."""
    path = os.path.splitext(obj)[0] + ".ptxas.log"
    out, cur = {}, None
    if not os.path.exists(path):
        return out
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '([^']*)' for '([^']*)'", line)
        if m:
            cur = (m.group(1), m.group(2))
            out[cur] = [None, 0, 0]
        elif cur and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            out[cur][1:] = int(m.group(1)), int(m.group(2))
        elif cur and (m := re.search(r"Used (\d+) registers", line)):
            out[cur][0] = int(m.group(1))
    return out


@dataclass
class Instr:
    addr: int
    guard: str  # '' or '@P0', '@!UP1', ...
    op: str     # full opcode, e.g. 'HMMA.16816.F32.BF16'
    args: str

    @property
    def base(self):
        return self.op.split(".")[0]

    def targets(self):
        return [t.strip() for grp in re.findall(r"`\(([^)]*)\)", self.args)
                for t in grp.split(",")]


@dataclass
class Function:
    name: str  # mangled
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # label -> index of the next instruction
    max_threads: int = None
    regs: int = None
    tool: str = None  # ptxas version that built the cubin


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^([.$\w]+):\s*$")
_SECTION = re.compile(r"^\s*\.section\s+([^,\s]+)")


def parse_nvdisasm(text):
    """{mangled name: Function} from nvdisasm's listing: code of .text.NAME sections, the
    launch bound (EIATTR_MAX_THREADS) of .nv.info.NAME, registers (EIATTR_REGCOUNT)."""
    funcs, section, attr, words, regfor, tool = {}, "", None, [], None, None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section, attr = m.group(1), None
            continue
        if section.startswith(".text."):
            fn = funcs.setdefault(section[6:], Function(section[6:]))
            if (m := _INSTR.match(line)):
                fn.instrs.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(),
                                       m.group(3), m.group(4)))
            elif (m := _LABEL.match(line)):
                fn.labels[m.group(1)] = len(fn.instrs)
        elif section.startswith(".nv.info"):
            if "//----- nvinfo :" in line:
                attr, words = line.split(":")[-1].strip(), []
            elif attr and ".word" in line:
                w = line.split(".word")[1].strip()
                if section == ".nv.info" and attr == "EIATTR_REGCOUNT":
                    if w.startswith("index@("):
                        regfor = w[7:-1]
                    elif regfor:
                        funcs.setdefault(regfor, Function(regfor)).regs = int(w, 16)
                        regfor = None
                elif attr == "EIATTR_MAX_THREADS":
                    words.append(int(w, 16))
                    if len(words) == 3:
                        name = section[len(".nv.info."):]
                        funcs.setdefault(name, Function(name)).max_threads = math.prod(words)
        elif "Cuda compilation tools" in line and tool is None:
            m = re.search(r"V(\d+\.\d+\.\d+)", line)
            tool = m.group(1) if m else None
    for fn in funcs.values():
        fn.tool = tool
    return {n: f for n, f in funcs.items() if f.instrs}


def disassemble(cubin, names):
    nvdisasm = find_tool("nvdisasm")
    if not nvdisasm:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (see Makefile)")
    index = elf_functions(cubin)
    idx = ",".join(str(index[n]) for n in names if n in index)
    if not idx:
        return {}
    out = subprocess.run([nvdisasm, "-fun", idx, cubin], capture_output=True, text=True,
                         check=True).stdout
    return parse_nvdisasm(out)


# ---------------------------------------------------------------- control flow
_ENDS_BLOCK = {"BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "BPT", "KILL"}


@dataclass
class CFG:
    starts: list  # first instruction of each block
    ends: list    # one past its last
    succ: list    # successor block ids
    counts: list  # per block: op_counts summed
    addr: list    # address of each block's first instruction


def build_cfg(instrs, labels):
    """Basic blocks split at labels and after control transfers. A guarded branch (not
    @PT) has its target and the fall-through as successors; an unguarded one its targets;
    EXIT/RET/BPT end a path unless guarded; BRA.DIV is not followed (see module doc)."""
    n = len(instrs)
    leaders = {0} | {i for i in labels.values() if i < n}
    leaders |= {i + 1 for i, ins in enumerate(instrs) if ins.base in _ENDS_BLOCK and i + 1 < n}
    starts = sorted(leaders)
    ends = starts[1:] + [n]
    block_of = {s: b for b, s in enumerate(starts)}
    label_block = {lab: block_of[i] for lab, i in labels.items() if i in block_of}
    succ, counts = [], []
    for b, (s, e) in enumerate(zip(starts, ends)):
        last = instrs[e - 1]
        never = last.guard in ("@!PT", "@!UPT")
        cond = last.guard not in ("", "@PT", "@UPT") and not never
        fall = [b + 1] if b + 1 < len(starts) else []
        if never or last.base not in _ENDS_BLOCK:
            out = fall
        elif last.base in ("BRA", "BRX", "JMP", "JMX"):
            targets = [label_block[t] for t in last.targets() if t in label_block]
            if ".DIV" in last.op:
                out = fall
            else:
                out = targets + (fall if cond or not targets else [])
        else:  # EXIT RET BPT KILL
            out = fall if cond else []
        succ.append(list(dict.fromkeys(out)))
        c = {}
        for ins in instrs[s:e]:
            c = add(c, op_counts(ins.op))
        counts.append(c)
    return CFG(starts, ends, succ, counts, [instrs[s].addr for s in starts])


def dominators(succ, entry=0):
    """Immediate dominators of the blocks reachable from entry (Cooper, Harvey, Kennedy)."""
    order, seen, stack = [], {entry}, [(entry, iter(succ[entry]))]
    while stack:  # iterative DFS postorder
        node, it = stack[-1]
        for nxt in it:
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(succ[nxt])))
                break
        else:
            order.append(node)
            stack.pop()
    rpo = order[::-1]
    pos = {n: i for i, n in enumerate(rpo)}
    preds = {n: [] for n in rpo}
    for n in rpo:
        for s in succ[n]:
            preds[s].append(n)
    idom = {entry: entry}
    changed = True
    while changed:
        changed = False
        for n in rpo[1:]:
            done = [p for p in preds[n] if p in idom]
            new = done[0]
            for p in done[1:]:
                a, b = p, new
                while a != b:
                    while pos[a] > pos[b]:
                        a = idom[a]
                    while pos[b] > pos[a]:
                        b = idom[b]
                new = a
            if idom.get(n) != new:
                idom[n], changed = new, True
    return idom, preds


def dominates(idom, a, b):
    while True:
        if a == b:
            return True
        if idom[b] == b:
            return False
        b = idom[b]


@dataclass
class Loop:
    header: int
    latches: list
    body: set
    parent: "Loop" = None
    children: list = field(default_factory=list)
    paths: dict = None  # 'full' / 'partial' / 'skip' -> counts
    routes: dict = None  # the same -> its nodes in order (blocks, or ("loop", id) children)
    notes: list = field(default_factory=list)

    @property
    def depth(self):
        return 0 if self.parent is None else 1 + self.parent.depth


def natural_loops(cfg):
    """Natural loops: a back edge u -> h with h dominating u; the body is h plus every block
    that reaches u without passing h. Back edges to one header make one loop. Nested by
    body inclusion (natural loops are nested or disjoint)."""
    idom, preds = dominators(cfg.succ)
    latches = {}
    for u in idom:
        for h in cfg.succ[u]:
            if h in idom and dominates(idom, h, u):
                latches.setdefault(h, []).append(u)
    loops = []
    for h, us in latches.items():
        body, stack = {h}, [u for u in us if u != h]
        body |= set(stack)
        while stack:
            for p in preds[stack.pop()]:
                if p not in body:
                    body.add(p)
                    stack.append(p)
        loops.append(Loop(h, us, body))
    loops.sort(key=lambda lp: len(lp.body))
    for i, lp in enumerate(loops):
        for outer in loops[i + 1:]:
            if lp.header in outer.body and lp.body <= outer.body:
                lp.parent = outer
                outer.children.append(lp)
                break
    return loops, set(idom)


# Path objectives: the key maximised over paths (lexicographic and additive, so a DP over
# the DAG is exact), among the paths that issue at least the family's global loads of one
# steady-state iteration (Family.must): such an iteration prefetches the next tile, a path
# without it is the last iteration (or skips a guarded loop). A bound, not "the most
# loads": loops over a runtime count come with peeled remainder copies a real iteration
# skips.
# "full" and "partial" also do all of the iteration's global reductions (the atomic dQ of
# the dK/dV kernel: skipping them is the bounds check of a ragged tile, not less work).
OBJECTIVES = {
    "full": lambda c, w: (c.get(w, 0), c.get("atom", 0), -c.get("total", 0)),
    "partial": lambda c, w: (c.get(w, 0), c.get("atom", 0), c.get("total", 0)),
    "skip": lambda c, w: (-c.get("total", 0),),
}


def topological(edges):
    """The nodes of {node: successors} in an order with every edge forward (Kahn); fewer
    than all of them where there is a cycle."""
    indeg = dict.fromkeys(edges, 0)
    for r in edges:
        for v in edges[r]:
            indeg[v] += 1
    order, ready = [], [r for r in edges if indeg[r] == 0]
    while ready:
        r = ready.pop()
        order.append(r)
        for v in edges[r]:
            indeg[v] -= 1
            if indeg[v] == 0:
                ready.append(v)
    return order


def loop_paths(loop, cfg, work, inner=None, must=None):
    """Counts along the full / partial / skip paths of one iteration of `loop` (header to a
    latch, back edges removed) that issue at least must = (counter, amount) (the most of
    it any path reaches, if less), each child loop collapsed into one node: its own full
    path, counted once, or, for a counter of `inner` ({counter: amount per iteration}), the
    children that issue that counter scaled so that those on the path together issue that
    amount (children on other paths, e.g. a bounds-checked copy of the same loop, do not
    count: the path is chosen with them all scaled alike, then rescaled)."""
    rep = {n: n for n in loop.body}
    for ch in loop.children:
        for n in ch.body:
            rep[n] = ("loop", id(ch))
    kids = {("loop", id(ch)): ch for ch in loop.children}
    scale, group, targets, left = {}, {}, [], list(loop.children)
    for counter, amount in (inner or {}).items():
        busy = [ch for ch in left if ch.paths["full"].get(counter, 0) > 0]
        if busy and amount:
            f = amount / sum(ch.paths["full"][counter] for ch in busy)
            scale.update({id(ch): f for ch in busy})
            group.update({id(ch): len(targets) for ch in busy})
            targets.append((counter, amount, f))
            left = [ch for ch in left if ch not in busy]
            loop.notes.append(f"{len(busy)} inner loop(s) scaled to {amount:g} {counter} "
                              f"per iteration")
    if left:
        loop.notes.append(f"{len(left)} inner loop(s) counted once")

    def cost(node):
        if node in kids:
            ch = kids[node]
            full = ch.paths["full"]
            c = {k: v * scale.get(id(ch), 1.0) for k, v in full.items()}
            if id(ch) in group:  # its unscaled counts, for the rescale
                c.update({(group[id(ch)], k): v for k, v in full.items()})
            return c
        return cfg.counts[node]

    def rescaled(c):
        out = {k: v for k, v in c.items() if isinstance(k, str)}
        for g, (counter, amount, f) in enumerate(targets):
            on = c.get((g, counter), 0)
            if on:
                for k, v in c.items():
                    if isinstance(k, tuple) and k[0] == g:
                        out[k[1]] += (amount / on - f) * v
        return out

    edges = {r: set() for r in set(rep.values())}
    for u in loop.body:
        for v in cfg.succ[u]:
            if v in loop.body and v != loop.header and rep[u] != rep[v]:
                edges[rep[u]].add(rep[v])
    order = topological(edges)
    if len(order) != len(edges):
        loop.notes.append("irreducible region: paths through it ignored")
    ends = {rep[u] for u in loop.latches}
    what, need = must or ("ldgsts", 0)
    need = max(0, round(need))
    paths, routes = {}, {}
    for name, key in OBJECTIVES.items():
        # state: (node, `what` issued so far, capped at need); best counts per state
        c0 = cost(loop.header)
        s0 = (loop.header, min(need, round(c0.get(what, 0))))
        best, via = {s0: c0}, {s0: None}
        for r in order:
            for k in range(need + 1):
                if (r, k) not in best:
                    continue
                for v in edges[r]:
                    cand = add(best[r, k], cost(v))
                    sv = (v, min(need, round(cand.get(what, 0))))
                    if sv not in best or key(cand, work) > key(best[sv], work):
                        best[sv], via[sv] = cand, (r, k)
        reach = [s for s in best if s[0] in ends]
        if reach:  # the most prefetch reached (need, where possible), then the objective
            top = max(k for _, k in reach)
            end = max((s for s in reach if s[1] == top), key=lambda s: key(best[s], work))
            paths[name], routes[name] = rescaled(best[end]), []
            while end is not None:
                routes[name].insert(0, end[0])
                end = via[end]
        else:
            paths[name], routes[name] = {}, []
    loop.paths, loop.routes = paths, routes
    return paths


# ---------------------------------------------------------------- kernel families
def _int(a):
    return int(a.rstrip("ul")) if re.fullmatch(r"-?\d+[ul]*", a) else a


_DTYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32", "double": "fp64",
           "cutlass::bfloat16_t": "bf16", "cutlass::half_t": "fp16"}


def template_args(name, func):
    """Top-level template arguments of `func<...>` in a demangled name (None if absent)."""
    m = re.search(r"(?:^|[\s:])" + re.escape(func) + "<", name)
    if not m:
        return None
    args, cur, depth = [], "", 0
    for ch in name[m.end():]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                return args + [cur.strip()]
            depth -= 1
        elif ch == "," and depth == 0:
            args, cur = args + [cur.strip()], ""
            continue
        cur += ch
    return None


def _named(names):
    def parse(args):
        p = {k: _int(a) for k, a in zip(names, args)}
        p = {k: (v == "true" if v in ("true", "false") else v) for k, v in p.items()}
        p["T"] = _DTYPES.get(p["T"], p["T"])
        return p
    return parse


def _fa2(flags):
    """FlashAttention-2's kernels: Flash_*_kernel_traits<hdim, kBlockM, kBlockN, kNWarps, ...>
    first, then the kernel's bool flags."""
    def parse(args):
        traits = template_args(args[0], args[0].split("<")[0])
        p = dict(D=int(traits[0]), BM=int(traits[1]), BN=int(traits[2]), W=int(traits[3]),
                 T=_DTYPES.get(next(t for t in traits if "_t" in t), "?"), traits=traits)
        p.update({f: a == "true" for f, a in zip(flags, args[1:])})
        return p
    return parse


def _fa2_key(kind):
    def key(p):
        tags = [t for t, on in (("causal", p.get("causal")), ("unevenMN", not p.get("even_mn")),
                                ("unevenK", not p.get("even_k")), ("split", p.get("split")),
                                ("appendKV", p.get("append_kv"))) if on]
        return " ".join([f"fa2 {kind} {p['T']} D{p['D']} {p['BM']}x{p['BN']}"] + tags)
    return key


def _fa2_ref(p):
    """FlashAttention-2's reference instantiation: non-causal, even shapes, one split."""
    return (p["even_mn"] and p["even_k"] and not p.get("causal") and not p.get("split")
            and not p.get("append_kv"))


def _tile(rows, cols, elem=2, pad=16):
    """Bytes of a row-major shared tile padded by 16 bytes per row (attention_tiles.cuh)."""
    return rows * (cols * elem + pad)


def _key_stages(d, bn):  # KeyStages<T, D, BN>::kBytes, 16-bit T
    return 4 * _tile(bn, d) + 2 * bn * 4 + 2 * (bn + 1) * 4


# sizeof(TileList) in attention_tiles.cuh: 64 ranges (16 B), 64 infos and tile indices, a
# count, the block's and 8 warps' ranges, the SetCodes (32 B) and 128 row codes.
TILE_LIST = 64 * 16 + 64 * 4 + 64 * 4 + 8 + 16 + 8 * 16 + 32 + 128 * 4


def _chunks(rows, d, warps, elem=2):
    """16-byte copies per thread (= per warp) of rows x d elements over the block."""
    return rows * d * elem / 16 / (32 * warps)


def _decode_rows(d):  # decode_rows() in decode_attention.cuh (the scalar kernel)
    return 32 if d <= 64 else 16 if d <= 128 else 8


def _decode_kw(d):  # decode::kw_of() in decode_attention.cuh: keys per warp tile
    return 32 if d <= 64 else 16


def _fa2_bwd_smem(bm, bn, d, v_in_regs, no_double_buffer):
    """Flash_bwd_kernel_traits::kSmemSize (kernel_traits.h), 16-bit elements."""
    qdo, kv = bm * d * (2 if no_double_buffer else 3) * 2, 2 * bn * d * 2
    ds = p_ = bm * bn * 2
    rest = max(p_, bm * d * 2)
    return qdo + (kv + ds + rest if not v_in_regs else max(kv, kv // 2 + ds + rest))


@dataclass
class Family:
    """How to read one kernel family: the one place to edit when a kernel's name or template
    parameters change. scores(p, warps): scores per warp per main-loop iteration;
    must(p, warps): (counter, amount) of global loads every path of a steady-state
    iteration issues per warp (cp.async copies of the next tiles for the tiled kernels),
    also the amount the inner loops issuing them are scaled to; inner(p, warps): {counter:
    amount per warp per iteration} of other work done in inner (runtime-trip) loops, to
    scale those by (the rest are counted once);
    smem(p): dynamic shared memory per block (a mirror of the kernel's layout struct, for
    blocks per SM; None: unknown); default(p): shown without --kernels; visits: which
    tile walk the model mirrors."""
    func: str
    parse: object
    key: object
    scores: object
    work: str = "hmma"
    inner: object = None
    smem: object = None
    default: object = lambda p: p["T"] == "bf16" and p["D"] in (64, 128)
    visits: str = None
    warps: object = None  # warps from the name when the cubin has no launch bound
    must: object = None


FAMILIES = (
    Family("set_attention_fwd_kernel", _named("T D BM BN DC RW".split()),  # RW: rows/warp
           key=lambda p: f"fwd {p['T']} D{p['D']}",
           scores=lambda p, w: p["BM"] // w * p["BN"],
           smem=lambda p: _tile(p["BM"], p["D"]) + _key_stages(p["D"], p["BN"]) + TILE_LIST
           if p["T"] in ("bf16", "fp16") else None,
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BN"], p["D"], w)),  # K and V tiles
           inner=lambda p, w: dict(lds=_chunks(p["BN"], p["D"], w)),  # the V tile's scrub
           visits="ours fwd"),
    Family("set_attention_dkdv_kernel", _named("T D BN BM DC atomic".split()),
           key=lambda p: f"dkdv {p['T']} D{p['D']}" + (" atomic-dq" if p["atomic"] else ""),
           scores=lambda p, w: p["BN"] // w * p["BM"],
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BM"], p["D"], w)),  # Q and dO tiles
           # atomic dQ: 16-query slabs of dS K spread over the warps, 32 columns a step
           inner=lambda p, w: dict(hmma=p["BM"] / 16 / w * p["D"] * p["BN"] / 128
                                   if p["atomic"] else 0),
           smem=lambda p: 2 * _tile(p["BN"], p["D"]) + 4 * _tile(p["BM"], p["D"])
           + 2 * p["BM"] * 12 + (_tile(p["BM"], p["BN"]) if p["atomic"] else 0) + TILE_LIST
           if p["T"] in ("bf16", "fp16") else None,
           visits="ours dkdv"),
    Family("set_attention_dq_kernel", _named("T D BM BN DC".split()),
           key=lambda p: f"dq {p['T']} D{p['D']}",
           scores=lambda p, w: p["BM"] // w * p["BN"],
           smem=lambda p: 2 * _tile(p["BM"], p["D"]) + _key_stages(p["D"], p["BN"]) + TILE_LIST
           if p["T"] in ("bf16", "fp16") else None,
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BN"], p["D"], w)),
           inner=lambda p, w: dict(lds=_chunks(p["BN"], p["D"], w)),
           visits="ours dq"),
    # The tensor-core decode kernel (16-bit inputs, aligned rows): 16 query rows per block
    # shared by its 4 warps, which split the keys: one iteration is one warp's tile of
    # _decode_kw(D) keys (16 x KW scores), its K and V tiles copied by that warp alone
    # (KW x D x 2 tiles of 16-bit elements, 16 bytes a copy, over 32 lanes).
    Family("decode_mma_kernel", _named("T D".split()),
           key=lambda p: f"decode {p['T']} D{p['D']}",
           scores=lambda p, w: 16 * _decode_kw(p["D"]),
           must=lambda p, w: ("ldgsts", 2 * _decode_kw(p["D"]) * p["D"] * 2 / 16 / 32),
           smem=lambda p: _tile(16, p["D"]) + 4 * 4 * _tile(_decode_kw(p["D"]), p["D"]),
           visits="ours decode"),
    # The scalar decode kernel (fp32/fp64, odd head dims, unaligned rows): one warp per
    # query row, one key per lane, key tiles of 32; scalar FFMA work: per row D for Q.K and
    # D (DMax / 32 columns per lane x 32 keys) for P.V, all in inner loops; the K/V tile
    # (32 x D, one element per load) loaded by all threads.
    Family("decode_split_kernel", _named("T D".split()),
           key=lambda p: f"decode-scalar {p['T']} D{p['D']}",
           scores=lambda p, w: _decode_rows(p["D"]) // w * 32,
           work="ffma", inner=lambda p, w: dict(ffma=_decode_rows(p["D"]) / w * 2 * p["D"]),
           must=lambda p, w: ("ldg", 2 * 32 * p["D"] / (32 * w)),
           smem=lambda p: 8 * (_decode_rows(p["D"]) + 64) + 4 * (
               _decode_rows(p["D"]) * p["D"] + 32 * (2 * p["D"] + 1) + 128),
           default=lambda p: p["T"] == "fp32" and p["D"] in (64, 128),
           visits="ours decode-scalar"),
    # FlashAttention-2 (2.8.3): the traits its launch templates pick on sm_90 are the
    # default rows (fwd hdim64 128x128, hdim128 128x64, bwd hdim64 128x128, split 64x256).
    Family("flash_fwd_kernel",
           _fa2("dropout causal local alibi even_mn even_k softcap return_softmax".split()),
           key=_fa2_key("fwd"), scores=lambda p, w: p["BM"] // w * p["BN"],
           smem=lambda p: (p["BM"] + 2 * p["BN"]) * p["D"] * 2,
           default=lambda p: p["T"] == "bf16" and (p["D"], p["BN"]) in ((64, 128), (128, 64))
           and _fa2_ref(p),
           visits="fa2 fwd", warps=lambda p: p["W"],
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BN"], p["D"], w))),  # K and V
    Family("flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel",
           _fa2("dropout causal local alibi even_mn even_k softcap".split()),
           key=_fa2_key("bwd"), scores=lambda p, w: p["BM"] * p["BN"] // w,
           smem=lambda p: _fa2_bwd_smem(p["BM"], p["BN"], p["D"], *(
               t == "true" for t in p["traits"][7:9])),
           default=lambda p: p["T"] == "bf16" and p["BM"] == 128 and _fa2_ref(p),
           visits="fa2 bwd", warps=lambda p: p["W"],
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BM"], p["D"], w))),  # Q and dO
    Family("flash_fwd_splitkv_kernel",
           _fa2("causal local alibi even_mn even_k softcap split append_kv".split()),
           key=_fa2_key("splitkv"), scores=lambda p, w: p["BM"] // w * p["BN"],
           smem=lambda p: (p["BM"] + 2 * p["BN"]) * p["D"] * 2,
           default=lambda p: p["T"] == "bf16" and _fa2_ref(p),
           visits="fa2 splitkv", warps=lambda p: p["W"],
           must=lambda p, w: ("ldgsts", _chunks(2 * p["BN"], p["D"], w))),
)


def family_of(demangled):
    """(Family, template parameters) of a demangled kernel name, or (None, None)."""
    for fam in FAMILIES:
        args = template_args(demangled, fam.func)
        if args is None:
            continue
        try:
            p = fam.parse(args)
            fam.key(p), fam.default(p)
            return fam, p
        except (KeyError, ValueError, IndexError, TypeError, StopIteration) as e:
            print(f"sass_census: {fam.func}: cannot read the template parameters of "
                  f"{demangled} ({e!r}): edit FAMILIES", file=sys.stderr)
    return None, None


# ---------------------------------------------------------------- one kernel's census
def blocks_per_sm(regs, threads, smem):
    """Resident blocks per H100 SM: 64K registers (per warp, rounded up to 256), 2048
    threads, 32 blocks, 228 KB shared memory (1 KB reserved per block)."""
    warps = -(-threads // 32)
    limits = {"threads": 2048 // threads, "blocks": 32}
    if regs:
        limits["registers"] = 65536 // (warps * -(-regs * 32 // 256) * 256)
    if smem is not None:
        limits["smem"] = 228 * 1024 // (smem + 1024)
    n = min(limits.values())
    return n, [k for k, v in limits.items() if v == n]


def overhead_path(cfg, loops, reachable, main):
    """Counts along the longest path (most instructions) from the entry to an exit outside
    the main loop: each outermost loop one node that costs its blocks once, those of the
    main loop nothing. (Not every block: code on alternative branches, such as the ragged
    and the whole-tile epilogues, never all runs.) Where the graph left is not acyclic, every
    block outside the main loop, once."""
    rep = {b: b for b in reachable}
    for lp in loops:
        if lp.parent is None:
            for b in lp.body:
                rep[b] = ("loop", id(lp))
    cost, edges = {}, {r: set() for r in rep.values()}
    for b in reachable:
        if not (main and b in main.body):
            cost[rep[b]] = add(cost.get(rep[b], {}), cfg.counts[b])
        edges[rep[b]] |= {rep[v] for v in cfg.succ[b] if v in rep and rep[v] != rep[b]}
    order = topological(edges)
    if len(order) != len(edges):
        everything = {}
        for c in cost.values():
            everything = add(everything, c)
        return everything
    best = {rep[0]: cost.get(rep[0], {})}
    for r in order:
        for v in edges[r] if r in best else ():
            cand = add(best[r], cost.get(v, {}))
            if v not in best or cand.get("total", 0) > best[v].get("total", 0):
                best[v] = cand
    return max((c for r, c in best.items() if not edges[r]), key=lambda c: c.get("total", 0),
               default={})


def route_listing(fn, cfg, loop, path):
    """The SASS of one path of `loop`: its blocks in order, each child loop once."""
    kids = {("loop", id(ch)): ch for ch in loop.children}
    out = []
    for node in loop.routes[path]:
        blocks = [node]
        if node in kids:
            ch = kids[node]
            out.append(f"  -- inner loop at {cfg.addr[ch.header]:#x} ({ch.notes or 'full path'})")
            blocks = sorted(ch.body)
        for b in blocks:
            for ins in fn.instrs[cfg.starts[b]:cfg.ends[b]]:
                out.append(f"  {ins.addr:#06x} {ins.guard:6} {ins.op} {ins.args}")
    return "\n".join(out)


# The families whose main loop is for_each_needed_tile (attention_tiles.cuh), unrolled by
# its two stages for 16-bit tiles: an iteration then makes two visits, each with its own
# cp.async commit.
WALKS = ("ours fwd", "ours dkdv", "ours dq")


def visits_per_iteration(loop, cfg):
    """The cp.async commits in the loop's own blocks (not its inner loops'): its visits."""
    inner = {b for ch in loop.children for b in ch.body}
    return max(1, sum(cfg.counts[b].get("commit", 0) for b in loop.body - inner))


def census_function(fn, demangled, arch, spills=None, listing=None):
    fam, p = family_of(demangled)
    cfg = build_cfg(fn.instrs, fn.labels)
    loops, reachable = natural_loops(cfg)
    work = fam.work if fam else "hmma"
    threads = fn.max_threads or (fam.warps(p) * 32 if fam and fam.warps else None)
    warps = threads // 32 if threads else None
    must = fam.must(p, warps) if fam and fam.must and warps else None
    inner = dict([must] if must else [], **(fam.inner(p, warps) if fam and fam.inner and warps
                                            else {}))
    for lp in loops:  # innermost first (sorted by size), so children are done before parents
        v = visits_per_iteration(lp, cfg) if fam and fam.visits in WALKS else 1
        loop_paths(lp, cfg, work, {k: a * v for k, a in inner.items()},
                   must and (must[0], must[1] * v))
        if v > 1:
            lp.paths = {k: {c: n / v for c, n in path.items()} for k, path in lp.paths.items()}
            lp.notes.append(f"{v} tile visits an iteration (the walk unrolled by stage): "
                            f"counts per visit")
    busy = [lp for lp in loops if lp.paths["full"].get(work, 0) > 0]
    main = max(busy, key=lambda lp: (lp.paths["full"][work], -lp.paths["full"]["total"]),
               default=None)
    everything = {}
    for b in reachable:
        everything = add(everything, cfg.counts[b])
    overhead = overhead_path(cfg, loops, reachable, main)
    local = sum(1 for i in fn.instrs if op_class(i.op) == "local")
    smem = fam.smem(p) if fam and fam.smem else None
    row = dict(key=fam.key(p) if fam else demangled, name=demangled, mangled=fn.name, arch=arch,
               family=fam.visits if fam else None, params=p, work=work, tool=fn.tool,
               regs=fn.regs, threads=threads, warps=warps, smem=smem,
               local_instructions=local, spill_bytes=spills,
               instructions=everything.get("total", 0), default=bool(fam and fam.default(p)))
    if threads:
        row["blocks_per_sm"], row["occupancy_limit"] = blocks_per_sm(fn.regs, threads, smem)

    def summary(lp):
        full = lp.paths["full"]
        out = dict(header=f"{cfg.addr[lp.header]:#x}", depth=lp.depth, blocks=len(lp.body),
                   notes=lp.notes, paths={k: {c: round(v, 2) for c, v in sorted(c_.items())}
                                          for k, c_ in lp.paths.items()})
        if fam and warps:
            s = fam.scores(p, warps)
            out["scores"] = s
            out["per_score"] = round(full["total"] / s, 4)
        if full.get("hmma"):
            out["per_hmma"] = round(full["total"] / full["hmma"], 3)
        out["non_mma"] = round(1 - full.get("hmma", 0) / full["total"], 4)
        return out
    row["main"] = summary(main) if main else None
    if listing and main:
        row["listing"] = route_listing(fn, cfg, main, listing)
    row["loops"] = [summary(lp) for lp in busy]
    row["overhead"] = {c: round(v, 2) for c, v in sorted(overhead.items())}
    return row


def census(objects, arch="sm_90a", pattern=None, everything=False, listing=None):
    """Rows (dicts) of the kernels in `objects` whose key or demangled name matches pattern
    (a regex; None: the families' defaults), sorted by key."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for obj in objects:
            logs = ptxas_log(obj)
            for cubin in extract_cubins(obj, arch, tmp):
                names = [n for n in elf_functions(cubin) if n.startswith("_Z")]
                pretty = demangle(names)
                chosen = []
                for n in names:
                    fam, p = family_of(pretty[n])
                    key = fam.key(p) if fam else pretty[n]
                    if pattern is not None:
                        ok = re.search(pattern, key) or re.search(pattern, pretty[n])
                    else:
                        ok = fam is not None and (everything or fam.default(p))
                    if ok:
                        chosen.append(n)
                for n, fn in disassemble(cubin, chosen).items():
                    if n not in pretty:
                        continue
                    log = logs.get((n, arch))
                    if log and fn.regs is None:
                        fn.regs = log[0]
                    rows.append(census_function(fn, pretty[n], arch,
                                                list(log[1:]) if log else None, listing))
    return sorted(rows, key=lambda r: r["key"])


# ---------------------------------------------------------------- tables
def _fmt(x):
    return "-" if x is None else str(x)


def table(rows, every_loop=False):
    """Markdown: one row per kernel and path of its main loop (every HMMA loop with
    every_loop), counts per warp per iteration."""
    head = ["kernel", "regs", "thr", "blk/SM", "loop", "path", "instr", "HMMA", "per HMMA",
            "scores", "per score", "non-MMA", "LDSM", "LDS", "STS", "LDGSTS", "LDG", "STG",
            "RED/ATOM", "MUFU (EX2)", "FP32", "FFMA", "cvt", "int", "mov", "pred", "SHFL",
            "branch", "barrier", "local", "FP64/other", "NOP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loops = r["loops"] if every_loop else [r["main"]] if r["main"] else []
        if not loops:
            lines.append(f"| {r['key']} | {_fmt(r['regs'])} | {_fmt(r['threads'])} | "
                         f"{_fmt(r.get('blocks_per_sm'))} | (no {r['work']} loop) |"
                         + " |" * (len(head) - 5))
        for lp in loops:
            tag = "main" if lp is r["main"] or lp == r["main"] else ""
            for path in ("full", "partial", "skip"):
                c = lp["paths"][path]
                g = lambda k: c.get(k, 0)
                n = g("total")
                cells = [r["key"], _fmt(r["regs"]), _fmt(r["threads"]),
                         _fmt(r.get("blocks_per_sm")),
                         f"{lp['header']} d{lp['depth']} {tag}".strip(), path, f"{n:.0f}",
                         f"{g('hmma'):.0f}", f"{n / g('hmma'):.2f}" if g("hmma") else "-",
                         _fmt(lp.get("scores")),
                         f"{n / lp['scores']:.3f}" if lp.get("scores") else "-",
                         f"{1 - g('hmma') / n:.0%}" if n else "-"]
                cells += [f"{g(k):.0f}" for k in ("ldsm", "lds", "sts", "ldgsts", "ldg", "stg",
                                                   "atom")]
                cells += [f"{g('mufu'):.0f} ({g('ex2'):.0f})"]
                cells += [f"{g(k):.0f}" for k in ("fp32", "ffma", "cvt", "int", "mov", "pred",
                                                   "shfl", "branch", "barrier", "local")]
                cells += [f"{g('other') + g('fp64'):.0f}", f"{g('nop'):.0f}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows):
    out = []
    for r in rows:
        extra = []
        if r["main"] and r["main"]["notes"]:
            extra += r["main"]["notes"]
        if r["local_instructions"]:
            extra.append(f"{r['local_instructions']} local-memory (spill) instructions")
        if r.get("spill_bytes") and any(r["spill_bytes"]):
            extra.append("ptxas spills {} B stored / {} B loaded".format(*r["spill_bytes"]))
        if r.get("occupancy_limit"):
            extra.append(f"blocks/SM limited by {', '.join(r['occupancy_limit'])}"
                         + (f" (smem {r['smem']} B)" if r["smem"] else " (smem unknown)"))
        extra.append(f"per-block overhead {r['overhead'].get('total', 0):.0f} instructions "
                     f"outside the main loop")
        out.append(f"- {r['key']} ({r['arch']}, {r['name'].split('(')[0]}): " + "; ".join(extra))
    return "\n".join(out)


# ---------------------------------------------------------------- issue-slot model
# H100 SXM defaults (estimate inputs; --sms, --clock-ghz, --mma-flop-per-clk, --hbm-tbps
# override them): SMs, schedulers per SM, clock, IPC (warp-instructions per scheduler per
# cycle: 1 is the issue limit, 0.7 a realistic rate), HBM bandwidth, and the tensor-core
# rate of mma.sync in dense bf16 FLOP per clock per SM: assumed half of wgmma's 4096
# (989.4 TFLOP/s = 132 SMs x 4096 x 1.83 GHz); NVIDIA documents no mma.sync rate for
# Hopper. A check: at 1024 the model would put FlashAttention-2's causal forward at shape
# (a) near 95 TFLOP/s, half the ~180 TFLOP/s reported for it on H100 (seqlen 512, hd 64).
MACHINE = dict(sms=132, schedulers=4, clock_ghz=1.755, ipc=(1.0, 0.7), mma_flop_per_clk=2048,
               hbm_tbps=3.35)
# Decode steps of generation.py's L config (dim 1024 / 16 heads: D = 64; 256 image tokens;
# batch 64 as in its example), chosen here: an AR step (1 query), a late RandAR-88 step (~3
# tokens, doubled by position instructions) and a late SAR-16 step (16 queries, the most
# the decode kernel takes); keys: the cache.
DECODE_SHAPES = {  # name: (batch, heads, queries, keys, head dim)
    "ar-step": (64, 16, 1, 257, 64),
    "randar-88": (64, 16, 6, 513, 64),
    "sar-16": (64, 16, 16, 257, 64),
}


def _ranges(ids, size, unit=None):
    """(min, max) of ids over consecutive groups of `size`, the ids padded (with empty
    groups) to a multiple of `unit` (default: size)."""
    import numpy as np
    n = -(-len(ids) // (unit or size)) * (unit or size)
    lo = np.full(n, np.iinfo(np.int64).max, np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, np.int64)
    lo[:len(ids)], hi[:len(ids)] = ids, ids
    return lo.reshape(-1, size).min(1), hi.reshape(-1, size).max(1)


def _classify(qlo, qhi, klo, khi, strict):
    """mask.h's tile class (0 skip, 1 full, 2 partial), broadcast; empty ranges skip."""
    import numpy as np
    vis = (lambda q, k: k < q) if strict else (lambda q, k: k <= q)
    empty = (qlo > qhi) | (klo > khi)
    kind = np.where(vis(qlo, khi), 1, 2)
    return np.where(empty | ~vis(qhi, klo), 0, kind)


def visits(row, q_sets, k_sets, strict, causal):
    """Warp-visits of the main loop by path, and blocks, for one batch element and head
    (mirrors the kernels' tile walks: ours classify by set-id ranges, FlashAttention-2 is
    causal (lower triangle of its tiles) or dense)."""
    import numpy as np
    p, w, kind = row["params"], row["warps"], row["family"]
    lq, lk = len(q_sets), len(k_sets)
    out = dict(full=0, partial=0, skip=0, blocks=0)
    if kind in ("ours fwd", "ours dq", "ours dkdv"):
        if kind == "ours dkdv":  # rows are keys (16 per warp), columns query tiles
            rows, cols, rb, cb = k_sets, q_sets, p["BN"], p["BM"]
        else:
            rows, cols, rb, cb = q_sets, k_sets, p["BM"], p["BN"]
        splits = p["D"] // p["DC"]
        blo, bhi = _ranges(rows, rb)                 # block rows
        wlo, whi = _ranges(rows, rb // w, rb)        # warp rows
        clo, chi = _ranges(cols, cb)                 # column tiles
        ragged = (np.arange(len(clo)) == len(clo) - 1) & (len(cols) % cb > 0)
        qk = (lambda r, c: (c[0], c[1], r[0], r[1])) if kind == "ours dkdv" else \
             (lambda r, c: (r[0], r[1], c[0], c[1]))
        need = _classify(*qk((blo[:, None], bhi[:, None]), (clo[None], chi[None])), strict) > 0
        wk = _classify(*qk((wlo[:, None], whi[:, None]), (clo[None], chi[None])), strict)
        wk = np.where((wk == 1) & ragged[None], 2, wk).reshape(len(blo), w, len(clo))
        if kind != "ours dkdv":  # the fast path needs a tile every row of the block sees
            bk = _classify(*qk((blo[:, None], bhi[:, None]), (clo[None], chi[None])), strict)
            wk = np.where((wk == 1) & ((bk != 1) | ragged[None])[:, None, :], 2, wk)
        for name, code in (("skip", 0), ("full", 1), ("partial", 2)):
            out[name] = splits * int(((wk == code) & need[:, None, :]).sum())
        out["blocks"] = splits * len(blo)
    elif kind in ("fa2 fwd", "fa2 bwd"):
        bm, bn = p["BM"], p["BN"]
        nm, nn = -(-lq // bm), -(-lk // bn)
        i, j = np.arange(nm)[:, None], np.arange(nn)[None]
        if causal:  # query r sees keys <= r + lk - lq (bottom-right aligned)
            off = lk - lq
            seen = j * bn <= np.minimum((i + 1) * bm - 1 + off, lk - 1)
            full = (j + 1) * bn - 1 <= i * bm + off
        else:
            seen, full = np.ones((nm, nn), bool), np.ones((nm, nn), bool)
        full = full & ((j + 1) * bn <= lk) & ((i + 1) * bm <= lq)
        out["full"] = w * int((seen & full).sum())
        out["partial"] = w * int((seen & ~full).sum())
        out["blocks"] = nn if kind == "fa2 bwd" else nm
    return out


def _decode_split(bh, lq, lk, d, group=1, mma=True):
    """decode_splits() of decode_attention.cuh for bh = batch * kv heads: (number of
    splits, keys per split). mma: the tensor-core kernel's plan (16 rows per block, splits
    a multiple of its 4 warps' key tiles), else the scalar kernel's."""
    rows, unit = (16, 4 * _decode_kw(d)) if mma else (_decode_rows(d), 32)
    blocks = bh * -(-lq * group // rows)
    splits = max(1, min(-(-264 // blocks) if blocks else 1, -(-lk // max(64, unit)), 64))
    per = -(-lk // splits)
    split_len = -(-per // unit) * unit if per > 0 else unit
    return -(-lk // split_len), split_len


def estimate(row, warp_visits, blocks, flops, nbytes, extra_bytes=0, machine=MACHINE):
    """Time (ms) from warp-instructions (visits x path + blocks x warps x overhead), bounded
    below by the tensor-core and HBM times, plus the HBM time of helper kernels that run
    before or after it (extra_bytes). An estimate, not a measurement."""
    lp, m = row["main"], machine
    instr = sum(n * lp["paths"][k].get("total", 0) for k, n in warp_visits.items())
    mma = sum(n * lp["paths"][k].get("mma_flop", 0) for k, n in warp_visits.items())
    instr += blocks * row["warps"] * row["overhead"].get("total", 0)
    mma += blocks * row["warps"] * row["overhead"].get("mma_flop", 0)
    clk = m["clock_ghz"] * 1e9
    tensor = mma / (m["sms"] * m["mma_flop_per_clk"] * clk)
    memory, extra = (x / (m["hbm_tbps"] * 1e12) for x in (nbytes, extra_bytes))
    out = dict(warp_instructions=instr, tensor_ms=tensor * 1e3, memory_ms=(memory + extra) * 1e3)
    for ipc in m["ipc"]:
        issue = instr / (m["sms"] * m["schedulers"] * ipc * clk)
        ms = (max(issue, tensor, memory) + extra) * 1e3
        out[f"ms@ipc{ipc:g}"] = ms
        out[f"tflops@ipc{ipc:g}"] = flops / ms / 1e9
    return out


def training_model(rows, machine=MACHINE):
    """Estimated forward and backward times at every attention_training.py shape (its
    set_ids, seed 0), for our kernels and FlashAttention-2's (causal where the shape is,
    dense otherwise). Forward: the forward kernel. Backward: the dK/dV kernel with atomic
    dQ (the default path), plus the HBM time of the row-wise work around it: prep (ours)
    or dot(dO, O) (FlashAttention-2), the same bytes, and dQ's conversion, FlashAttention-2's
    a kernel that reads the fp32 sums back from HBM, ours done by the last dK/dV block of
    each head, which reads them from L2 (written back to HBM once, as the main kernel's)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import attention_training as bench

    def pick(family, d, want):
        return next((r for r in rows if r["family"] == family and r["params"]["D"] == d
                     and r["default"] and r["main"] and r.get("warps") and want(r["params"])),
                    None)
    out = []
    for name, (layout, tokens, d) in bench.SHAPES.items():
        b, h = bench.BATCH, bench.HEADS
        q_sets, k_sets, strict = bench.set_ids(layout, b, tokens, bench.SETS,
                                               torch.Generator().manual_seed(0))
        q_sets, k_sets = q_sets.numpy(), k_sets.numpy()
        lq, lk = q_sets.shape[1], k_sets.shape[1]
        seen = (k_sets[:, None, :] < q_sets[:, :, None]) if strict else \
               (k_sets[:, None, :] <= q_sets[:, :, None])
        fwd_flops = 4 * h * d * int(seen.sum())
        rows_q, rows_k = b * h * lq, b * h * lk  # bf16 operands, fp32 lse/delta/dQ accum
        fwd_bytes = (rows_q * 2 + rows_k * 2) * d * 2 + rows_q * 4
        bwd_bytes = (rows_q * 2 + rows_k * 4) * d * 2 + rows_q * (8 + 4 * d)
        prep = rows_q * (2 * d * 2 + 8 + 4 * d)  # read O, dO; write delta, lse; zero dQ
        ours, fa2 = prep + rows_q * 2 * d, prep + rows_q * (4 * d + 2 * d)
        cases = (("fwd", pick("ours fwd", d, lambda p: True), fwd_flops, fwd_bytes, 0),
                 ("bwd", pick("ours dkdv", d, lambda p: p["atomic"]), 2.5 * fwd_flops,
                  bwd_bytes, ours),
                 ("fwd", pick("fa2 fwd", d, _fa2_ref), fwd_flops, fwd_bytes, 0),
                 ("bwd", pick("fa2 bwd", d, _fa2_ref), 2.5 * fwd_flops, bwd_bytes, fa2))
        for pas, r, flops, nbytes, extra in cases:
            if r is None:
                continue
            tot, blocks = dict(full=0, partial=0, skip=0), 0
            for i in range(b):  # set ids differ per batch element, not per head
                v = visits(r, q_sets[i], k_sets[i], strict, layout == "causal")
                tot = {k: tot[k] + v[k] * h for k in tot}
                blocks += v["blocks"] * h
            est = estimate(r, tot, blocks, flops, nbytes, extra, machine)
            out.append(dict(shape=name, label=f"{name} B{b} H{h} Lq{lq} Lk{lk} D{d}", pass_=pas,
                            kernel=r["key"], visits=tot, blocks=blocks, **est))
    return out


def decode_model(rows, machine=MACHINE):
    """Estimated split-KV kernel times at DECODE_SHAPES, every cached key visible. Ours
    (decode_splits()' plan for the tensor-core kernel): every key tile of every split one
    warp visit (the warps of a block split the keys). FlashAttention-
    2's split-KV kernel (one split: B*H blocks fill the GPU): 64-row blocks, every warp the
    full path (the ragged last key tile partial). The split-combine kernels are left out."""
    out = []
    for name, (b, h, lq, lk, d) in DECODE_SHAPES.items():
        flops, nbytes = 4 * b * h * lq * lk * d, b * h * (2 * lk + 2 * lq) * d * 2
        for r in rows:
            if not (r["main"] and r["params"]["D"] == d and r.get("warps")):
                continue
            p, w = r["params"], r["warps"]
            if r["family"] == "ours decode" and r["default"]:
                # 16 rows per block; each key tile of KW keys of a split is one warp's visit
                # (the full path; the ragged last tile of the cache the partial one).
                kw = _decode_kw(d)
                splits, split_len = _decode_split(b * h, lq, lk, d)
                chunks = -(-lq // 16)
                blocks = b * h * chunks * splits
                tiles = b * h * chunks * -(-lk // kw)
                ragged = b * h * chunks * (lk % kw > 0)
                v = dict(full=tiles - ragged, partial=ragged)
            elif r["family"] == "fa2 splitkv" and p["T"] == "bf16" and p["even_k"] \
                    and not (p["split"] or p["even_mn"] or p["append_kv"]):  # what decode runs
                blocks = b * h * -(-lq // p["BM"])
                ragged = lk % p["BN"] > 0
                v = dict(full=blocks * w * (-(-lk // p["BN"]) - ragged),
                         partial=blocks * w * ragged)
            else:
                continue
            est = estimate(r, v, blocks, flops, nbytes, 0, machine)
            out.append(dict(shape=name, label=f"{name} B{b} H{h} Lq{lq} Lk{lk} D{d}",
                            pass_="decode", kernel=r["key"], visits=v, blocks=blocks, **est))
    return out


def model_table(est, machine=MACHINE):
    ipcs = machine["ipc"]
    head = ["shape", "pass", "kernel", "warp-instr (M)", "tensor ms", "HBM ms"]
    head += [f"ms @IPC {i:g}" for i in ipcs] + [f"TFLOP/s @IPC {i:g}" for i in ipcs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in est:
        cells = [e["label"], e["pass_"], e["kernel"], f"{e['warp_instructions'] / 1e6:.1f}",
                 f"{e['tensor_ms']:.3f}", f"{e['memory_ms']:.3f}"]
        cells += [f"{e[f'ms@ipc{i:g}']:.3f}" for i in ipcs]
        cells += [f"{e[f'tflops@ipc{i:g}']:.0f}" for i in ipcs]
        lines.append("| " + " | ".join(cells) + " |")
    m = machine
    lines.append(
        f"\nEstimates, not measurements: warp-instructions / ({m['sms']} SMs x "
        f"{m['schedulers']} schedulers x IPC x {m['clock_ghz']} GHz), at least the tensor-core "
        f"time (mma.sync at {m['mma_flop_per_clk']} bf16 FLOP/clk/SM, assumed) and the HBM "
        f"time (each operand once at {m['hbm_tbps']} TB/s). TFLOP/s on visible pairs (forward "
        "4*pairs*D*H*B, backward 2.5x). Ours: tiles by set-id ranges as the kernels classify "
        "them; FlashAttention-2: causal lower triangle or dense, every warp every tile. "
        "Per-iteration counts as in the census (partial tiles at the partial path, an upper "
        "bound); the per-block overhead once per warp; backward adds the HBM time of the "
        "row-wise work: prep and dQ's conversion (FlashAttention-2's reads the fp32 dQ sums "
        "from HBM, ours from L2, in the last dK/dV block of each head). Not modelled: "
        "occupancy, latency, wave quantisation, L2 otherwise.")
    return "\n".join(lines)


# ---------------------------------------------------------------- budgets
def check_budgets(rows, budgets):
    """Failures (strings) of rows against a budget file's kernels: missing, per-score count
    above budget x (1 + margin), or any local-memory instruction."""
    margin = budgets.get("margin", 0.02)
    by_key = {r["key"]: r for r in rows}
    fails = []
    for key, b in budgets["kernels"].items():
        r = by_key.get(key)
        if r is None or r["main"] is None:
            fails.append(f"{key}: kernel (or its main loop) not found")
            continue
        got, cap = r["main"]["per_score"], b["per_score"] * (1 + margin)
        if got > cap:
            fails.append(f"{key}: {got:.4f} instructions per score > budget {b['per_score']:.4f}"
                         f" (+{margin:.0%}); full path {r['main']['paths']['full']['total']:.0f}"
                         f" instructions, {r['main']['scores']} scores (was {b['instructions']})")
        if r["local_instructions"]:
            fails.append(f"{key}: {r['local_instructions']} local-memory (spill) instructions")
    return fails


def budget_file(rows, nvcc, margin=0.02):
    return {"nvcc": nvcc, "margin": margin, "arch": rows[0]["arch"] if rows else None,
            "kernels": {r["key"]: {"per_score": r["main"]["per_score"],
                                   "instructions": round(r["main"]["paths"]["full"]["total"]),
                                   "hmma": round(r["main"]["paths"]["full"].get("hmma", 0)),
                                   "scores": r["main"]["scores"]}
                        for r in rows if r["main"] and r["main"].get("per_score")}}


# ---------------------------------------------------------------- FlashAttention-2 build
FA2_FILES = ("flash_fwd_hdim64_bf16_sm80", "flash_fwd_hdim128_bf16_sm80",
             "flash_bwd_hdim64_bf16_sm80", "flash_fwd_split_hdim64_bf16_sm80")


def build_fa2(src, out, jobs=2):
    """Compiles FA2_FILES of an unpacked flash-attn sdist with its own nvcc flags (setup.py)
    for sm_90a only, ptxas -v logs beside the objects. Returns the objects."""
    import torch.utils.cpp_extension as ext
    nvcc = find_tool("nvcc")
    os.makedirs(os.path.join(out, "stub", "c10", "cuda", "impl"), exist_ok=True)
    # the CPU torch wheel has the c10 CUDA headers but not this generated one
    with open(os.path.join(out, "stub", "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w") as f:
        f.write("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    fa = os.path.join(src, "csrc", "flash_attn")
    flags = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
             # these only cut instantiations (the reference rows are unaffected)
             "-DFLASHATTENTION_DISABLE_DROPOUT", "-DFLASHATTENTION_DISABLE_ALIBI",
             "-DFLASHATTENTION_DISABLE_SOFTCAP", "-DFLASHATTENTION_DISABLE_UNEVEN_K",
             "-DFLASHATTENTION_DISABLE_LOCAL",
             f"-I{fa}", f"-I{fa}/src", f"-I{src}/csrc/cutlass/include", f"-I{out}/stub",
             "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas=-v"]
    for d in ext.include_paths():
        flags += ["-isystem", d]
    objs, procs = [], []
    for name in FA2_FILES:
        obj = os.path.join(out, name + ".o")
        objs.append(obj)
        if os.path.exists(obj) and os.path.getmtime(obj) > os.path.getmtime(
                os.path.join(fa, "src", name + ".cu")):
            continue
        while sum(p.poll() is None for p in procs) >= jobs:
            time.sleep(1)
        print(f"nvcc {name}.cu (sm_90a)", flush=True)
        log = open(os.path.join(out, name + ".ptxas.log"), "w")
        procs.append(subprocess.Popen([nvcc, "-c", os.path.join(fa, "src", name + ".cu"),
                                       "-o", obj] + flags, stdout=log, stderr=log))
    for p in procs:
        if p.wait():
            raise SystemExit(f"nvcc failed: see the .ptxas.log files in {out}")
    return objs


# ---------------------------------------------------------------- CLI
def default_objects():
    d = os.environ.get("SASS_CENSUS_OBJDIR", DEFAULT_OBJDIR)
    return sorted(glob.glob(os.path.join(d, "*.o")) + glob.glob(os.path.join(d, "*.cubin")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("objects", nargs="*", help="CUDA objects / cubins, or folders of them "
                    "(default: $SASS_CENSUS_OBJDIR or build/cuda-check/cuda_check)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--kernels", help="regex on the short key ('fwd bf16 D64') or the "
                    "demangled name (default: the bf16 D=64/128 kernels)")
    ap.add_argument("--all", action="store_true", help="every loop that does work, not only "
                    "the main loop")
    ap.add_argument("--listing", choices=tuple(OBJECTIVES), help="print the SASS of each "
                    "kernel's main loop along this path")
    ap.add_argument("--json", help="write the census (and model) as JSON here ('-': stdout)")
    ap.add_argument("--model", action="store_true", help="issue-slot estimates at the "
                    "benchmark shapes (needs torch and the built sarkernels)")
    ap.add_argument("--fa2", help="FlashAttention-2 census JSON to compare with (e.g. "
                    "benchmarks/census_fa2.json)")
    ap.add_argument("--budget-check", metavar="FILE")
    ap.add_argument("--write-budgets", metavar="FILE")
    ap.add_argument("--build-fa2", metavar="SDIST_DIR", help="compile FlashAttention-2's "
                    "kernels from an unpacked flash-attn sdist into --fa2-out and count them")
    ap.add_argument("--fa2-out", default=os.path.join(ROOT, "build", "census-fa2"))
    for k in ("sms", "clock_ghz", "mma_flop_per_clk", "hbm_tbps"):
        ap.add_argument("--" + k.replace("_", "-"), type=float, default=MACHINE[k])
    a = ap.parse_args(argv)
    machine = dict(MACHINE, **{k: getattr(a, k) for k in ("sms", "clock_ghz",
                                                           "mma_flop_per_clk", "hbm_tbps")})

    objects = []
    if a.build_fa2:
        objects = build_fa2(a.build_fa2, a.fa2_out, int(os.environ.get("MAX_JOBS", 2)))
    for o in a.objects:
        objects += sorted(glob.glob(os.path.join(o, "*.o"))) if os.path.isdir(o) else [o]
    objects = objects or default_objects()
    if not objects:
        raise SystemExit("no objects: run `make cuda-check` or pass some")
    pattern = a.kernels
    if a.budget_check and pattern is None:
        pattern = "^(" + "|".join(re.escape(k) for k in
                                  json.load(open(a.budget_check))["kernels"]) + ")$"
    rows = census(objects, a.arch, pattern, everything=a.all and pattern is None,
                  listing=a.listing)
    result = {"arch": a.arch, "tool": rows[0]["tool"] if rows else None,
              "date": time.strftime("%Y-%m-%d"),
              "objects": [os.path.relpath(o, ROOT) for o in objects], "kernels": rows}

    if a.budget_check:
        budgets = json.load(open(a.budget_check))
        have = nvcc_version()
        if budgets.get("nvcc") not in (have, None) or (rows and rows[0]["tool"] != budgets["nvcc"]):
            print(f"budgets are for nvcc {budgets.get('nvcc')}; nvcc here {have}, objects by "
                  f"ptxas {rows[0]['tool'] if rows else None}: not checked")
            return 0
        fails = check_budgets(rows, budgets)
        print(table(rows))
        print("\n".join(["", "budget check: " + ("FAILED" if fails else "ok")] + fails))
        return 1 if fails else 0
    if a.write_budgets:
        with open(a.write_budgets, "w") as f:
            json.dump(budget_file(rows, rows[0]["tool"] if rows else nvcc_version()), f, indent=1)
            f.write("\n")
        print(f"wrote {len(rows)} budgets to {a.write_budgets}")

    print(f"## Instruction census ({a.arch}, SASS of ptxas {result['tool']}; per warp, one "
          "main-loop iteration; static counts)\n")
    # FlashAttention-2's recorded rows: shown as the kernels asked for (default: its
    # reference rows); all of them available to the model (decode runs its uneven ones)
    fa2 = json.load(open(a.fa2))["kernels"] if a.fa2 and os.path.exists(a.fa2) else []
    fa2 = [r for r in fa2 if r["key"] not in {x["key"] for x in rows}]
    shown = [r for r in fa2 if (re.search(a.kernels, r["key"]) if a.kernels else r["default"])]
    print(table(rows + shown, a.all))
    print("\nPer warp, one iteration of the loop (header address, nesting depth d): full = the "
          "most work, fewest instructions; partial = the most work, most instructions (an upper "
          "bound: every optional branch taken); skip = fewest instructions; each path issues "
          "the loads of one steady-state iteration. NOPs are not in instr (NOP column). "
          "blk/SM: H100 limits.\n")
    print(notes(rows + shown))
    for r in rows:
        if "listing" in r:
            print(f"\n### {r['key']}: main loop, {a.listing} path\n{r.pop('listing')}")
    if a.model:
        result["model"] = dict(machine=machine, training=training_model(rows + fa2, machine),
                               decode=decode_model(rows + fa2, machine))
        print("\n## Issue-slot model (estimates)\n")
        print(model_table(result["model"]["training"] + result["model"]["decode"], machine))
    if a.json:
        text = json.dumps(result, indent=1, default=str)
        if a.json == "-":
            print(text)
        else:
            open(a.json, "w").write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
