"""LlamaGen VQ tokenizer: weight compatibility, quantisation, and the image-folder path
tokenize -> train -> sample."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sarkernels.tokenizers import VQTokenizer

SMALL = dict(codebook_size=64, codebook_embed_dim=8, ch=32, ch_mult=(1, 2), z_channels=32,
             num_res_blocks=1, image_size=16)
KEYS = os.path.join(os.path.dirname(__file__), "data", "llamagen_vq16_keys.txt")


def small_vq():
    torch.manual_seed(0)
    return VQTokenizer(**SMALL).eval()


# The codes of consistent_vq(): well-separated directions in the first 3 of 8 dimensions.
DIRECTIONS = torch.cat([torch.eye(3), -torch.eye(3),
                        torch.tensor([[x, y, z] for x in (1, -1) for y in (1, -1) for z in (1, -1)],
                                     dtype=torch.float32) / 3 ** 0.5])


@torch.no_grad()
def consistent_vq():
    """A VQ whose decoder and encoder invert each other on the codebook, by construction:
    residual branches and attention outputs are zero (identities); 3x3 convolutions use only
    their centre tap (one cell per pixel); each value v travels as the channel pair (v, -v),
    so GroupNorm's mean is zero and it only scales the whole image, and the pair leaves
    ``silu(v) - silu(-v) = v`` exactly. Decoding a code gives its direction as RGB (scaled
    within [-1, 1]); encoding reads the direction back, and the nearest code is itself."""
    vq = VQTokenizer(codebook_size=len(DIRECTIONS), codebook_embed_dim=8, ch=6, ch_mult=(1,),
                     z_channels=3, num_res_blocks=1, image_size=8).eval()
    for name, p in vq.named_parameters():
        if ".conv2." in name or ".proj_out." in name or name.endswith("bias"):
            p.zero_()
    eye, pair = torch.eye(3), torch.cat([torch.eye(3), -torch.eye(3)])  # v -> (v, -v)

    def centre(conv, w):
        conv.weight.zero_()
        conv.weight[:, :, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = w

    centre(vq.encoder.conv_in, pair)
    centre(vq.encoder.conv_out, torch.cat([eye, -eye], 1))
    centre(vq.quant_conv, torch.cat([eye, torch.zeros(5, 3)]))
    centre(vq.post_quant_conv, torch.cat([eye, torch.zeros(3, 5)], 1))
    centre(vq.decoder.conv_in, pair)
    centre(vq.decoder.conv_out, torch.cat([eye, -eye], 1) / 2)  # |v| <= sqrt(3) / 2: no clamp
    vq.quantize.embedding.weight.copy_(torch.cat([DIRECTIONS, torch.zeros(len(DIRECTIONS), 5)], 1))
    return vq


def test_round_trip_shapes_and_code_range():
    vq = small_vq()
    images = torch.rand(3, 3, 16, 16)
    codes = vq.encode(images)
    assert codes.shape == (3, 64) and vq.grid_size == 8
    assert codes.min() >= 0 and codes.max() < 64
    out = vq.decode(codes)
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    assert vq.to_uint8(out).shape == (3, 16, 16, 3)
    pil = vq.to_pil(out)
    assert pil[0].size == (16, 16) and pil[0].mode == "RGB"
    back = vq.from_pil(pil, 16)  # uint8 round trip: within half a level
    assert (back - out).abs().max() <= 0.5 / 255 + 1e-6


def test_nearest_code_matches_brute_force_on_unit_sphere():
    vq = small_vq()
    z = torch.randn(2, 8, 5, 7)
    codes = vq.quantize.nearest(z)
    book = F.normalize(vq.quantize.embedding.weight, dim=-1)
    torch.testing.assert_close(vq.quantize.codebook().norm(dim=-1), torch.ones(64))
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    brute = torch.tensor([min(range(64), key=lambda j: ((v - book[j]) ** 2).sum().item()) for v in flat])
    assert torch.equal(codes.flatten(), brute)


def test_decode_then_encode_gives_the_codes_back():
    vq, n = consistent_vq(), len(DIRECTIONS)
    codes = torch.randint(0, n, (2, 64))
    images = vq.decode(codes)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(vq.encode(images), codes)
    torch.testing.assert_close(vq.decode(codes.clone()), images)
    assert not torch.equal(vq.decode(codes[:1]), vq.decode((codes[:1] + 1) % n))
    x = torch.rand(2, 3, 8, 8)  # images -> codes -> images -> the same codes
    assert torch.equal(vq.encode(vq.decode(vq.encode(x))), vq.encode(x))
    # LlamaGen's [-1, 1] forms are the same maps
    torch.testing.assert_close(vq.decode_code(codes), images * 2 - 1)
    torch.testing.assert_close(vq.decode_code(codes, (2, 8, 8, 8)), images * 2 - 1)
    assert torch.equal(vq.encode_code(images * 2 - 1), codes)


def official_state():
    state = {}
    for line in open(KEYS):
        name, shape = line.split(" ", 1)
        state[name] = torch.randn(eval(shape))  # "(128, 3, 3, 3)" -> tuple
    return state


@pytest.mark.slow
def test_full_vq16_loads_official_key_pattern_strictly(tmp_path):
    state = official_state()
    assert len(state) == 344
    vq = VQTokenizer.from_preset("VQ-16")
    assert sum(p.numel() for p in vq.parameters()) == 71_883_403
    vq.load_state_dict(state, strict=True)
    assert vq.grid_size == 16
    torch.save({"model": state}, tmp_path / "vq.pt")
    loaded = VQTokenizer.from_checkpoint(str(tmp_path / "vq.pt"))
    assert loaded.settings["ch_mult"] == (1, 1, 2, 2, 4) and loaded.grid_size == 16
    assert torch.equal(loaded.quantize.embedding.weight, state["quantize.embedding.weight"])
    assert torch.equal(loaded.quantize.codebook_used, state["quantize.codebook_used"])


def test_bad_checkpoints_give_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable VQ checkpoint"):
        VQTokenizer.from_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LlamaGen VQ checkpoint"):
        VQTokenizer.from_checkpoint(str(tmp_path / "other.pt"))
    state = small_vq().state_dict()
    del state["decoder.conv_out.bias"]
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="does not match"):
        VQTokenizer.from_checkpoint(str(tmp_path / "partial.pt"), image_size=16)
    with pytest.raises(ValueError, match="does not exist"):
        VQTokenizer.from_checkpoint(str(tmp_path / "missing.pt"))


def cli(*args):
    res = subprocess.run([sys.executable, "-m", "sarkernels", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_tokenize_train_sample_on_an_image_folder(tmp_path):
    from PIL import Image

    vq = small_vq()
    save_file(vq.state_dict(), tmp_path / "vq.safetensors")
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cats", "dogs"]):
        os.makedirs(tmp_path / "images" / name)
        for i in range(3):
            pixels = (torch.rand(20, 24, 3, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    cli("tokenize", "--images", str(tmp_path / "images"), "--vq", str(tmp_path / "vq.safetensors"),
        "--image-size", "16", "--out", str(tmp_path / "tok"), "--batch", "4", "--flip", "--no-progress")
    parts = sorted(os.listdir(tmp_path / "tok"))
    assert parts == ["meta.json", "part-000000.safetensors", "part-000001.safetensors"]
    os.remove(tmp_path / "tok" / "part-000001.safetensors")  # interrupted: resume finishes it
    from sarkernels.app.data import load_token_folder
    with pytest.raises(ValueError, match="incomplete"):
        load_token_folder(str(tmp_path / "tok"))
    cli("tokenize", "--images", str(tmp_path / "images"), "--vq", str(tmp_path / "vq.safetensors"),
        "--image-size", "16", "--out", str(tmp_path / "tok"), "--batch", "4", "--flip", "--no-progress")
    data = load_token_folder(str(tmp_path / "tok"))
    assert data.tokens.shape == (12, 64) and data.labels.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1]
    want = vq.encode(vq.from_pil([Image.open(tmp_path / "images" / "cats" / "0.png")]))
    assert torch.equal(data.tokens[0], want[0])

    cli("train", "--model", "randar", "--data", str(tmp_path / "tok"), "--steps", "2", "--dim", "32",
        "--heads", "2", "--layers", "1", "--batch", "4", "--out", str(tmp_path / "run"), "--no-progress")
    cli("sample", "--ckpt", str(tmp_path / "run"), "--labels", "0,1", "--out", str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").mode == "RGB"


def test_sample_official_randar_checkpoint_to_pictures(tmp_path):
    from PIL import Image

    from sarkernels.models import RandARTransformer

    torch.manual_seed(0)
    vq = small_vq()
    save_file(vq.state_dict(), tmp_path / "vq.safetensors")
    randar = RandARTransformer(vocab_size=64, num_classes=5, grid_size=8, dim=64, n_layer=2, n_head=4)
    save_file(randar.state_dict(), tmp_path / "randar.safetensors")  # the official key pattern
    from sarkernels.app import checkpoint
    loaded = checkpoint.load_official(str(tmp_path / "randar.safetensors"), n_head=4, grid_size=8)
    for k, v in randar.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert loaded.config.multiple_of == 256 and loaded.num_classes == 5
    with pytest.raises(checkpoint.CheckpointError, match="key pattern"):
        save_file({"x": torch.zeros(1)}, tmp_path / "junk.safetensors")
        checkpoint.load_official(str(tmp_path / "junk.safetensors"))
    res = subprocess.run([sys.executable, "-m", "sarkernels", "sample", "--model", "randar", "--ckpt",
                          str(tmp_path / "randar.safetensors"), "--heads", "4", "--out",
                          str(tmp_path / "g.png")], capture_output=True, text=True)
    assert res.returncode == 2 and "pass --vq" in res.stderr
    cli("sample", "--model", "randar", "--ckpt", str(tmp_path / "randar.safetensors"), "--heads", "4",
        "--vq", str(tmp_path / "vq.safetensors"), "--image-size", "16", "--labels", "0,4",
        "--cfg", "2", "--out", str(tmp_path / "official.png"))
    assert Image.open(tmp_path / "official.png").mode == "RGB"
    tokens = loaded.generate(torch.tensor([0, 4]), generator=torch.Generator().manual_seed(0))
    images = vq.decode(tokens)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    from sarkernels.app.sample import image_grid
    image_grid([list(images)], tmp_path / "pictures.png")
    assert Image.open(tmp_path / "pictures.png").mode == "RGB"


def test_tokenize_leaves_out_an_unreadable_image_and_names_it(tmp_path, capsys):
    from PIL import Image

    from sarkernels.__main__ import main
    from sarkernels.app.data import load_token_folder

    save_file(small_vq().state_dict(), tmp_path / "vq.safetensors")
    for name in ("cats", "dogs"):
        os.makedirs(tmp_path / "images" / name)
        Image.new("RGB", (20, 24), "white").save(tmp_path / "images" / name / "0.png")
    bad = tmp_path / "images" / "cats" / "1.png"
    bad.write_bytes(b"not a picture")
    tok = tmp_path / "tok"
    args = ["tokenize", "--images", str(tmp_path / "images"), "--vq", str(tmp_path / "vq.safetensors"),
            "--image-size", "16", "--out", str(tok), "--batch", "2", "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().err.startswith(f"left out 1 unreadable image(s): {bad} "
                                              "(UnidentifiedImageError: ")
    assert load_token_folder(str(tok)).labels.tolist() == [0, 1]
    os.remove(tok / "part-000001.safetensors")  # interrupted after the chunk holding it
    assert main(args) == 0
    assert f"left out 1 unreadable image(s): {bad}" in capsys.readouterr().err
    assert load_token_folder(str(tok)).labels.tolist() == [0, 1]
