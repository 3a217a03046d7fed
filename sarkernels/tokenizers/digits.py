"""The digits tokenizer: one token per pixel intensity level of scikit-learn's 8x8
handwritten digits (bright ink on black)."""
import torch
import torch.nn.functional as F

LEVELS = 17  # the digits' pixel intensities are integers 0..16
SIDE = 8  # the digits' pixels per side


def grey(picture, side):
    """A PIL picture as ``[side, side]`` intensities in [0, 1] (resized bilinearly)."""
    from PIL import Image

    img = picture.convert("L").resize((side, side), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.float().view(side, side) / 255


class DigitsTokenizer:
    """Pixel intensity level (0..16) as the token; ``grid=16`` upsamples 8x8 images
    bilinearly and re-quantises to the same 17 levels (256 tokens, ImageNet-VQ length).
    A :class:`~.protocol.Tokenizer`: grey images ``[B, 1, H, W]`` in [0, 1] both ways."""

    name = "digits"
    vocab_size = LEVELS

    def __init__(self, grid=8):
        if grid not in (8, 16):
            raise ValueError(f"digits grid must be 8 or 16, got {grid}")
        self.grid_size = grid

    def encode(self, images):
        """Grey ``images [B, 1, H, W]`` in [0, 1] (8x8 as the data is; resized bilinearly
        to the grid otherwise) -> tokens ``[B, grid * grid]``."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"images must be grey [B, 1, H, W] in [0, 1], got shape {list(x.shape)}")
        x = x * (LEVELS - 1)
        if x.shape[-2:] != (self.grid_size,) * 2:
            x = F.interpolate(x, size=(self.grid_size,) * 2, mode="bilinear", align_corners=False)
        return x.round().clamp(0, LEVELS - 1).long().flatten(1)

    def decode(self, tokens, grid=None):
        """tokens -> grey images ``[B, 1, grid, grid]`` in [0, 1]; ``grid = (H, W)`` for
        another token grid than the tokenizer's (a resolution-extrapolated sample)."""
        h, w = grid or (self.grid_size, self.grid_size)
        return (tokens.float() / (LEVELS - 1)).view(-1, 1, h, w)

    def from_pil(self, pictures):
        """PIL pictures -> grey ``[B, 1, 8, 8]`` in [0, 1], read as the data looks."""
        return torch.stack([grey(p, SIDE) for p in pictures])[:, None]

    def config(self):
        return {"name": self.name, "grid": self.grid_size}
