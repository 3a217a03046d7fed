"""The generation loop SAR, RandAR and RAR share: planned on the host, run as static-shape
steps that never synchronise with it (eagerly, compiled, or replayed from CUDA graphs).

Before the first step the host plans everything from Python ints: the order, the set sizes
and, for every step, a few small index tensors (the cache slots it feeds, the tokens it
samples), uploaded in one copy. A step reads only device tensors: the model's buffers
(:class:`State`: token and cell buffers, class rows, fixed-size KV caches whose unwritten
slots are invisible), its index tensors and Exp(1) noise; it writes its tokens in place. It
reads no value back, so ``torch.compile(fullgraph=True)`` traces it whole and a CUDA graph
replays it.

Randomness: the noise of a step is drawn outside the step, into the step's noise buffer,
just before it runs (:func:`common.sample` turns it into tokens). The generator's stream
advances exactly as in eager generation and a captured graph holds no RNG kernel, so a
replay equals the eager step for the same generator without registering it with the graph
(PyTorch's graph-safe RNG would also work, but needs the same generator object in every
capture and replay, and compiled RNG would draw different numbers than eager).
"""
import functools
from dataclasses import dataclass

import torch

from .. import ops
from ..nn import KVCache
from . import common, condition


@dataclass
class State:
    """What steps read and write: ``tokens [B, N]`` in generation order (-1 = not yet
    decoded), ``cells [B*reps, N]`` the order, ``cls [B*reps, Lc, D]`` the condition prefix
    rows (CFG's null condition in the second half) and ``cls_sets [B*reps, Lc]`` their set
    ids (:mod:`.condition`), ``caches`` (a dict of KVCache lists, or None to recompute every
    step); on a :class:`Canvas`, its ``angles`` and ``keep``."""
    tokens: torch.Tensor
    cells: torch.Tensor
    cls: torch.Tensor
    caches: dict
    reps: int
    angles: torch.Tensor = None
    keep: torch.Tensor = None
    cls_sets: torch.Tensor = None

    def tokens_at(self, index):
        """Token ids of order positions ``index [L]`` for every batch row (0 where unknown)."""
        return self.tokens.repeat(self.reps, 1)[:, index].clamp_min(0)

    def load(self, plan, prefix):
        """Starts a generation in place (captured graphs keep pointing at these buffers)."""
        self.tokens.copy_(plan.tokens)
        self.cells.copy_(plan.cells.repeat(self.reps, 1))
        self.cls.copy_(prefix.rows)
        self.cls_sets.copy_(prefix.sets)
        for group in (self.caches or {}).values():
            for cache in group:
                cache.reset()


@dataclass(frozen=True)
class Sampling:
    """The sampling settings (checked); ``cfg_scale`` None: no guidance; ``spatial_cfg``:
    RandAR's three-branch extrapolation guidance; ``cfg_power``: the power-cosine ramp of
    the guidance scale, None the linear one (:func:`common.guided`)."""
    temperature: float
    top_k: int
    top_p: float
    cfg_scale: float
    spatial_cfg: float = None
    cfg_power: float = None

    def __post_init__(self):
        common.check_sampling(self.temperature, self.top_k, self.top_p, self.cfg_scale,
                              self.spatial_cfg, self.cfg_power)

    @property
    def reps(self):
        """Rows per sample: the conditional one and one per guidance branch."""
        return 3 if self.spatial_cfg is not None else 1 if self.cfg_scale is None else 2


@dataclass(eq=False)
class Canvas:
    """A grid other than the model's own (resolution extrapolation): ``n_tokens`` cells,
    the RoPE ``angles [n_tokens, head_dim / 2]`` of each (:func:`sarkernels.rope.
    rope_angles`), and ``keep [B*reps, n_tokens]``, a 0/1 factor on the token embedding of
    each order position per row (a guidance branch that hides some tokens)."""
    n_tokens: int
    angles: torch.Tensor
    keep: torch.Tensor


@dataclass
class Step:
    """One step: its device ``inputs`` and the ``n`` order positions from ``first`` it
    samples (n = 0: a step that only feeds known cells)."""
    inputs: tuple
    first: int
    n: int


def upload(steps, device):
    """Every step's index tensors (int64, built on the host) in one host-to-device copy,
    then one device copy each (views of one buffer would differ in storage offset, which
    torch.compile guards on)."""
    flat = [t for step in steps for t in step.inputs]
    data = torch.cat([t.flatten() for t in flat]).to(device)
    pieces = iter(data.split([t.numel() for t in flat]))
    for step in steps:
        step.inputs = tuple(next(pieces).view(t.shape).clone() for t in step.inputs)
    return steps


