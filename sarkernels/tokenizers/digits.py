"""The digits tokenizer: one token per pixel intensity level of scikit-learn's 8x8
handwritten digits."""
import torch
import torch.nn.functional as F

LEVELS = 17  # the digits' pixel intensities are integers 0..16


class DigitsTokenizer:
    """Pixel intensity level (0..16) as the token; ``grid=16`` upsamples 8x8 images
    bilinearly and re-quantises to the same 17 levels (256 tokens, ImageNet-VQ length)."""

    name = "digits"
    vocab_size = LEVELS

    def __init__(self, grid=8):
        if grid not in (8, 16):
            raise ValueError(f"digits grid must be 8 or 16, got {grid}")
        self.grid_size = grid

    def encode(self, images):
        """``images [B, 8, 8]`` with values in 0..16 -> tokens ``[B, grid * grid]``."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if self.grid_size != 8:
            x = F.interpolate(x[:, None], size=(self.grid_size,) * 2, mode="bilinear",
                              align_corners=False)[:, 0]
        return x.round().clamp(0, LEVELS - 1).long().flatten(1)

    def decode(self, tokens):
        """tokens -> grey images ``[B, 1, grid, grid]`` in [0, 1]."""
        return (tokens.float() / (LEVELS - 1)).view(-1, 1, self.grid_size, self.grid_size)

    def config(self):
        return {"name": self.name, "grid": self.grid_size}
