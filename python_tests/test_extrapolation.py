"""RandAR resolution extrapolation: the hierarchical order, the NTK-style RoPE mix through
the public ops (every backend), the generation (cache == recompute, the prefix layout, the
three-branch guidance) and the command line."""
import pytest
import torch

import sarkernels
from sarkernels import orders
from sarkernels.models import RandARTransformer
from sarkernels.rope import rope_angles, rotate_instruction
from conftest import HAS_SIMT

GRID, HEADS, DIM = 4, 4, 64


def toy(seed=0):
    torch.manual_seed(seed)
    m = RandARTransformer(vocab_size=17, num_classes=10, grid_size=GRID, dim=DIM, n_head=HEADS,
                          n_layer=2, multiple_of=32)
    for p in m.parameters():  # far from uniform predictions, so sampling is not trivial
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


@pytest.mark.parametrize("grid,scale", [(4, 2), (3, 3), (8, 2)])
def test_hierarchical_order_puts_the_shuffled_lattice_first(grid, scale):
    side, n = scale * grid, grid * grid
    lattice = orders.lattice_cells(grid, scale)
    r, c = lattice // side, lattice % side
    assert torch.equal(r, torch.arange(grid).repeat_interleave(grid) * scale)
    assert torch.equal(c, torch.arange(grid).repeat(grid) * scale)
    order = orders.hierarchical_order(3, grid, scale, torch.Generator().manual_seed(0))
    assert order.shape == (3, side * side)
    assert torch.equal(order.sort(-1).values, torch.arange(side * side).expand(3, -1))
    on_lattice = (order // side % scale == 0) & (order % side % scale == 0)
    assert on_lattice[:, :n].all() and not on_lattice[:, n:].any()
    assert not torch.equal(order[0], order[1])  # a fresh shuffle per sample
    assert not torch.equal(order[0, :n], order[0, :n].sort().values)


def direct_angles(grid, scale, head_dim, boundary, base=10000.0):
    """The NTK mix written out cell by cell in float64."""
    side, quarter = scale * grid, head_dim // 4
    out = torch.empty(side * side, head_dim // 2, dtype=torch.float64)
    for cell in range(side * side):
        for axis, p in enumerate((cell // side, cell % side)):
            for k in range(quarter):
                pos = p if k < boundary else p * (grid - 1) / (side - 1)
                out[cell, axis * quarter + k] = pos * base ** (-4 * k / head_dim)
    return out


@pytest.mark.parametrize("grid,scale,boundary", [(4, 2, 2), (3, 3, 1), (2, 2, 0)])
def test_rope_mix_integer_below_the_boundary_interpolated_above(grid, scale, boundary):
    head_dim, quarter, side = 16, 4, scale * grid
    angles = rope_angles(grid, head_dim, scale=scale, ntk_boundary=boundary)
    torch.testing.assert_close(angles, direct_angles(grid, scale, head_dim, boundary),
                               rtol=1e-12, atol=1e-12)
    freqs = 10000.0 ** (-4 * torch.arange(quarter, dtype=torch.float64) / head_dim)
    positions = angles.view(side, side, 2, quarter) / freqs
    rows = positions[:, 0, 0]  # [side, quarter]: the row position per frequency
    torch.testing.assert_close(rows[:, :boundary], torch.arange(side, dtype=torch.float64)
                               [:, None].expand(-1, boundary), rtol=1e-12, atol=1e-12)
    if boundary < quarter:
        assert rows[:, boundary:].max() <= grid - 1 + 1e-9  # inside the trained range
        assert ((rows[:, boundary:] - rows[:, boundary:].round()).abs() > 0.1).any()


def test_rope_2d_with_the_trained_table_equals_the_grid_path():
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    pos = torch.tensor([[-1, 0, 7, 15, 3], [2, 9, -1, 4, 12]])
    want = sarkernels.rope_2d(x, pos, 4)
    assert torch.equal(sarkernels.rope_2d(x, pos, angles=rope_angles(4, 16)), want)


def rotate_direct(vec, angles, heads):
    """vec [D] rotated per head by angle rows [L, D/heads/2], in float64: [L, D]."""
    pairs = vec.double().view(heads, -1, 2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                       pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(1)


def test_rope_2d_takes_fractional_angles():
    angles = rope_angles(3, 8, scale=2, ntk_boundary=1)
    x = torch.randn(1, 2, 36, 8, dtype=torch.float64)
    pos = torch.randperm(36)[None]
    got = sarkernels.rope_2d(x, pos, angles=angles)
    want = torch.stack([rotate_direct(x[0, h, i], angles[pos[0, i]][None], 1)[0]
                        for h in range(2) for i in range(36)]).view(1, 2, 36, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_interleave_takes_fractional_angles_on_every_backend(backend):
    heads, d, n = 2, 8, 6
    angles = rope_angles(3, d // heads, scale=2, ntk_boundary=1)
    tokens = torch.randn(2, n, d, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(d, dtype=torch.float64, requires_grad=True)
    prefix = torch.randn(2, 1, d, dtype=torch.float64)
    pos = torch.stack([torch.randperm(36)[:n] for _ in range(2)])
    got = sarkernels.interleave_position_instructions(tokens, pos, vec, num_heads=heads,
                                                      prefix=prefix, rope_angles=angles)
    assert torch.equal(got[:, 0], prefix[:, 0]) and torch.equal(got[:, 2::2], tokens)
    for b in range(2):
        torch.testing.assert_close(got[b, 1::2], rotate_direct(vec, angles[pos[b]], heads),
                                   rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda t, v: sarkernels.interleave_position_instructions(
            t, pos, v, num_heads=heads, rope_angles=angles), (tokens, vec))


@pytest.mark.parametrize("kw,match", [
    (dict(grid_size=3), "pass num_heads and no grid_size"),
    (dict(num_heads=None), "pass num_heads and no grid_size"),
    (dict(rope_angles=torch.zeros(36, 3, dtype=torch.float64)),
     r"rope_angles must be \[P, head_dim / 2 = 4\]"),
    (dict(positions=torch.tensor([[0, 36]])), r"positions\[0, 1\] = 36 is outside \[0, 36\)"),
])
def test_interleave_angle_table_mistakes(kw, match):
    args = dict(tokens=torch.randn(1, 2, 16, dtype=torch.float64),
                positions=torch.tensor([[0, 35]]), instruction=torch.randn(16, dtype=torch.float64),
                num_heads=2, rope_angles=rope_angles(3, 8, scale=2))
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sarkernels.interleave_position_instructions(**args)


def test_rope_2d_angle_table_mistakes():
    x, pos = torch.randn(1, 1, 2, 8), torch.tensor([[0, 36]])
    with pytest.raises(ValueError, match=r"rope_2d: positions\[0, 1\] = 36 is outside \[0, 36\)"):
        sarkernels.rope_2d(x, pos, angles=rope_angles(3, 8, scale=2))
    with pytest.raises(ValueError, match="exactly one of grid_size and angles"):
        sarkernels.rope_2d(x, pos, 6, angles=rope_angles(3, 8, scale=2))
    with pytest.raises(ValueError, match="outside"):  # the implicit path still rejects it
        sarkernels.rope_2d(x, pos, 6)


def extrapolate(m, cache, seed=3, **kw):
    logits = []
    tokens = m.generate_extrapolated(torch.tensor([1, 7]), use_kv_cache=cache,
                                     generator=torch.Generator().manual_seed(seed),
                                     on_step=lambda s, l, c: logits.append(l), **kw)
    return tokens, logits


CACHE_CASES = [dict(steps=12), dict(steps=5, scale=3, ntk_boundary=1, top_k=5)]


def check_cache_equals_recompute(kw):
    m = toy()
    cached, cached_logits = extrapolate(m, True, **kw)
    fresh, fresh_logits = extrapolate(m, False, **kw)
    side = kw.get("scale", 2) * GRID
    assert cached.shape == (2, side * side)
    assert torch.equal(cached, fresh)
    assert len(cached_logits) == len(fresh_logits) == kw["steps"]
    for a, b in zip(cached_logits, fresh_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", CACHE_CASES)
def test_extrapolation_cache_equals_recompute(kw):
    check_cache_equals_recompute(kw)


@pytest.mark.skipif(not HAS_SIMT, reason="_simt not built")
def test_extrapolation_cache_equals_recompute_on_simt():
    with sarkernels.use_backend("simt"):
        check_cache_equals_recompute(dict(steps=4, ntk_boundary=1))


def test_stage_one_gives_the_lattice():
    m = toy()
    low = m.generate(torch.tensor([1, 7]), cfg_scale=3.0,
                     generator=torch.Generator().manual_seed(5))
    sizes = []
    big = m.generate_extrapolated(torch.tensor([1, 7]), generator=torch.Generator().manual_seed(5),
                                  on_step=lambda s, l, c: sizes.append(c.shape[1]))
    assert torch.equal(big.view(2, 8, 8)[:, ::2, ::2].flatten(1), low)
    assert sizes == [1] * (64 - 16)  # by default one token per step
    given = torch.randint(17, (2, 16))
    big = m.generate_extrapolated(torch.tensor([1, 7]), low_res=given, steps=4)
    assert torch.equal(big.view(2, 8, 8)[:, ::2, ::2].flatten(1), given)


def first_logits(m, low, seed=0, **kw):
    logits = []
    m.generate_extrapolated(torch.tensor([1, 7]), low_res=low, steps=3,
                            generator=torch.Generator().manual_seed(seed),
                            on_step=lambda s, l, c: logits.append((l, c)), **kw)
    return logits[0]


def test_three_branch_guidance_on_a_toy_model():
    """The first step's guided logits against the branches run alone (cfg, spatial_cfg of 1
    and 0 pick one branch), and the cond branch against a direct forward of the prefix
    through the public interleave op with the same angle table."""
    m, low = toy(), torch.randint(17, (2, GRID * GRID))
    (cond, cells), (spatial, _), (uncond, _) = (first_logits(m, low, cfg=c, spatial_cfg=s)
                                                for c, s in ((1, 1), (0, 1), (0, 0)))
    guided, _ = first_logits(m, low, cfg=3.0, spatial_cfg=2.5)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - spatial) + 2.5 * (spatial - uncond))
    assert (cond - spatial).abs().max() > 1e-3  # the label matters
    assert (spatial - uncond).abs().max() > 1e-3  # the hidden low-res tokens matter
    unmasked, _ = first_logits(m, low, cfg=0, spatial_cfg=0, mask_ratio=0.0)
    torch.testing.assert_close(unmasked, spatial)

    order = orders.hierarchical_order(2, GRID, 2, torch.Generator().manual_seed(0))
    lattice, n = order[:, :GRID * GRID], GRID * GRID
    assert torch.equal(cells[:, 0], order[:, n])  # the first query is the first non-lattice cell
    from_cell = (lattice // 8 // 2) * GRID + lattice % 8 // 2
    angles = rope_angles(GRID, DIM // HEADS, scale=2, ntk_boundary=2)
    with torch.no_grad():
        seq = sarkernels.interleave_position_instructions(
            m.tok_embeddings(low.gather(1, from_cell)), lattice, m.pos_instruct_embeddings[0],
            num_heads=HEADS, prefix=m.cls_embedding(torch.tensor([1, 7])), rope_angles=angles)
        query = rotate_instruction(m.pos_instruct_embeddings[0], order[:, n:n + 1], HEADS,
                                   angles=angles)
        cells_all = torch.cat([torch.full((2, 1), -1), lattice.repeat_interleave(2, 1),
                               order[:, n:n + 1]], 1)
        h = m.trunk(torch.cat([seq, query], 1), cells_all, angles=angles)
        torch.testing.assert_close(m.output(h[:, -1:]).float(), cond, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(scale=1), "scale must be an int >= 2"), (dict(scale=2.0), "scale must be an int"),
    (dict(mask_ratio=1.5), r"mask_ratio must be in \[0, 1\]"),
    (dict(spatial_cfg=-1), "spatial_cfg must be >= 0"),
    (dict(spatial_cfg=None), "spatial_cfg must be >= 0, got None"),
    (dict(spatial_cfg=float("nan")), "spatial_cfg must be >= 0 and finite, got nan"),
    (dict(cfg=float("inf")), "cfg_scale must be >= 0 and finite, got inf"),
    (dict(cfg=None), "cfg must be >= 0, got None"), (dict(cfg=-2), "cfg must be >= 0"),
    (dict(low_res=torch.zeros(2, 5, dtype=torch.long)),
     r"low_res must be integer tokens \[B, G\*G\]")])
def test_bad_extrapolation_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        toy().generate_extrapolated(torch.tensor([1, 7]), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished randar and sar runs."""
    from sarkernels.app.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    for model in ("randar", "sar"):
        train(TrainConfig(model=model, steps=2, ckpt_every=2, out=str(root / model), dim=32,
                          heads=2, layers=1, batch=8, warmup=1), progress=False)
    return root


def test_cli_resolution(runs, tmp_path, capsys):
    from sarkernels.__main__ import main
    from test_cli_mistakes import one_line_error

    sample = ["sample", "--ckpt", runs / "randar", "--labels", "1,2", "--out", tmp_path / "x.png"]
    assert main([str(a) for a in sample + ["--resolution", "2x", "--n", "2"]]) == 0
    assert "8x8 samples and their 16x16 extrapolations" in capsys.readouterr().out
    assert (tmp_path / "x.png").stat().st_size > 0
    bad = "--resolution must be an integer scale of 2 or more followed by x"
    for value in ("3q", "1x", "x", "2.5x"):
        one_line_error(capsys, sample + ["--resolution", value], bad)
    one_line_error(capsys, sample + ["--resolution", "2x", "--image", tmp_path / "x.png"],
                   "does not combine with --image, --mask or --recipe")
    one_line_error(capsys, sample + ["--resolution", "2x", "--cfg-power", "1"],
                   "--resolution guides as RandAR's extrapolation does (a linear ramp, then "
                   "constant --cfg and --spatial-cfg): it does not take --cfg-power")
    one_line_error(capsys, sample + ["--resolution", "2x", "--spatial-cfg", "-1"],
                   "--spatial-cfg must be >= 0")
    one_line_error(capsys, sample + ["--resolution", "2x", "--ntk-boundary", "-1"],
                   "--ntk-boundary must be >= 0")
    sample[2] = runs / "sar"
    one_line_error(capsys, sample + ["--resolution", "2x"],
                   "--resolution needs a RandAR model (resolution extrapolation is RandAR's)")


def test_a_16x16_model_extrapolates_to_32x32():
    """ImageNet's token grid: 256 lattice tokens, the 32x32 result, cache == recompute."""
    torch.manual_seed(0)
    m = RandARTransformer(vocab_size=17, num_classes=10, grid_size=16, dim=32, n_head=2,
                          n_layer=1, multiple_of=32).eval()
    for p in m.parameters():  # the zero-initialised head would make every token a coin toss
        torch.nn.init.normal_(p, std=0.3)
    low = torch.randint(17, (1, 256))
    cached, fresh = (m.generate_extrapolated(torch.tensor([1]), low_res=low, steps=3,
                                             use_kv_cache=cache,
                                             generator=torch.Generator().manual_seed(0))
                     for cache in (True, False))
    assert cached.shape == (1, 1024) and torch.equal(cached, fresh)
    assert torch.equal(cached.view(32, 32)[::2, ::2].flatten(), low[0])
