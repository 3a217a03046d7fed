
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sarkernels
from sarkernels import reference
from sarkernels.rope import CLASS_TOKEN, rope_angles
from conftest import NAMESPACES, assert_within


def llamagen_rope_2d(x, cells, grid_w, base=10000.0):
    """LlamaGen's own recipe (precompute_freqs_cis_2d + apply_rotary_emb), written out
    independently of sarkernels.rope: x [B, L, H, hd], cells [L]."""
    hd = x.shape[-1]
    half = hd // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].double() / half))
    r, c = cells // grid_w, cells % grid_w
    angles = torch.cat([torch.outer(r.double(), freqs), torch.outer(c.double(), freqs)], -1)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    xs = x.double().reshape(*x.shape[:-1], -1, 2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(3)


def test_rope_2d_matches_llamagen_convention():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 16, generator=gen, dtype=torch.float64)  # [B, L, H, hd]
    cells = torch.randperm(20, generator=gen)[:12]
    got = sarkernels.rope_2d(x.transpose(1, 2), cells.expand(2, 12), (4, 5)).transpose(1, 2)
    torch.testing.assert_close(got, llamagen_rope_2d(x, cells, 5))


def test_rope_2d_class_token_is_zeroed_and_cell_0_is_identity():
    x = torch.randn(1, 2, 3, 8)
    pos = torch.tensor([[CLASS_TOKEN, 0, 5]])
    y = sarkernels.rope_2d(x, pos, 4)
    assert torch.equal(y[:, :, 0], torch.zeros_like(y[:, :, 0]))
    torch.testing.assert_close(y[:, :, 1], x[:, :, 1])
    assert y.dtype == x.dtype


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 3))
    grid = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    n = draw(st.integers(0, grid[0] * grid[1]))
    return dict(b=draw(st.integers(1, 3)), n=n, heads=heads,
                d=heads * draw(st.sampled_from([4, 8, 16])), grid=grid,
                prefix=draw(st.integers(0, 3)), merge=draw(st.booleans()),
                table=draw(st.booleans()), strided=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31)))


def build(c, dtype=torch.float64):
    gen = torch.Generator().manual_seed(c["seed"])
    cells = c["grid"][0] * c["grid"][1]
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    tokens = rnd(c["b"], c["d"], c["n"]).transpose(1, 2) if c["strided"] else rnd(c["b"], c["n"], c["d"])
    positions = torch.stack([torch.randperm(cells, generator=gen)[:c["n"]] for _ in range(c["b"])])
    instruction = rnd(cells + 2, c["d"]) if c["table"] else rnd(c["d"])
    prefix = rnd(c["b"], c["prefix"], c["d"]) if c["prefix"] or not c["merge"] else rnd(c["b"], 1, c["d"])
    kw = dict(num_heads=c["heads"], grid_size=c["grid"], prefix=prefix, merge=c["merge"])
    return tokens, positions, instruction, kw


def run_reference(tokens, positions, instruction, kw):
    return reference.interleave_position_instructions(
        tokens, positions, instruction, kw["num_heads"], kw["grid_size"], 10000.0, kw["prefix"],
        kw["merge"])


@given(cases())
def test_matches_reference_with_gradients(backend, c):
    tokens, positions, instruction, kw = build(c)
    leaves = (tokens, instruction, kw["prefix"])
    for t in leaves:
        t.requires_grad_()
    out = sarkernels.interleave_position_instructions(tokens, positions, instruction, **kw)
    want = run_reference(tokens, positions, instruction, kw)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), leaves, allow_unused=True)
    ref = torch.autograd.grad((want * g).sum(), leaves, allow_unused=True)
    for name, a, r in zip(("tokens", "instruction", "prefix"), got, ref):
        a = torch.zeros_like(r) if a is None and r is not None else a
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@given(c=cases())
def test_low_precision(backend, dtype, c):
    tokens, positions, instruction, kw = build(c)
    exact = run_reference(tokens, positions, instruction, kw)
    low = [t.to(dtype) for t in (tokens, instruction, kw["prefix"])]
    kw_low = dict(kw, prefix=low[2])
    out = sarkernels.interleave_position_instructions(low[0], positions, low[1], **kw_low)
    assert out.dtype == dtype
    assert_within(out, exact.to(dtype), exact, dtype, "interleave")


def test_layouts_by_hand(backend):
    tok = torch.arange(6.0).view(1, 2, 3)
    table = 100 + torch.arange(12.0).view(4, 3)
    pos = torch.tensor([[2, 0]])
    pre = -torch.ones(1, 1, 3)
    out = sarkernels.interleave_position_instructions(tok, pos, table, prefix=pre)
    assert out[0].tolist() == [[-1, -1, -1], [106, 107, 108], [0, 1, 2], [100, 101, 102], [3, 4, 5]]
    merged = sarkernels.interleave_position_instructions(tok, pos, table, prefix=pre, merge=True)
    assert merged[0].tolist() == [[105, 106, 107], [100, 102, 104], [3, 4, 5]]


