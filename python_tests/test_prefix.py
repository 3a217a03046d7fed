"""Prefix (prompt) conditioning of SAR, RandAR and RAR. The model tests use random
embeddings in place of a text encoder; the command-line tests that encode prompts skip
without the [text] extra."""
import importlib.util
import subprocess
import sys

import pytest
import torch

from sarkernels.app import checkpoint, prompts
from sarkernels.app.train import TrainConfig, train
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
    m.config.class_dropout = 1.0
    tokens = torch.randint(0, 17, (3, 16))
    layout = m.training_layout(3, torch.Generator().manual_seed(0))
    a = m.loss(tokens, prompt(seed=0), layout)
    assert torch.equal(a, m.loss(tokens, prompt(seed=3), layout))
    m.config.class_dropout = 0.0
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


# ------------------------------------------------------------------ the command line

def cli(*args):
    return subprocess.run([sys.executable, "-m", "sarkernels", *args], capture_output=True,
                          text=True)


TINY = ["--dim", "32", "--heads", "2", "--layers", "1", "--batch", "8", "--warmup", "2",
        "--ckpt-every", "5", "--no-progress"]
needs_text = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None or
                                importlib.util.find_spec("sentence_transformers") is None,
                                reason="the [text] extra is not installed")


def test_prompt_options_refuse_what_cannot_work(tmp_path):
    res = cli("train", "--condition", "prompts", "--data", str(tmp_path), "--out",
              str(tmp_path / "run"))
    assert res.returncode == 2 and "it needs --data digits" in res.stderr
    res = cli("train", "--condition", "words", "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "--condition" in res.stderr
    run = str(tmp_path / "labels")
    train(TrainConfig(model="rar", steps=2, out=run, dim=32, heads=2, layers=1, batch=8),
          progress=False)
    assert checkpoint.condition_kind(checkpoint.read_config(checkpoint.resolve(run))) == "labels"
    res = cli("sample", "--ckpt", run, "--prompts", "a handwritten seven", "--out",
              str(tmp_path / "x.png"))
    assert res.returncode == 2
    assert "--prompts needs a checkpoint trained with --condition prompts" in res.stderr
    res = cli("sample", "--ckpt", run, "--prompts", "a seven,,", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "--prompts must be comma-separated" in res.stderr


def test_training_prompts_come_from_the_generator():
    labels = torch.tensor([7, 7, 0, 3])
    a = prompts.draw(labels, torch.Generator().manual_seed(0))
    assert a == prompts.draw(labels, torch.Generator().manual_seed(0))
    words = [prompts.NUMBERS[l] for l in labels]
    assert all(w in p or str(int(l)) in p for p, w, l in zip(a, words, labels))


@needs_text
@pytest.mark.slow
@pytest.mark.parametrize("model", ["sar", "randar", "rar"])
def test_train_and_sample_with_prompts(tmp_path, model):
    run = str(tmp_path / "run")
    res = cli("train", "--model", model, "--condition", "prompts", "--steps", "3", "--out", run,
              *TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    config = checkpoint.read_config(checkpoint.resolve(run))
    assert config["condition"] == {"kind": "prompts", "encoder": prompts.ENCODER, "dim": 384}
    assert config["model_config"]["cond_dim"] == 384
    out = tmp_path / "grid.png"
    res = cli("sample", "--ckpt", run, "--prompts", "a handwritten seven,the digit 2", "--n", "2",
              "--cfg", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "0: a handwritten seven; 1: the digit 2" in res.stdout and out.exists()
    res = cli("sample", "--ckpt", run, "--out", str(out))
    assert res.returncode == 2 and "pass --prompts" in res.stderr


@needs_text
def test_text_encoder_pads_with_a_mask():
    enc = prompts.TextEncoder()
    p = enc(["a handwritten seven", "7", "a handwritten seven"])
    assert p.embeddings.shape[:2] == p.mask.shape and p.embeddings.shape[2] == enc.dim
    assert p.mask[0].all() and p.mask[1].sum() < p.mask[0].sum()
    assert torch.equal(p.embeddings[0], p.embeddings[2])
    assert (p.embeddings[1][~p.mask[1]] == 0).all()


def test_randar_extrapolates_from_a_prompt():
    m = make("randar")
    p = prompt(batch=2, lengths=(2, 5))
    run = lambda cond, **kw: m.generate_extrapolated(
        cond, 2, steps=6, generator=torch.Generator().manual_seed(0), **kw)
    tokens = run(p)
    assert tokens.shape == (2, 64)
    assert torch.equal(run(repad(p, 2)), tokens)
    assert torch.equal(run(p, use_kv_cache=False), tokens)


def test_missing_text_extra_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)  # import fails as if absent
    with pytest.raises(ValueError, match=r"install lacks: pip install 'sarkernels\[text\]'"):
        prompts.TextEncoder()
