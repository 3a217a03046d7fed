"""Prefix (prompt) conditioning of SAR, RandAR and RAR: random text-encoder embeddings
stand in for a text encoder, so these tests need no extra."""
import pytest
import torch

from sarkernels.models import MODELS, Prompt, RandARTransformer, RARTransformer, SARTransformer

SMALL = dict(vocab_size=17, num_classes=10, grid_size=4, dim=64, n_head=4, multiple_of=32,
             cond_dim=12)
KINDS = ["sar", "randar", "rar"]


def make(kind, dtype=torch.float64):
    torch.manual_seed(0)
    if kind == "sar":
        m = SARTransformer(encoder_layers=2, decoder_layers=2, **SMALL)
    else:
        m = (RandARTransformer if kind == "randar" else RARTransformer)(n_layer=2, **SMALL)
    for p in m.parameters():  # untrained weights far from uniform
        torch.nn.init.normal_(p, std=0.3)
    return m.to(dtype).eval()


def prompt(batch=3, lengths=(2, 5, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    length = max(lengths)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    return Prompt(torch.randn(batch, length, 12, generator=g, dtype=torch.float64), mask)


def repad(p, extra, seed=1):
    """The same prompts with ``extra`` padding tokens of random content spread through
    each row (left, right and between the real tokens)."""
    g = torch.Generator().manual_seed(seed)
    b, length, d = p.embeddings.shape
    emb = torch.randn(b, length + extra, d, generator=g, dtype=p.embeddings.dtype)
    mask = torch.zeros(b, length + extra, dtype=torch.bool)
    for i in range(b):
        where = torch.randperm(length + extra, generator=g)[:length].sort().values
        real = p.mask[i].nonzero().flatten()
        emb[i, where[:len(real)]] = p.embeddings[i, real]
        mask[i, where[:len(real)]] = True
    return Prompt(emb, mask)


def forward(m, kind, cond, tokens, order):
    if kind == "sar":
        sets = torch.arange(1, 17).expand(len(tokens), -1) // 4 + 1
        return m(tokens, cond, order, sets)
    return m(tokens, cond, order)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_logits(kind):
    m = make(kind)
    tokens = torch.randint(0, 17, (3, 16))
    order = torch.stack([torch.randperm(16) for _ in range(3)])
    p = prompt()
    ref = forward(m, kind, p, tokens, order)
    for extra in (0, 3):
        got = forward(m, kind, repad(p, extra, seed=extra + 1), tokens, order)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    other = prompt(seed=5)
    assert not torch.allclose(forward(m, kind, other, tokens, order), ref)


def generate(m, cond, cache, seed=2, **kw):
    logits = []
    tokens = m.generate(cond, generator=torch.Generator().manual_seed(seed), use_kv_cache=cache,
                        on_step=lambda s, l, c: logits.append(l), **kw)
    return tokens, logits


CASES = [("sar", {}), ("sar", dict(cfg_scale=2.0, schedule="cosine", steps=4)),
         ("randar", {}), ("randar", dict(cfg_scale=3.0)), ("rar", {}),
         ("rar", dict(cfg_scale=2.0, order="random"))]


@pytest.mark.parametrize("kind,kw", CASES)
def test_kv_cache_equals_recompute_and_padding(kind, kw):
    m = make(kind)
    p = prompt()
    cached, cached_logits = generate(m, p, True, **kw)
    for cond, cache in ((p, False), (repad(p, 2), True)):
        tokens, logits = generate(m, cond, cache, **kw)
        assert torch.equal(tokens, cached)
        assert len(logits) == len(cached_logits)
        for a, b in zip(logits, cached_logits):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_generation_logits_match_the_training_forward(kind):
    # Greedy raster AR: each step's logits are the teacher-forced forward's at that token.
    m = make(kind)
    p = prompt()
    kw = dict(order="raster", schedule="ar", top_k=1)
    tokens, logits = generate(m, p, True, **kw)
    order = torch.arange(16).expand(3, -1)
    if kind == "sar":
        full = m(tokens, p, order, torch.arange(1, 17).expand(3, -1))
    else:
        full = forward(m, kind, p, tokens, order)
    torch.testing.assert_close(torch.cat(logits, 1), full.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_scale_one_equals_no_cfg(kind):
    m = make(kind)
    p = prompt()
    plain, plain_logits = generate(m, p, True)
    guided, guided_logits = generate(m, p, True, cfg_scale=1.0)
    assert torch.equal(plain, guided)
    for a, b in zip(plain_logits, guided_logits):  # float32 logits: uncond + 1 * (cond - uncond)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_rows_use_the_learned_null_prompt(kind):
    # A dropped row conditions on the null token whatever its prompt was, and the null token
    # learns.
    m = make(kind)
    m.config["class_dropout"] = 1.0
    tokens = torch.randint(0, 17, (3, 16))
    layout = m.training_layout(3, torch.Generator().manual_seed(0))
    a = m.loss(tokens, prompt(seed=0), layout)
    assert torch.equal(a, m.loss(tokens, prompt(seed=3), layout))
    m.config["class_dropout"] = 0.0
    kept = m.training_layout(3, torch.Generator().manual_seed(0))
    assert not torch.equal(m.loss(tokens, prompt(seed=0), kept), m.loss(tokens, prompt(seed=3), kept))
    a.backward()
    assert m.cls_embedding.uncond_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_bad_conditions_name_the_argument(kind):
    m = make(kind)
    p = prompt()
    with pytest.raises(TypeError, match="Prompt"):
        m.generate(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"embeddings must be float \[B, Lc, Dc=12\], got "
                                         r"torch.float64 \[3, 5, 7\]"):
        m.generate(Prompt(p.embeddings[..., :7], p.mask))
    with pytest.raises(ValueError, match=r"mask must be bool \[B, Lc\] = \[3, 5\], got "
                                         r"torch.bool \[3, 4\]"):
        m.generate(Prompt(p.embeddings, p.mask[:, :4]))
    with pytest.raises(ValueError, match="at least one real token"):
        m.generate(Prompt(p.embeddings, p.mask & False))
    labels_model = MODELS[kind](**{**SMALL, "cond_dim": None})
    with pytest.raises(TypeError, match="conditioned on class labels"):
        labels_model.generate(p)


@pytest.mark.parametrize("kind", KINDS)
def test_class_models_have_no_caption_modules(kind):
    # cond_dim=None builds exactly the class-label model (state_dict keys, init RNG).
    torch.manual_seed(0)
    a = MODELS[kind](**{**SMALL, "cond_dim": None})
    torch.manual_seed(0)
    kw = {k: v for k, v in SMALL.items() if k != "cond_dim"}
    b = MODELS[kind](**kw)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = MODELS[kind](**SMALL)
    assert {k for k in c.state_dict() if k.startswith("cls_embedding")} == {
        "cls_embedding.cap_proj.0.weight", "cls_embedding.cap_proj.0.bias",
        "cls_embedding.cap_proj.2.weight", "cls_embedding.cap_proj.2.bias",
        "cls_embedding.uncond_embedding"}
