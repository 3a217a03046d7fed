"""MaskGIT's VQGAN, the tokenizer of the official RAR models (256x256 RGB <-> 16x16 codes of
a 1024 x 256 codebook), with the keys and shapes of ``maskgit-vqgan-imagenet-f16-256.bin``
(bytedance/1d-tokenizer ``modeling/modules/maskgit_vqgan.py``, as ``PretrainedTokenizer``
holds it), so the official file loads strictly. A :class:`~.protocol.Tokenizer`: images in
[0, 1] on both sides, which is also the official model's own range.

Unlike LlamaGen's VQ it has no attention layers, bias-free convolutions in the residual
blocks, average-pool downsampling, no quant convs and an unnormalised codebook; and, as in
MaskGIT's original code, a block that changes width adds its 1x1 ``nin_shortcut`` of its
OWN OUTPUT, not of its input, as the residual.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .vq import Loaded, _grid_size

def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _conv(c_in, c_out, k, bias=True):
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)  # "same" padding, stride 1


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), _conv(c_in, c_out, 3, bias=False)
        self.norm2, self.conv2 = _norm(c_out), _conv(c_out, c_out, 3, bias=False)
        if c_in != c_out:
            self.nin_shortcut = _conv(c_out, c_out, 1, bias=False)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.nin_shortcut(h) if hasattr(self, "nin_shortcut") else x)


class Level(nn.Module):
    """Res blocks at one resolution (``block``), then the encoder's 2x average pool or the
    decoder's nearest 2x upsampling and ``upsample_conv`` (the official key names)."""

    def __init__(self, c_in, c_out, count, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out)
                                   for i in range(count))
        self.resample = resample
        if resample == "up":
            self.upsample_conv = _conv(c_out, c_out, 3)

    def forward(self, h):
        for res in self.block:
            h = res(h)
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return self.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.conv_in = _conv(3, ch, 3, bias=False)
        widths = [ch * m for m in (1, *ch_mult)]
        last = len(ch_mult) - 1
        self.down = nn.ModuleList(Level(widths[i], widths[i + 1], num_res_blocks,
                                        "down" if i != last else None) for i in range(last + 1))
        self.mid = nn.ModuleList(ResnetBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.norm_out = _norm(widths[-1])
        self.conv_out = _conv(widths[-1], z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for layer in (*self.down, *self.mid):
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``up[i]`` is level i (stored finest first) and runs widest first."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = _conv(z_channels, widths[-1], 3)
        self.mid = nn.ModuleList(ResnetBlock(widths[-1], widths[-1]) for _ in range(num_res_blocks))
        self.up = nn.ModuleList(Level(widths[min(i + 1, len(widths) - 1)], widths[i], num_res_blocks,
                                      "up" if i != 0 else None) for i in range(len(widths)))
        self.norm_out = _norm(widths[0])
        self.conv_out = _conv(widths[0], 3, 3)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in (*self.mid, *reversed(self.up)):
            h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    def __init__(self, codebook_size, dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def nearest(self, z):
        """``z [B, C, h, w]`` -> code indices ``[B, h*w]``: the least squared distance,
        computed as the official ``|z|^2 + |e|^2 - 2 z.e``."""
        flat = z.permute(0, 2, 3, 1).flatten(0, 2)
        book = self.embedding.weight
        dist = torch.addmm(flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1), flat, book.T,
                           alpha=-2.0)
        return dist.argmin(1).view(z.shape[0], -1)


class MaskGITVQGAN(Loaded, nn.Module):
    """A :class:`~.protocol.Tokenizer`: ``encode(images [B, 3, H, W] in [0, 1]) -> codes
    [B, h*w]``, ``decode(codes) -> images in [0, 1]`` (clamped, as the official decode).
    The defaults are the official file's sizes; ``from_checkpoint`` reads
    ``maskgit-vqgan-imagenet-f16-256.bin`` (a state_dict, loaded with ``weights_only=True``)
    or a ``.safetensors`` with its keys, the sizes from the tensors."""

    name = "maskgit-vq"
    kind = "MaskGIT VQGAN"
    KEY = "encoder.down.0.block.0.conv1.weight"  # LlamaGen's encoder has conv_blocks

    def __init__(self, codebook_size=1024, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 z_channels=256, image_size=256):
        super().__init__()
        self.settings = dict(codebook_size=codebook_size, ch=ch, ch_mult=tuple(ch_mult),
                             num_res_blocks=num_res_blocks, z_channels=z_channels,
                             image_size=image_size)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = Codebook(codebook_size, z_channels)
        self.vocab_size = codebook_size
        self.grid_size = _grid_size(image_size, ch_mult)
        self.checkpoint_path = None

    @staticmethod
    def _architecture(state):
        """The arguments of the tokenizer a state_dict's shapes describe."""
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        return dict(
            codebook_size=state["quantize.embedding.weight"].shape[0], ch=ch,
            ch_mult=tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch
                          for i in levels),
            num_res_blocks=len({k.split(".")[4] for k in state
                                if k.startswith("encoder.down.0.block.")}),
            z_channels=state["encoder.conv_out.weight"].shape[0])

    @torch.no_grad()
    def encode(self, images):
        """``images [B, 3, H, W]`` in [0, 1] -> codes ``[B, h*w]``."""
        return self.quantize.nearest(self.encoder(images))

    @torch.no_grad()
    def decode(self, codes, grid=None):
        """codes ``[B, h*w]`` -> images ``[B, 3, H, W]`` in [0, 1]; ``grid = (h, w)`` for
        another code grid than ``grid_size``."""
        h, w = grid if grid is not None else (self.grid_size, self.grid_size)
        z = self.quantize.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(z).clamp(0, 1)

