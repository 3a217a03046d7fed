"""Generation steps are static-shape and sync-free: they trace whole under
torch.compile(fullgraph=True), read no value back to the host, and replay from CUDA graphs
with the tokens of eager generation."""
import inspect

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch.utils._python_dispatch import TorchDispatchMode

import sarkernels
from conftest import HAS_KERNELS
from test_models import make

KNOWN = (torch.tensor([3, 9]), torch.tensor([1, 2]))
SAMPLING = dict(cfg_scale=2.0, temperature=0.9, top_k=6, top_p=0.8)
# Two known cells, then sets of two: two step shapes per model (the first step, the rest).
CASES = [("randar", dict(schedule=[2] * 7)), ("rar", dict(order="random")),
         ("rar-official", dict(order="random")), ("sar", dict(schedule=[2] * 7))]
# Values tensors cannot reach the host from: ops that read them (item, bool) or size their
# output by them (nonzero and what calls it inside the kernel, multinomial's check).
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "multinomial", "unique",
           "_unique", "_unique2", "unique_consecutive", "unique_dim"}
# The reference kv_cache_append checks slots on the host unless told not to (check=False).
NEEDS_CHECK_FLAG = pytest.mark.skipif(
    "check" not in inspect.signature(sarkernels.kv_cache_append).parameters,
    reason="the reference kv_cache_append syncs until it takes check=False")
BACKENDS = [pytest.param("kernels", marks=pytest.mark.skipif(not HAS_KERNELS, reason="no _C")),
            pytest.param("reference", marks=NEEDS_CHECK_FLAG)]


class NoSync(TorchDispatchMode):
    """Fails on any op that would wait for the device on CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[1].split(".")[0]
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in SYNCING or masked or func.name() == "aten::repeat_interleave.Tensor":
            raise AssertionError(f"{func} reads device values on the host inside a step")
        return func(*args, **(kwargs or {}))


def without_sync(step):
    def run(*args):
        with NoSync():
            return step(*args)
    return run


def generate(m, seed=1, **kw):
    logits = []
    tokens = m.generate(torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(seed),
                        on_step=lambda s, l, c: logits.append(l.clone()), **kw)
    return tokens, logits


def test_no_sync_mode_catches_syncs():
    x = torch.rand(4)
    for sync in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: x[x > 0.5],
                 lambda: torch.multinomial(x, 1), lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="on the host"), NoSync():
            sync()
    with NoSync():
        x.topk(2), x.sort(), x.cumsum(0), x.argmax()  # what sampling does


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("kind,kw", CASES + [("randar", dict(schedule="randar", steps=6)),
                                             ("sar", dict(schedule="random", steps=5))])
def test_steps_do_not_synchronise(kind, kw, cache, backend):
    m = make(kind)
    kw = dict(kw, **SAMPLING, known=KNOWN, use_kv_cache=cache)
    with sarkernels.use_backend(backend):
        plain, plain_logits = generate(m, **kw)
        checked, checked_logits = generate(m, compile=without_sync, **kw)
    assert torch.equal(plain, checked) and plain[:, KNOWN[0]].eq(KNOWN[1]).all()
    assert len(plain_logits) == len(checked_logits) > 0


class CountingBackend:
    """aot_eager (AOTAutograd's functionalised graph, run eagerly), counting compiles and
    the calls that go through a compiled graph."""

    def __init__(self):
        self.compiles = self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        compiled = lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)
        return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", CASES)
def test_compiled_steps_match_eager(kind, kw, backend):
    """One fullgraph compile per step shape (a graph break raises), every step through a
    compiled graph, tokens as eager; a second call reuses the compiled steps."""
    m = make(kind)
    kw = dict(kw, **SAMPLING, known=KNOWN)
    torch._dynamo.reset()
    counter, steps = CountingBackend(), []
    compile = lambda step: torch.compile(step, fullgraph=True, dynamic=False, backend=counter)
    count_steps = lambda step: lambda *args: steps.append(1) or step(*args)
    with sarkernels.use_backend(backend), \
            torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for seed in (1, 2):
            eager, eager_logits = generate(m, seed, compile=count_steps, **kw)
            compiled, compiled_logits = generate(m, seed, compile=compile, **kw)
            assert torch.equal(eager, compiled)
            for a, b in zip(eager_logits, compiled_logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert counter.compiles == 2 and counter.calls == len(steps)


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="graphs=True needs a model on a CUDA device"):
        make("rar").generate(torch.tensor([1]), graphs=True)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,kw", CASES + [("randar", dict(schedule="randar", steps=6))])
def test_graphs_match_eager(kind, kw):
    """Captured steps replay the eager tokens and logits, with a CPU or a CUDA generator,
    and keep doing so when the captured graphs are reused for the next call."""
    m = make(kind).cuda()
    labels = torch.tensor([1, 2, 3], device="cuda")
    kw = dict(kw, **SAMPLING, known=KNOWN)
    captured = []
    for gen in (lambda: torch.Generator().manual_seed(1),
                lambda: torch.Generator("cuda").manual_seed(1),
                lambda: torch.Generator("cuda").manual_seed(2)):
        runs = []
        for graphs in (False, True):
            logits = []
            tokens = m.generate(labels, generator=gen(), graphs=graphs,
                                on_step=lambda s, l, c: logits.append(l.clone()), **kw)
            runs.append((tokens, logits))
        (eager, eager_logits), (replayed, replayed_logits) = runs
        assert torch.equal(eager, replayed)
        for a, b in zip(eager_logits, replayed_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        captured.append(len(m._generation_session[1].graphs))
    assert captured[0] > 0 and captured[1:] == captured[:1] * 2  # later calls capture nothing


@pytest.mark.parametrize("kind,kw", CASES)
def test_generation_under_autocast(kind, kw):
    """sample-many's bf16: the KV caches hold autocast's dtype (the keys' and queries'), the
    steps stay sync-free, and a kept session is not reused once autocast is off."""
    m = make(kind)
    kw = dict(kw, **SAMPLING, known=KNOWN, compile=without_sync)
    with torch.autocast("cpu", torch.bfloat16):
        tokens, _ = generate(m, **kw)
    caches = m._generation_session[1].state.caches
    assert {c.k.dtype for group in caches.values() for c in group} == {torch.bfloat16}
    assert tokens[:, KNOWN[0]].eq(KNOWN[1]).all()
    assert torch.equal(generate(m, **kw)[0], generate(m, **dict(kw, compile=False))[0])


def test_official_rar_under_autocast_with_fp32_norms():
    """CUDA autocast runs LayerNorm in fp32 (the CPU's does not: emulated by hooks); the
    official RAR's q and k come back to the cache's dtype."""
    m = make("rar-official")
    for block in m.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.register_forward_hook(lambda mod, args, out: out.float())
    with torch.autocast("cpu", torch.bfloat16):
        for cache in (True, False):
            generate(m, **SAMPLING, use_kv_cache=cache)