def noise_generator(generator, device):
    """A generator on ``device`` for the noise: ``generator`` itself when it lives there,
    else a device generator seeded from it (a CPU generator with a CUDA model)."""
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def shape_key(step, noise_shape):
    return (*(tuple(t.shape) for t in step.inputs), noise_shape(step.n))


class Session:
    """The buffers and step function of one generation configuration. With ``graphs``, each
    distinct step shape is captured once in a CUDA graph (all sharing one memory pool) and
    replayed; the step's outputs are then buffers the next replay of that shape overwrites."""

    def __init__(self, state, step, graphs):
        self.state, self.step, self.graphs = state, step, {} if graphs else None
        self.pool = None

    def capture(self, steps, noise_shape):
        """Captures the shapes of ``steps`` not seen yet. Warm-up runs clobber the buffers:
        call :meth:`State.load` after."""
        for step in steps:
            key = shape_key(step, noise_shape)
            if key in self.graphs:
                continue
            inputs = tuple(t.clone() for t in step.inputs)
            noise = torch.ones(noise_shape(step.n), device=self.state.tokens.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy init (cuBLAS, compile) outside the capture
                for _ in range(2):
                    self.step(*inputs, noise)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(*inputs, noise)
            self.pool = self.pool or graph.pool()
            self.graphs[key] = graph, inputs, noise, out

    def run(self, step, noise_shape, generator):
        if self.graphs is None:
            noise = torch.empty(noise_shape(step.n), device=self.state.tokens.device)
            return self.step(*step.inputs, common.draw_noise(noise, generator))
        graph, inputs, noise, out = self.graphs[shape_key(step, noise_shape)]
        for static, value in zip(inputs, step.inputs):
            static.copy_(value)
        common.draw_noise(noise, generator)
        graph.replay()
        return out


def pick(model, state, sampling, h, targets, noise):
    """Samples the tokens of order positions ``targets [n]`` from the query states
    ``h [B*reps, n, D]`` into the token buffer; returns the guided logits."""
    logits = common.guided(model.output(h).float(), sampling.cfg_scale, targets[0], model.n_tokens,
                           sampling.spatial_cfg, sampling.cfg_power)
    tokens = common.sample(logits, noise, sampling.temperature, sampling.top_k, sampling.top_p)
    state.tokens.index_copy_(1, targets, tokens)
    return logits


class Generation:
    """``generate()`` for a model that defines ``_default_schedule(schedule, steps,
    remaining)``, ``_new_caches(batch, n_tokens, prefix_len)``, ``_schedule(plan,
    use_kv_cache, prefix_len, n_tokens) -> [Step]`` and
    ``_step(state, sampling, *inputs, noise) -> logits or None``; ``default_order`` and
    ``default_cfg_power`` are what ``generate`` takes for ``order`` and ``cfg_power`` None."""
    default_order = "random"
    default_cfg_power = None

    @torch.no_grad()
    def generate(self, labels, *, order=None, schedule=None, steps=None, cfg_scale=None,
                 cfg_power=None, temperature=1.0, top_k=0, top_p=1.0, known=None,
                 generator=None, use_kv_cache=True, graphs=False, compile=False,
                 progress=False, on_step=None):
        """Samples ``[B, N]`` tokens in raster order for class ``labels [B]`` (or, for a
        model built with ``cond_dim``, a :class:`~sarkernels.models.condition.Prompt`).

        order: "random", "raster" or a permutation (None: the model's ``default_order``);
        schedule: set sizes (see :func:`sarkernels.orders.set_sizes`) with ``steps``;
        ``known = (positions, tokens)`` teacher-forces cells first (inpainting/outpainting),
        which appear unchanged in the output. ``cfg_scale`` (None = off) runs the null
        condition as a doubled batch, the scale ramping from 1 to ``cfg_scale``: linearly,
        or by the power-cosine ramp of ``cfg_power`` (None: the model's
        ``default_cfg_power``; see :func:`common.guided`). ``on_step(step, logits, cells)``
        sees every step's guided logits and the cells they are for.

        ``graphs=True`` (CUDA) captures each distinct step shape in a CUDA graph and replays
        it; ``compile=True`` runs steps through ``torch.compile(fullgraph=True)`` (a callable
        is applied to the step function instead). Both keep their buffers, graphs and
        compiled code on the model for the next call with the same batch, dtype and sampling
        settings (and autocast dtype); the logits ``on_step`` sees under ``graphs`` are
        overwritten by later steps.
        Tokens equal eager generation's for the same generator.
        """
        sampling = Sampling(temperature, top_k, top_p, cfg_scale,
                            cfg_power=self.default_cfg_power if cfg_power is None else cfg_power)
        prefix, batch = condition.guidance(self, labels, sampling.reps)
        device = self.output.weight.device
        if graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs a model on a CUDA device, got {device}")
        schedule, steps = self._default_schedule(schedule, steps,
                                                 self.n_tokens - common.count_known(known))
        plan = common.make_plan(batch, self.n_tokens, self.vocab_size,
                                order=self.default_order if order is None else order,
                                schedule=schedule, steps=steps, known=known,
                                generator=generator, device=device)
        return self._run(plan, prefix, sampling, generator, use_kv_cache=use_kv_cache,
                         graphs=graphs, compile=compile, progress=progress, on_step=on_step)

    def _run(self, plan, prefix, sampling, generator, *, canvas=None, use_kv_cache=True,
             graphs=False, compile=False, progress=False, on_step=None):
        """Runs ``plan`` for the condition ``prefix`` (:class:`condition.Prefix` of the
        ``sampling.reps`` rows per sample that guidance needs) on ``canvas``, or the model's
        own grid for None; returns the tokens in raster order."""
        device = plan.cells.device
        batch = len(plan.cells)
        session = self._session(batch, use_kv_cache, sampling, graphs, compile, canvas,
                                prefix.length)
        schedule = upload(self._schedule(plan, use_kv_cache, prefix.length,
                                         None if canvas is None else canvas.n_tokens), device)
        noise_shape = lambda n: (batch, n, self.vocab_size)
        if graphs:
            session.capture(schedule, noise_shape)
        session.state.load(plan, prefix)
        generator = noise_generator(generator, device)
        for t, step in enumerate(common.with_progress(schedule, progress)):
            logits = session.run(step, noise_shape, generator)
            if on_step is not None and step.n:
                on_step(t, logits, plan.cells[:, step.first:step.first + step.n])
        return common.to_raster(plan.cells, session.state.tokens)

    def _session(self, batch, use_kv_cache, sampling, graphs, compile, canvas=None,
                 prefix_len=1):
        w = self.output.weight  # graphs hold the kernels of the ops backend they captured
        key = (batch, use_kv_cache, sampling, graphs, compile, w.device, w.dtype,
               activation_dtype(w), ops.current_backend(), prefix_len)
        cached = getattr(self, "_generation_session", None)
        if canvas is None and cached is not None and cached[0] == key:
            return cached[1]
        reps, dim = sampling.reps, self.config.dim
        rows = batch * reps
        n = self.n_tokens if canvas is None else canvas.n_tokens
        caches = None
        if use_kv_cache:
            caches = self._new_caches(rows, None if canvas is None else n, prefix_len)
        state = State(torch.full((batch, n), -1, dtype=torch.long, device=w.device),
                      torch.zeros(rows, n, dtype=torch.long, device=w.device),
                      w.new_zeros(rows, prefix_len, dim), caches, reps,
                      *(() if canvas is None else (canvas.angles, canvas.keep)),
                      cls_sets=torch.zeros(rows, prefix_len, dtype=torch.long, device=w.device))
        step = functools.partial(self._step, state, sampling)
        if compile:
            step = compile(step) if callable(compile) else torch.compile(step, fullgraph=True)
        session = Session(state, step, graphs)
        # worth keeping: captures and compiles take seconds
        if canvas is None and (graphs or compile):
            self._generation_session = (key, session)
        return session

    def _kv_caches(self, batch, length, count):
        w, dim = self.output.weight, self.config.dim
        heads = self.config.n_kv_head or self.n_head
        return [KVCache(batch, heads, length, dim // self.n_head, activation_dtype(w), w.device,
                        check=False)
                for _ in range(count)]


def activation_dtype(weight):
    """The dtype of the keys and values a model computes: autocast's while it is on for the
    weights' device (``sample-many``'s bf16), else the weights'. A host-side query: the
    caches are made before any step runs, so steps stay sync-free and capturable."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype
