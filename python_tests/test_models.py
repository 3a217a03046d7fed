import math

import pytest
import torch

import sarkernels
from sarkernels import orders, reference
from sarkernels.models import OfficialRAR, RandARTransformer, RARTransformer, SARTransformer
from sarkernels.models.generation import State

SMALL = dict(vocab_size=17, num_classes=10, grid_size=4, dim=64, n_head=4, multiple_of=32)


def make(kind, **over):
    torch.manual_seed(0)
    if kind == "sar":
        m = SARTransformer(encoder_layers=2, decoder_layers=2, **{**SMALL, **over})
    else:
        cls = {"randar": RandARTransformer, "rar": RARTransformer, "rar-official": OfficialRAR}[kind]
        m = cls(n_layer=2, **{**SMALL, **over})
    for p in m.parameters():  # untrained weights far from uniform, so sampling is not trivial
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def generate(m, cache, seed=1, **kw):
    logits = []
    tokens = m.generate(torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(seed),
                        use_kv_cache=cache, on_step=lambda s, l, c: logits.append(l), **kw)
    return tokens, logits


CASES = [("randar", {}), ("randar", dict(schedule="random", steps=5)),
         ("randar", dict(schedule="ar", order="raster")), ("randar", dict(cfg_scale=3.0)),
         ("rar", {}), ("rar", dict(order="random", cfg_scale=2.0)),
         ("rar-official", {}), ("rar-official", dict(order="random", cfg_scale=2.0)),
         ("sar", {}), ("sar", dict(schedule="cosine", steps=4)), ("sar", dict(schedule="ar")),
         ("sar", dict(schedule=[1, 15])), ("sar", dict(cfg_scale=2.0))]


