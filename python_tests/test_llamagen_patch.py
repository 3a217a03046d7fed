"""patch_llamagen on a transcription of LlamaGen's GPT (llamagen_gpt.py): the same logits,
gradients and generated tokens as the unpatched model."""
import pytest
import torch

import llamagen_gpt as gpt
from sarkernels import compat, ops
from sarkernels.compat import LlamaGenAttention, patch_llamagen
from sarkernels.compat import torch_sdpa as sdpa_module
from sarkernels.compat.llamagen import rotate_pairs
from sarkernels.nn import KVCache

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def tiny(dtype=torch.float64, n_kv_head=None, model_type="c2i", cls_token_num=1):
    torch.manual_seed(0)
    args = gpt.ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, multiple_of=32,
                         vocab_size=50, num_classes=10, block_size=16, model_type=model_type,
                         caption_dim=24, cls_token_num=cls_token_num, token_dropout_p=0.0,
                         resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return gpt.Transformer(args).to(dtype)


def pair(dtype=torch.float64, **kwargs):
    return tiny(dtype, **kwargs), patch_llamagen(tiny(dtype, **kwargs))  # the same weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_training_logits_and_gradients_equal_the_original(backend, dtype):
    original, patched = pair(dtype)
    assert all(isinstance(b.attention, LlamaGenAttention) for b in patched.layers)
    assert patched.state_dict().keys() == original.state_dict().keys()
    idx, cond = torch.randint(0, 50, (3, 16)), torch.randint(0, 10, (3,))
    grads = []
    for model in (original, patched):
        model.train()
        compat.reset_fallback_counts()
        logits, loss = model(idx[:, :-1], cond, targets=idx)
        grads.append((logits, *torch.autograd.grad(loss, list(model.parameters()))))
    assert compat.fallback_counts() == {}  # the patched model ran on the kernels
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_cached_generation_gives_the_original_tokens(backend, monkeypatch, cfg):
    original, patched = pair()
    cond = torch.tensor([3, 7])
    tokens = []
    for model in (original, patched):
        model.eval()
        torch.manual_seed(1)
        compat.reset_fallback_counts()
        tokens.append(gpt.generate(model, cond, 16, cfg_scale=cfg))
        # every step's mask has one row per sample: set ids without conversion or host sync
        monkeypatch.setattr(sdpa_module, "_convert", lambda *a: pytest.fail("converted"))
    assert torch.equal(tokens[0], tokens[1])
    assert compat.fallback_counts() == {}  # every call ran on the kernels
    cache = patched.layers[0].attention.kv_cache
    assert isinstance(cache, KVCache) and cache.k.shape == (4 if cfg > 1 else 2, 4, 24, 16)
    assert not cache.check  # LlamaGen's positions lie in the cache it sized: no sync per write


def test_a_decode_step_compiles_whole():
    """LlamaGen's sample_c2i.py --compile: torch.compile(model, fullgraph=True)."""
    _, model = pair()
    graphs = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward
    model.eval()
    with torch.no_grad():
        model.setup_caches(2, 16, torch.float64)
        model(None, torch.tensor([3, 7]), torch.arange(1))  # the prefill, eager
        x, pos = torch.tensor([[4], [9]]), torch.tensor([1], dtype=torch.int)
        want, _ = model(x, None, pos)
        torch.compiler.reset()
        got, _ = torch.compile(model, backend=record, fullgraph=True)(x, None, pos)
    torch.compiler.reset()
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)  # rewrites the same slot
    assert "scaled_dot" not in graphs[0]  # the reference backend traces into plain ops
    assert "set_attention" in graphs[0] or not ops.backends()["cpu"]["usable"]


def test_text_to_image_padding_falls_back_for_the_prefill_only(backend):
    original, patched = pair(model_type="t2i", cls_token_num=6)
    caption = torch.randn(2, 6, 24, dtype=torch.float64)
    emb_masks = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])  # left-padded text
    tokens = []
    for model in (original, patched):
        model.eval()
        compat.reset_fallback_counts()
        torch.manual_seed(2)
        tokens.append(gpt.generate(model, caption, 8, emb_masks=emb_masks, cfg_scale=2.0))
    assert torch.equal(tokens[0], tokens[1])
    # the padded rows keep their diagonal: the prefill's mask is not a set mask (one call per
    # layer), each decode step's one row is
    assert compat.fallback_counts() == {"not a set mask": 2}


def test_gqa_generation_works_where_the_original_crashes(backend):
    original, patched = pair(n_kv_head=2)
    cond = torch.tensor([5])
    original.eval(), patched.eval()
    with pytest.raises(RuntimeError):
        gpt.generate(original, cond, 4)
    compat.reset_fallback_counts()
    tokens = gpt.generate(patched, cond, 16, sample_logits=False)
    assert compat.fallback_counts() == {}
    for model in (original, patched):  # teacher forcing on the generated tokens
        model.train()
        for block in model.layers:
            block.attention.kv_cache = None
    logits, _ = patched(tokens[:, :-1], cond)
    assert torch.equal(logits.argmax(-1), tokens)
    logits_original, _ = original(tokens[:, :-1], cond)
    torch.testing.assert_close(logits, logits_original, atol=1e-10, rtol=1e-10)


def test_the_cache_moves_with_the_model():
    _, patched = pair()
    patched.setup_caches(2, 20, torch.float64)
    patched.to(torch.float32)
    cache = patched.layers[1].attention.kv_cache
    assert cache.k.dtype == torch.float32 and "layers.1.attention.kv_cache.k" not in patched.state_dict()


class Wrong(gpt.Attention):
    def forward(self, *args, **kwargs):
        return 1.001 * super().forward(*args, **kwargs)


def test_verify_refuses_a_replacement_that_differs():
    model = tiny()
    model.layers[1].attention.__class__ = Wrong  # an attention our replacement does not match
    with pytest.raises(RuntimeError, match=r"patch_llamagen: layers.1.attention differs from the "
                                           r"original by .*left unpatched"):
        patch_llamagen(model)
    assert not any(isinstance(m, LlamaGenAttention) for m in model.modules())
    assert patch_llamagen(model, verify=False).layers[1].attention.__class__ is LlamaGenAttention
    with pytest.raises(ValueError, match="patch_llamagen: Linear has no LlamaGen-style Attention"):
        patch_llamagen(torch.nn.Linear(2, 2))


def test_per_sample_freqs_rotate_as_randar_does():
    """RandAR's batch_apply_rotary_emb: LlamaGen's rotation with freqs_cis [B, L, D/2, 2]."""
    x = torch.randn(3, 5, 2, 8, dtype=torch.float64)
    angles = torch.rand(3, 5, 4, dtype=torch.float64)
    freqs = torch.stack([angles.cos(), angles.sin()], -1)
    want = torch.cat([gpt.apply_rotary_emb(x[i:i + 1], freqs[i]) for i in range(3)])
    assert torch.equal(rotate_pairs(x, freqs), want)
    assert torch.equal(rotate_pairs(x, freqs[0]), gpt.apply_rotary_emb(x, freqs[0]))