def test_shared_vector_is_rope_of_the_cell(backend):
    # RandAR: the instruction for cell (r, c) is pos_instruct_embeddings rotated per head.
    vec = torch.randn(16, dtype=torch.float64)
    tok = torch.randn(1, 3, 16, dtype=torch.float64)
    pos = torch.tensor([[5, 0, 15]])
    out = sarkernels.interleave_position_instructions(tok, pos, vec, num_heads=2, grid_size=4)
    want = llamagen_rope_2d(vec.view(1, 1, 2, 8).expand(1, 3, 2, 8), pos[0], 4).flatten(2)
    torch.testing.assert_close(out[:, 0::2], want)
    torch.testing.assert_close(out[:, 1::2], tok)


@pytest.mark.parametrize("ns", NAMESPACES)
def test_opcheck_and_gradcheck(ns):
    gen = torch.Generator().manual_seed(1)
    tok = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(2)])
    vec = torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True)
    table = torch.randn(12, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    pre = torch.randn(2, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    op = getattr(torch.ops, ns).interleave_position_instructions.default
    backend = "simt" if ns == "sarkernels_simt" else "kernels"
    for ins, heads in ((vec, 2), (table, 0)):
        for merge in (False, True):
            torch.library.opcheck(op, (tok, pos, ins, pre, heads, 3, 4, 10000.0, merge, True))
            f = lambda t, i, p: sarkernels.interleave_position_instructions(
                t, pos, i, num_heads=2, grid_size=(3, 4), prefix=p, merge=merge)
            with sarkernels.use_backend(backend):
                assert torch.autograd.gradcheck(f, (tok, ins, pre))
    torch.library.opcheck(op, (tok, pos, table, None, 0, 0, 0, 10000.0, False, False))


@pytest.mark.parametrize("pos", [[[0, 12]], [[-1, 2]]])
def test_positions_outside_grid(backend, pos):
    tok = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match=r"positions\[0, \d\] = -?\d+ is outside \[0, 12\)"):
        sarkernels.interleave_position_instructions(tok, torch.tensor(pos), torch.randn(8),
                                                    num_heads=1, grid_size=(3, 4))
    with pytest.raises(ValueError, match=r"is outside \[0, 12\)"):
        sarkernels.interleave_position_instructions(tok, torch.tensor(pos), torch.randn(12, 8))


@pytest.mark.parametrize("pos", [[[0, 12]], [[-2, 2]], [[3, 2**40]]])
def test_rope_2d_rejects_what_interleave_rejects(backend, pos):
    pos = torch.tensor(pos)
    with pytest.raises(ValueError, match=r"rope_2d: positions\[0, \d\] = -?\d+ is outside "
                                         r"\[0, 12\) and is not CLASS_TOKEN \(-1\)"):
        sarkernels.rope_2d(torch.randn(1, 1, 2, 8), pos, (3, 4))
    with pytest.raises(ValueError, match=r"interleave_position_instructions: positions\[0, \d\] "
                                         r"= -?\d+ is outside \[0, 12\)"):
        sarkernels.interleave_position_instructions(torch.randn(1, 2, 8), pos, torch.randn(8),
                                                    num_heads=1, grid_size=(3, 4))


@pytest.mark.parametrize("change,match,error", [
    (dict(positions=torch.tensor([[0.0, 1.5]])), "positions must be an integer tensor", TypeError),
    (dict(grid_size=(0, 4)), "grid_size must be", ValueError),
    (dict(grid_size=2.5), "grid_size must be", ValueError),
    (dict(grid_size=True), "grid_size must be", ValueError),
    (dict(positions=torch.tensor([[0, 1]], dtype=torch.uint64)),
     "positions must be an integer tensor of a dtype other than uint64", TypeError),
    (dict(x=torch.ones(1, 1, 2, 8, dtype=torch.int64)),
     "rope_2d: x must be float32/float64/float16/bfloat16, got torch.int64", TypeError),
    (dict(x=torch.ones(1, 1, 2, 8, dtype=torch.bool)), "x must be float32.*got torch.bool", TypeError),
    (dict(x=torch.ones(1, 1, 2, 8, dtype=torch.complex64)), "x must be float32.*got torch.complex64",
     TypeError),
    (dict(base=0), "rope_2d: base must be > 0 and finite, got 0.0", ValueError),
    (dict(check="no"), "rope_2d: check must be a bool", TypeError)])
def test_rope_2d_bad_input_names_the_argument(change, match, error):
    args = dict(x=torch.randn(1, 1, 2, 8), positions=torch.tensor([[0, 1]]), grid_size=(3, 4))
    args.update(change)
    with pytest.raises(error, match=match):
        sarkernels.rope_2d(**args)


@pytest.mark.parametrize("kw,error,match", [
    (dict(head_dim=0), ValueError, "head_dim must be an int >= 1, got 0"),
    (dict(head_dim=8.0), TypeError, "head_dim must be an int, got float 8.0"),
    (dict(ntk_boundary=1.5), TypeError, "ntk_boundary must be an int, got float 1.5"),
    (dict(ntk_boundary=-1), ValueError, "ntk_boundary must be an int >= 0, got -1"),
    (dict(scale=True), TypeError, "scale must be an int, got bool True"),
    (dict(base=float("nan")), ValueError, "base must be > 0 and finite, got nan")])
def test_rope_angles_bad_input_names_the_argument(kw, error, match):
    with pytest.raises(error, match=f"rope_angles: {match}"):
        rope_angles(**{"grid_size": 3, "head_dim": 8, **kw})


INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
                torch.uint32]


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=str)
def test_every_integer_position_dtype(backend, dtype):
    tok, pos = torch.randn(1, 3, 8, dtype=torch.float64), torch.tensor([[11, 0, 5]])
    vec, table = torch.randn(8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    for ins, kw in ((vec, dict(num_heads=2, grid_size=(3, 4))), (table, {})):
        want = sarkernels.interleave_position_instructions(tok, pos, ins, **kw)
        got = sarkernels.interleave_position_instructions(tok, pos.to(dtype), ins, **kw)
        assert torch.equal(got, want)
    assert torch.equal(sarkernels.rope_2d(x, pos.to(dtype), (3, 4)), sarkernels.rope_2d(x, pos, (3, 4)))


def good():
    return dict(tokens=torch.randn(2, 3, 8), positions=torch.tensor([[0, 1, 2], [3, 4, 5]]),
                instruction=torch.randn(8), num_heads=2, grid_size=(3, 4))


BAD = [
    (lambda a: dict(tokens=a["tokens"][0]), "tokens must be 3-D"),
    (lambda a: dict(positions=a["positions"][:, :2]), r"positions must be \[B, N\]"),
    (lambda a: dict(positions=a["positions"].float()), "positions must be an integer"),
    (lambda a: dict(instruction=torch.randn(7)), r"vector instruction must be \[D=8\]"),
    (lambda a: dict(instruction=torch.randn(12, 5)), r"table instruction must be \[P, D=8\]"),
    (lambda a: dict(instruction=torch.randn(2, 2, 8)), "table \\[P, D\\] or a vector"),
    (lambda a: dict(instruction=a["instruction"].double()), "instruction must have dtype"),
    (lambda a: dict(num_heads=3), "num_heads=3"),
    (lambda a: dict(grid_size=None), "needs num_heads and grid_size"),
    (lambda a: dict(grid_size=(0, 4)), "grid_size must be"),
    (lambda a: dict(prefix=torch.randn(2, 1, 5)), r"prefix must be \[B=2, C, D=8\]"),
    (lambda a: dict(merge=True), "merge=True .* needs a\\s+prefix"),
    (lambda a: dict(positions=a["positions"].to("meta")), "positions is on meta"),
    (lambda a: dict(positions=a["positions"].to(torch.uint64)),
     "positions must be an integer tensor of a dtype other than uint64.*got torch.uint64"),
    (lambda a: dict(grid_size=True), "grid_size must be an int or .*got True"),
    (lambda a: dict(grid_size=(3, True)), "grid_size must be an int or .*got \\(3, True\\)"),
    (lambda a: dict(num_heads=True), "num_heads must be an int, got bool True"),
    (lambda a: dict(rope_base=0), "rope_base must be > 0 and finite, got 0.0"),
    (lambda a: dict(rope_base=-1), "rope_base must be > 0 and finite, got -1.0"),
    (lambda a: dict(rope_base=float("nan")), "rope_base must be > 0 and finite, got nan"),
    (lambda a: dict(rope_base=float("inf")), "rope_base must be > 0 and finite, got inf"),
    (lambda a: dict(rope_base="1e4"), "rope_base must be a real number, got str '1e4'"),
    (lambda a: dict(merge="no"), "merge must be a bool .*got str 'no'"),
    (lambda a: dict(check=0), "check must be a bool .*got int 0"),
]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_input_names_the_argument(change, match):
    args = good()
    args.update(change(args))
    with pytest.raises((ValueError, TypeError), match=match):
        sarkernels.interleave_position_instructions(**args)
