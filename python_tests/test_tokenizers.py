"""The tokenizer protocol: the digits tokenizer, the VQ and a VQ known by its config take
and give images in [0, 1] ``[B, C, H, W]``, and rebuild from their config."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sarkernels.tokenizers import (DigitsTokenizer, MaskGITVQGAN, Tokenizer, VQHandle, VQTokenizer,
                                  from_config)
from sarkernels.tokenizers.digits import LEVELS

SMALL = dict(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), z_channels=32,
             num_res_blocks=1, image_size=16)


def small_vq(tmp_path):
    torch.manual_seed(0)
    vq = VQTokenizer(**SMALL).eval()
    save_file(vq.state_dict(), tmp_path / "vq.safetensors")
    return VQTokenizer.from_checkpoint(str(tmp_path / "vq.safetensors"), SMALL["image_size"])


def pictures(n):
    """Black left halves, white right halves, random noise between: the range's both ends."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        pixels = (torch.rand(20, 24, 3, generator=gen) * 255).byte()
        pixels[:, :10], pixels[:, 14:] = 0, 255
        out.append(Image.fromarray(pixels.numpy()))
    return out


def small_maskgit(tmp_path):
    torch.manual_seed(0)
    vq = MaskGITVQGAN(codebook_size=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
                      image_size=16)
    torch.save(vq.state_dict(), tmp_path / "maskgit.bin")
    return MaskGITVQGAN.from_checkpoint(str(tmp_path / "maskgit.bin"), 16)


def tokenizers(tmp_path):
    vq, maskgit = small_vq(tmp_path), small_maskgit(tmp_path)
    return [DigitsTokenizer(8), DigitsTokenizer(16), vq, VQHandle(vq.config()), maskgit,
            from_config(maskgit.config())]


def test_every_tokenizer_has_the_protocol_and_one_image_range(tmp_path):
    for tok in tokenizers(tmp_path):
        assert isinstance(tok, Tokenizer), type(tok)
        images = tok.from_pil(pictures(2))
        assert images.dim() == 4 and images.dtype == torch.float32, tok.name
        assert images.min() == 0 and images.max() == 1, tok.name
        tokens = tok.encode(images)
        assert tokens.shape == (2, tok.grid_size ** 2) and tokens.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < tok.vocab_size
        out = tok.decode(tokens)
        assert out.shape[:2] == images.shape[:2] and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1, tok.name
        wide = tok.decode(torch.cat([tokens, tokens], 1), (tok.grid_size, 2 * tok.grid_size))
        assert wide.shape == (*out.shape[:3], 2 * out.shape[3])  # another token grid
        rebuilt = from_config(tok.config())
        assert type(rebuilt).__name__ in ("DigitsTokenizer", "VQHandle")
        assert (rebuilt.name, rebuilt.vocab_size, rebuilt.grid_size) == \
            (tok.name, tok.vocab_size, tok.grid_size)
        assert torch.equal(rebuilt.encode(images), tokens)
        torch.testing.assert_close(rebuilt.decode(tokens), out)


@pytest.mark.parametrize("grid", [8, 16])
def test_digits_decode_then_encode_gives_the_tokens_back(grid):
    tok = DigitsTokenizer(grid)
    tokens = torch.randint(0, LEVELS, (5, grid * grid))
    images = tok.decode(tokens)
    assert images.shape == (5, 1, grid, grid)
    assert torch.equal(tok.encode(images), tokens)


def test_digits_read_intensity_levels_from_8x8_images():
    levels = torch.randint(0, LEVELS, (3, 8, 8))
    tok = DigitsTokenizer(8)
    assert torch.equal(tok.encode(levels[:, None] / (LEVELS - 1)), levels.flatten(1))
    # grid 16: bilinear upsampling of the level image, re-quantised to the levels
    up = torch.nn.functional.interpolate(levels[:, None].double(), size=(16, 16), mode="bilinear",
                                         align_corners=False)
    assert torch.equal(DigitsTokenizer(16).encode(levels[:, None] / (LEVELS - 1)),
                       up.round().long().flatten(1))
    with pytest.raises(ValueError, match=r"images must be grey \[B, 1, H, W\].*\[3, 8, 8\]"):
        tok.encode(levels / 16)


def test_a_vq_known_by_its_config_loads_its_checkpoint_once(tmp_path):
    vq = small_vq(tmp_path)
    handle = VQHandle(vq.config())
    x = vq.from_pil(pictures(3))
    assert torch.equal(handle.encode(x), vq.encode(x))
    assert handle.model() is handle.model()
    with pytest.raises(ValueError, match="no checkpoint path"):
        VQHandle({**vq.config(), "checkpoint": None}).decode(torch.zeros(1, 64, dtype=torch.long))