@pytest.mark.parametrize("kind,kw", CASES)
def test_kv_cache_equals_recompute(kind, kw):
    m = make(kind)
    cached, cached_logits = generate(m, True, **kw)
    fresh, fresh_logits = generate(m, False, **kw)
    assert torch.equal(cached, fresh)
    assert len(cached_logits) == len(fresh_logits)
    for a, b in zip(cached_logits, fresh_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert cached.shape == (3, 16) and cached.min() >= 0 and cached.max() < 17


@pytest.mark.skipif("simt" not in sarkernels.ops.backends() or
                    not sarkernels.ops.backends()["simt"]["usable"], reason="_simt not built")
@pytest.mark.parametrize("kind,kw", [("randar", dict(cfg_scale=3.0)), ("rar", {}),
                                     ("rar-official", dict(cfg_scale=3.0)),
                                     ("sar", dict(cfg_scale=2.0))])
def test_kv_cache_equals_recompute_on_simt(kind, kw):
    """Once per model on the CUDA kernels under the SIMT executor (decode, training
    attention, cache writes, interleave): cached and recomputed generation agree."""
    with sarkernels.use_backend("simt"):
        test_kv_cache_equals_recompute(kind, kw)


@pytest.mark.parametrize("kind", ["randar", "rar", "rar-official", "sar"])
def test_known_cells_are_kept_and_seeded_runs_repeat(kind):
    m = make(kind)
    positions, values = torch.tensor([[0, 7, 9], [15, 1, 2], [3, 4, 5]]), torch.tensor([[1, 2, 3]] * 3)
    for cache in (True, False):
        out, _ = generate(m, cache, known=(positions, values))
        assert torch.equal(out.gather(1, positions), values)
    assert torch.equal(generate(m, True)[0], generate(m, True)[0])
    assert not torch.equal(generate(m, True, seed=1)[0], generate(m, True, seed=2)[0])


@pytest.mark.parametrize("kind", ["randar", "rar", "rar-official", "sar"])
def test_cfg_scale_one_equals_no_cfg(kind):
    m = make(kind)
    plain, plain_logits = generate(m, True)
    guided_1, guided_logits = generate(m, True, cfg_scale=1.0)  # runs the doubled batch
    assert torch.equal(plain, guided_1)
    for a, b in zip(plain_logits, guided_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(plain, generate(m, True, cfg_scale=4.0)[0])


@pytest.mark.parametrize("kind", ["randar", "rar", "rar-official", "sar"])
def test_reference_and_kernel_backends_agree(kind):
    m = make(kind)
    tokens, labels = torch.randint(0, 17, (3, 16)), torch.tensor([0, 4, 9])
    order = orders.make_order("random", 3, 16, torch.Generator().manual_seed(0))
    args = (tokens, labels, order) + ((orders.set_ids([3, 5, 8]).expand(3, 16),) if kind == "sar" else ())
    with sarkernels.use_backend("reference"):
        ref_logits, ref_tokens = m(*args), generate(m, True)[0]
    torch.testing.assert_close(m(*args), ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(m, True)[0], ref_tokens)


def test_sar_worked_example_masks():
    # sar.md: N=8, sizes 1,2,2,3; encoder input [cls, x1..x5]; rows list visible columns.
    ids = orders.set_ids([1, 2, 2, 3])
    enc = torch.cat([torch.zeros(1, dtype=torch.long), ids[:5]])[None]
    dec = ids[None]
    rows = lambda m: [torch.nonzero(r).flatten().tolist() for r in m[0]]
    assert rows(reference.visible(enc, enc)) == [[0], [0, 1], [0, 1, 2, 3], [0, 1, 2, 3],
                                                 [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert rows(reference.visible(dec, dec)) == [[0], [0, 1, 2], [0, 1, 2], *[[0, 1, 2, 3, 4]] * 2,
                                                 *[list(range(8))] * 3]
    assert rows(reference.visible(dec, enc, strict=True)) == [[0], [0, 1], [0, 1], *[[0, 1, 2, 3]] * 2,
                                                              *[list(range(6))] * 3]


def test_sar_model_obeys_the_masks():
    """A token influences exactly the targets of later sets; the last set influences none."""
    m = make("sar")
    labels, order = torch.tensor([3]), torch.randperm(16)[None]
    sets = orders.set_ids([1, 2, 2, 3, 8])[None]
    tokens = torch.randint(0, 17, (1, 16))
    base = m(tokens, labels, order, sets)
    for changed_set in (2, 5):
        other = tokens.clone()
        cells = order[0][sets[0] == changed_set]
        other[0, cells] = (other[0, cells] + 1) % 17
        moved = (m(other, labels, order, sets) - base).abs().amax(-1)[0] > 1e-6
        assert torch.equal(moved, sets[0] > changed_set), changed_set


def test_randar_loads_official_key_pattern_strictly():
    m = make("randar")
    d = 64
    hidden = m.layers[0].feed_forward.w1.weight.shape[0]
    official = {"pos_instruct_embeddings": (1, d), "cls_embedding.embedding_table.weight": (11, d),
                "tok_embeddings.weight": (17, d), "norm.weight": (d,), "output.weight": (17, d)}
    for i in range(2):
        official.update({f"layers.{i}.attention.wqkv.weight": (3 * d, d),
                         f"layers.{i}.attention.wo.weight": (d, d),
                         f"layers.{i}.feed_forward.w1.weight": (hidden, d),
                         f"layers.{i}.feed_forward.w3.weight": (hidden, d),
                         f"layers.{i}.feed_forward.w2.weight": (d, hidden),
                         f"layers.{i}.attention_norm.weight": (d,),
                         f"layers.{i}.ffn_norm.weight": (d,)})
    state = {k: torch.randn(shape) for k, shape in official.items()}
    m.load_state_dict(state, strict=True)
    assert torch.equal(m.pos_instruct_embeddings, state["pos_instruct_embeddings"])


def test_randar_presets_match_official_sizes():
    with torch.device("meta"):
        large = RandARTransformer.from_preset("L", vocab_size=16384)
        xl = RandARTransformer.from_preset("XL", vocab_size=16384)
    assert sum(p.numel() for p in large.parameters()) == 342_912_000
    assert sum(p.numel() for p in xl.parameters()) == 774_700_800
    shapes = {k: tuple(v.shape) for k, v in large.state_dict().items()}
    assert shapes["layers.0.attention.wqkv.weight"] == (3072, 1024)
    assert shapes["layers.23.feed_forward.w2.weight"] == (1024, 2816)
    assert shapes["cls_embedding.embedding_table.weight"] == (1001, 1024)
    assert len(shapes) == 5 + 24 * 7


def previous_randar_sizes(n, steps):
    """The schedule before it followed the official sampler: the cosine target from step 1."""
    sizes, done = [], 0
    for t in range(1, steps + 1):
        take = min(max(min(int((1 - math.cos(math.pi / 2 * t / steps)) * n + 1), n) - done, 1),
                   n - done)
        if take <= 0:
            break
        sizes.append(take)
        done += take
    sizes[-1] += n - done
    return sizes


def test_randar_greedy_decoding_at_88_steps_is_unchanged():
    # Official-layout weights sampled with RandAR's default 88 steps over 256 tokens decode
    # exactly as before the schedule followed the official sampler.
    m = make("randar", grid_size=16)
    greedy = lambda **kw: m.generate(torch.tensor([1, 2]), top_k=1,
                                     generator=torch.Generator().manual_seed(0), **kw)
    assert orders.set_sizes("randar", 256, 88) == previous_randar_sizes(256, 88)
    assert torch.equal(greedy(), greedy(schedule=previous_randar_sizes(256, 88)))
    assert previous_randar_sizes(16, 4) != orders.set_sizes("randar", 16, 4)


def test_randar_training_layout_matches_generation_embedding():
    # The interleave op (training) and the per-slot embedding (generation) build one layout.
    m = make("randar")
    tokens, order = torch.randint(0, 17, (2, 16)), torch.randperm(16).expand(2, 16)
    cls = m.cls_embedding.embedding_table(torch.tensor([1, 2]))[:, None]
    state = State(tokens.gather(1, order), order, cls, None, 1)
    slots, index, instruction = torch.tensor(m._slots(0, 16, 0))
    x, cells = m._feed(state, slots, index, instruction.bool())
    seq = sarkernels.interleave_position_instructions(
        m.tok_embeddings(tokens.gather(1, order)), order, m.pos_instruct_embeddings[0],
        num_heads=4, grid_size=4, prefix=cls)
    torch.testing.assert_close(x, seq)


@pytest.mark.parametrize("kind", ["randar", "rar", "rar-official", "sar"])
def test_training_overfits_a_tiny_batch(kind):
    # Four sequences, one per label: a model that learns drives their loss far below the
    # uniform guess ln(17) = 2.83 within a few dozen steps, whatever order each step draws.
    m = make(kind, dropout=0.0, class_dropout=0.0)
    for p in m.parameters():  # small init, so the start is near uniform
        torch.nn.init.normal_(p, std=0.02)
    m.train()
    data = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 17, (4, 16), generator=data), torch.arange(4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = m.loss(tokens, labels, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > 2.5, losses[0]
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], losses[-5:]


@pytest.mark.parametrize("kind", ["randar", "rar", "rar-official", "sar"])
def test_training_step_reaches_every_parameter_and_compiles(kind):
    m = make(kind).train()
    tokens, labels = torch.randint(0, 17, (4, 16)), torch.randint(0, 10, (4,))
    gen = lambda: torch.Generator().manual_seed(0)
    eager = m.loss(tokens, labels, generator=gen())
    assert torch.isfinite(eager)
    eager.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    if kind == "randar":
        torch.manual_seed(5)
        order = orders.make_order("random", 4, 16, gen())
        m.eval()
        step = torch.compile(lambda: torch.nn.functional.cross_entropy(
            m(tokens, labels, order).flatten(0, 1), tokens.gather(1, order).flatten()))
        loss = step()
        loss.backward()
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(
            m(tokens, labels, order).flatten(0, 1), tokens.gather(1, order).flatten()))


BAD = [
    (dict(labels=[10]), "labels must be in"),
    (dict(labels=[-1]), "labels must be in"),
    (dict(schedule="constant", steps=0), "steps must be in"),
    (dict(schedule=[3, 3]), "sum to 16"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(temperature=0), "temperature must be"),
    (dict(known=([16], [1])), "grid"),
    (dict(known=([2, 2], [1, 1])), "must not repeat"),
    (dict(known=([2], [17])), "known tokens must be in"),
    (dict(order="spiral"), "order must be"),
]


@pytest.mark.parametrize("kind", ["randar", "sar"])
@pytest.mark.parametrize("kw,match", BAD)
def test_bad_generate_arguments(kind, kw, match):
    m = make(kind)
    kw = {"labels": [1], **kw}
    with pytest.raises(ValueError, match=match):
        m.generate(torch.tensor(kw.pop("labels")), **kw)


@pytest.mark.parametrize("kind", ["randar", "sar", "rar", "rar-official"])
@pytest.mark.parametrize("kw,error,match", [
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale must be >= 0 and finite, got nan"),
    (dict(cfg_scale=float("inf")), ValueError, "cfg_scale must be >= 0 and finite, got inf"),
    (dict(cfg_scale="2"), TypeError, "cfg_scale must be a real number, got str '2'"),
    (dict(labels=torch.tensor([True])), TypeError, "labels must be an integer tensor, got torch.bool"),
    (dict(top_k=1.5), TypeError, "top_k must be an int, got float 1.5"),
])
def test_generate_refuses_what_would_sample_garbage(kind, kw, error, match):
    kw = {"labels": torch.tensor([1]), **kw}
    with pytest.raises(error, match=match):
        make(kind).generate(kw.pop("labels"), **kw)


def test_rar_rejects_parallel_schedules():
    with pytest.raises(ValueError, match="one token per step"):
        make("rar").generate(torch.tensor([1]), schedule="randar")


def test_training_layout_takes_training_progress():
    # RAR anneals random orders to raster over its `anneal` fractions of training; the
    # others draw the same layout at every progress.
    rar = make("rar", anneal=(0.25, 0.75))
    raster = torch.arange(16).expand(64, 16)
    draw = lambda m, progress: m.training_layout(64, torch.Generator().manual_seed(0), progress)
    assert not (draw(rar, 0.1)["order"] == raster).all(1).any()
    assert (draw(rar, 0.9)["order"] == raster).all()
    mid = (draw(rar, 0.5)["order"] == raster).all(1).float().mean()
    assert 0.3 < mid < 0.7
    assert torch.equal(draw(rar, None)["order"], draw(rar, 0.0)["order"])
    for kind in ("randar", "sar"):
        m = make(kind)
        a, b = draw(m, 0.0), draw(m, 0.9)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["randar", "rar", "sar"])
def test_for_training_builds_layers_and_dropout(kind):
    cls = {"randar": RandARTransformer, "rar": RARTransformer, "sar": SARTransformer}[kind]
    m = cls.for_training(layers=3, dropout=0.2, **SMALL)
    blocks = [m.encoder, m.decoder] if kind == "sar" else [m.layers]
    assert all(len(b) == 3 for b in blocks)
    assert m.config.dropout == 0.2
    if kind != "sar":
        assert m.config.token_dropout == 0.2


def test_rar_generates_in_raster_order_unless_told():
    torch.manual_seed(0)
    model = RARTransformer(vocab_size=17, num_classes=4, grid_size=4, dim=32, n_layer=1,
                           n_head=2).eval()
    labels = torch.tensor([1, 2])

    def draw(**kw):
        return model.generate(labels, generator=torch.Generator().manual_seed(3), **kw)

    assert torch.equal(draw(), draw(order="raster"))
    assert not torch.equal(draw(), draw(order="random"))
