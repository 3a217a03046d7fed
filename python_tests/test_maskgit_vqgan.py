"""MaskGIT's VQGAN (the official RAR tokenizer): the official file's keys load strictly and
encode/decode as the transcription of the official module (``official_rar.py``) does."""
import pytest
import torch
from safetensors.torch import save_file

import official_rar
from sarkernels.tokenizers import MaskGITVQGAN, Tokenizer, VQTokenizer, from_config, load_vq

# Widths 32, 32, 64 (the last level changes width, so its blocks have a nin_shortcut), two
# downsamplings: 16x16 pictures, 4x4 codes.
SMALL = dict(ch=32, channel_mult=(1, 1, 2), num_res_blocks=2, z_channels=32, num_embeddings=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the official module in float64, ours loaded from its .bin)."""
    torch.manual_seed(0)
    ref = official_rar.PretrainedTokenizer(**SMALL)
    for name, p in ref.named_parameters():
        gain = "norm" in name and name.endswith("weight")
        torch.nn.init.normal_(p, mean=float(gain), std=0.3 if "embedding" in name else 0.1)
    path = tmp_path_factory.mktemp("vq") / "maskgit-vqgan-tiny.bin"
    torch.save(ref.state_dict(), path)  # maskgit-vqgan-imagenet-f16-256.bin is a state_dict
    return ref.eval().double(), MaskGITVQGAN.from_checkpoint(str(path), image_size=16)


def test_loads_strictly_with_its_sizes_from_the_tensors(pair, tmp_path):
    ref, ours = pair
    assert ours.settings == dict(codebook_size=64, ch=32, ch_mult=(1, 1, 2), num_res_blocks=2,
                                 z_channels=32, image_size=16)
    assert (ours.vocab_size, ours.grid_size, ours.training) == (64, 4, False)
    assert isinstance(ours, Tokenizer)
    state = ours.state_dict()
    assert list(state) == list(ref.state_dict())
    assert all(torch.equal(state[k].double(), v) for k, v in ref.state_dict().items())
    save_file({k: v.float() for k, v in ref.state_dict().items()}, tmp_path / "vq.safetensors")
    assert isinstance(load_vq(str(tmp_path / "vq.safetensors"), 16), MaskGITVQGAN)


def test_encode_and_decode_equal_the_official_module(pair):
    ref, ours = pair
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    codes = ref.encode(images.double())
    assert codes.unique().numel() > 4  # the test sees more than one code
    assert torch.equal(ours.double().encode(images.double()), codes)
    ours.float()
    assert torch.equal(ours.encode(images), codes)
    pictures = ref.decode(codes)
    assert 0 < pictures.mean() < 1 and pictures.std() > 0.05  # not clamped flat
    torch.testing.assert_close(ours.decode(codes).double(), pictures, atol=1e-5, rtol=1e-5)
    # a round trip through both: codes -> pictures -> codes
    assert torch.equal(ours.encode(ours.decode(codes)), ref.encode(pictures))
    wide = ours.decode(torch.cat([codes, codes], 1), (4, 8))
    assert wide.shape == (3, 3, 16, 32)


def test_config_rebuilds_it(pair):
    _, ours = pair
    images = torch.rand(2, 3, 16, 16)
    handle = from_config(ours.config())
    assert isinstance(handle, Tokenizer) and handle.name == "maskgit-vq"
    assert (handle.vocab_size, handle.grid_size) == (64, 4)
    assert torch.equal(handle.encode(images), ours.encode(images))


def test_the_official_size_has_the_official_keys():
    with torch.device("meta"):
        ref, ours = official_rar.PretrainedTokenizer(), MaskGITVQGAN()
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)
    assert (ours.vocab_size, ours.grid_size) == (1024, 16)
    print(f"MaskGIT VQGAN: {sum(p.numel() for p in ours.parameters()):,} parameters")


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a readable VQ checkpoint"):
        MaskGITVQGAN.from_checkpoint(str(tmp_path / "junk.bin"))
    with pytest.raises(ValueError, match="VQ checkpoint .* does not exist"):
        MaskGITVQGAN.from_checkpoint(str(tmp_path / "missing.bin"))
    llamagen = VQTokenizer(codebook_size=16, codebook_embed_dim=8, ch=32, ch_mult=(1, 2),
                           z_channels=32, num_res_blocks=1, image_size=16)
    torch.save({"model": llamagen.state_dict()}, tmp_path / "llamagen.pt")
    with pytest.raises(ValueError, match="not a MaskGIT VQGAN checkpoint"):
        MaskGITVQGAN.from_checkpoint(str(tmp_path / "llamagen.pt"))
    assert isinstance(load_vq(str(tmp_path / "llamagen.pt"), 16), VQTokenizer)
    state = MaskGITVQGAN(**dict(codebook_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                z_channels=32)).state_dict()
    del state["decoder.conv_out.bias"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match="does not match the MaskGIT VQGAN architecture"):
        MaskGITVQGAN.from_checkpoint(str(tmp_path / "partial.bin"), image_size=16)
