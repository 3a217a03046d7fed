"""LlamaGen's VQ image tokenizer (VQ-16: 256x256 RGB <-> 16x16 codes of a 16384 x 8
l2-normalised codebook), with the official state_dict keys and shapes, so
``load_state_dict(official["model"], strict=True)`` works. Both classes here are
:class:`~.protocol.Tokenizer` (images in [0, 1]); LlamaGen's [-1, 1] has its own names."""
import os

import torch
from torch import nn
from torch.nn import functional as F

PRESETS = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
}


def _architecture(state):
    """VQTokenizer arguments read from a state_dict's shapes."""
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks.")})
    return dict(
        codebook_size=state["quantize.embedding.weight"].shape[0],
        codebook_embed_dim=state["quantize.embedding.weight"].shape[1], ch=ch,
        ch_mult=tuple(state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch
                      for i in levels),
        z_channels=state["encoder.conv_out.weight"].shape[0],
        num_res_blocks=len({k.split(".")[4] for k in state
                            if k.startswith("encoder.conv_blocks.0.res.")}))


def _norm(c):
    return nn.GroupNorm(32 if c % 32 == 0 else 1, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over the h*w positions, 1x1 projections."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # scale c^-0.5
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: res blocks (each followed by attention where present), then the
    resampling layer, stored as ``downsample`` or ``upsample`` (the official key names)."""

    def __init__(self, res, attn=False, resample=None, resample_name=None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(AttnBlock(r.conv2.out_channels) for r in res) if attn else nn.ModuleList()
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h):
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self.resample_name)(h) if self.resample_name else h


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        c_in, last = ch, len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            res = []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(c_in, ch * mult))
                c_in = ch * mult
            self.conv_blocks.append(Level(res, i == last, Downsample(c_in) if i != last else None,
                                          "downsample"))
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)])
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)])
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(reversed(ch_mult)):  # stored widest level first
            res = []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(c_in, ch * mult))
                c_in = ch * mult
            self.conv_blocks.append(Level(res, i == 0,
                                          Upsample(c_in) if i != len(ch_mult) - 1 else None,
                                          "upsample"))
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)
        self.register_buffer("codebook_used", torch.zeros(65536))  # kept for weight compatibility

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z):
        """``z [B, C, h, w]`` -> code indices ``[B, h*w]`` (l2-normalised, squared distance)."""
        flat = F.normalize(z.permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
        book = self.codebook()
        dist = (flat ** 2).sum(1, keepdim=True) + (book ** 2).sum(1) - 2 * flat @ book.T
        return dist.argmin(1).view(z.shape[0], -1)


def _from_pil(pictures, size):
    """PIL pictures -> RGB ``[B, 3, size, size]`` in [0, 1] (resize the shorter side
    bicubically, center crop)."""
    import numpy as np

    out = []
    for img in pictures:
        img = img.convert("RGB")
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         resample=3)  # bicubic
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def read_state(path, what):
    """What ``path`` holds (safetensors, or torch's format read with ``weights_only=True``),
    or a ValueError saying it is no readable ``what``."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the user's bad path
        # torch's first line says what failed; the rest is weights_only advice
        raise ValueError(f"{path!r} is not a readable {what}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _grid_size(image_size, ch_mult):
    return image_size // 2 ** (len(ch_mult) - 1)


class Loaded:
    """What both VQ tokenizers share: built from a state_dict's shapes (``_architecture``)
    and loaded strictly, and their ``config()``. A subclass names its ``kind`` and a
    ``KEY`` only its files have."""

    @classmethod
    def from_checkpoint(cls, path, image_size=256):
        """The tokenizer the weights in ``path`` (safetensors, or torch's format read with
        ``weights_only=True``) load into strictly, in eval mode."""
        return cls.from_state(read_state(path, "VQ checkpoint"), path, image_size)

    @classmethod
    def from_state(cls, state, path, image_size=256):
        """The tokenizer ``state`` (read from ``path``; LlamaGen's ``{"model": state_dict}``
        too) loads into strictly, in eval mode."""
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or cls.KEY not in state:
            raise ValueError(f"{path!r} is not a {cls.kind} checkpoint (no {cls.KEY})")
        try:
            model = cls(**cls._architecture(state), image_size=image_size)
            model.load_state_dict(state, strict=True)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path!r} does not match the {cls.kind} architecture: "
                             f"{str(exc).splitlines()[0]}") from None
        model.checkpoint_path = os.path.abspath(path)
        return model.eval()

    def config(self):
        return {"name": self.name, "checkpoint": self.checkpoint_path, **self.settings,
                "ch_mult": list(self.settings["ch_mult"])}

    def from_pil(self, pictures, size=None):
        """PIL pictures -> ``[B, 3, size, size]`` in [0, 1] (resize the shorter side, center
        crop); ``size`` defaults to the tokenizer's image size."""
        return _from_pil(pictures, size or self.settings["image_size"])


class VQTokenizer(Loaded, nn.Module):
    """A :class:`~.protocol.Tokenizer`: ``encode(images [B, 3, H, W] in [0, 1]) -> codes
    [B, h*w]``, ``decode(codes) -> images [B, 3, H, W] in [0, 1]``.

    LlamaGen works in [-1, 1]: ``encode_code(images in [-1, 1])`` and
    ``decode_code(codes, shape) -> images in [-1, 1]`` (LlamaGen's name and ``shape``;
    ``decode_codes`` is the same). ``from_checkpoint`` reads a LlamaGen ``.pt``
    (``{"model": state_dict}``, loaded with ``weights_only=True``) or a ``.safetensors``
    state_dict, the architecture (VQ-16, VQ-8 or another width/depth) from the tensors'
    shapes."""

    name = "vq"
    kind, KEY = "LlamaGen VQ", "quantize.embedding.weight"
    _architecture = staticmethod(_architecture)

    def __init__(self, codebook_size=16384, codebook_embed_dim=8, ch=128, ch_mult=(1, 1, 2, 2, 4),
                 z_channels=256, num_res_blocks=2, image_size=256):
        super().__init__()
        self.settings = dict(codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim,
                             ch=ch, ch_mult=tuple(ch_mult), z_channels=z_channels,
                             num_res_blocks=num_res_blocks, image_size=image_size)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)
        self.vocab_size = codebook_size
        self.grid_size = _grid_size(image_size, ch_mult)
        self.checkpoint_path = None

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; choose from {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @torch.no_grad()
    def encode_code(self, images):
        """LlamaGen's range: ``images [B, 3, H, W]`` in [-1, 1] -> codes ``[B, h*w]``, the
        nearest codebook entry of each cell of the encoder's output."""
        return self.quantize.nearest(self.quant_conv(self.encoder(images)))

    def encode(self, images):
        """``images [B, 3, H, W]`` in [0, 1] -> codes ``[B, h*w]``."""
        return self.encode_code(images * 2 - 1)

    @torch.no_grad()
    def decode_code(self, codes, shape=None):
        """LlamaGen's range: codes ``[B, h*w]`` -> images ``[B, 3, H, W]`` in [-1, 1].
        ``shape`` ends with the code grid ``(h, w)`` (LlamaGen passes ``(B, C, h, w)``);
        the square ``grid_size`` when None."""
        h, w = shape[-2:] if shape is not None else (self.grid_size, self.grid_size)
        z = self.quantize.codebook()[codes].view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)

    decode_codes = decode_code  # the name sarkernels documented first

    def decode(self, codes, grid=None):
        """codes ``[B, h*w]`` -> images ``[B, 3, H, W]`` in [0, 1]; ``grid = (h, w)`` for
        another code grid than ``grid_size``."""
        return (self.decode_code(codes, grid) + 1) / 2

    @staticmethod
    def to_uint8(images):
        """Images in [0, 1] -> uint8 ``[B, H, W, 3]`` (rounded, clamped)."""
        return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    @classmethod
    def to_pil(cls, images):
        """Images in [0, 1] -> a list of RGB PIL pictures."""
        from PIL import Image

        return [Image.fromarray(x.cpu().numpy(), "RGB") for x in cls.to_uint8(images)]


class VQHandle:
    """A VQ tokenizer known by its config (as stored with token folders and checkpoints), a
    :class:`~.protocol.Tokenizer` like the tokenizer it names; the weights are read from
    ``config["checkpoint"]`` by ``load(path, image_size)`` (LlamaGen's VQ by default) on the
    first encode/decode."""

    def __init__(self, config, load=None):
        self._config = dict(config)
        self.name = config["name"]
        self._load = load or VQTokenizer.from_checkpoint
        self.vocab_size = config["codebook_size"]
        self.grid_size = _grid_size(config["image_size"], config["ch_mult"])
        self._model = None

    def config(self):
        return dict(self._config)

    def model(self, path=None):
        if self._model is None:
            path = path or self._config.get("checkpoint")
            if not path:
                raise ValueError("this VQ tokenizer has no checkpoint path: pass --vq")
            self._model = self._load(path, self._config["image_size"])
        return self._model

    def encode(self, images):
        return self.model().encode(images)

    def decode(self, codes, grid=None):
        return self.model().decode(codes, grid)

    def from_pil(self, pictures):
        return _from_pil(pictures, self._config["image_size"])
