"""The official RAR checkpoints load into sarkernels and sample exactly: small random weights
in the official key layout (made by the transcription of the official code in
``official_rar.py``) are written as the official files are, loaded by
``checkpoint.load_official(kind="rar")``, and compared with the transcription run in
float64: teacher-forced logits (raster and random orders) and greedy generation token for
token, with the official guidance schedule. The full sizes are checked on the meta device."""
import pytest
import torch
from safetensors.torch import save_file

import official_rar
from sarkernels.app import checkpoint
from sarkernels.models import OfficialRAR, OfficialRARConfig

# An MLP width other than 4 x embed_dim, as RAR-XXL's (6144 for 1408).
TINY = dict(embed_dim=64, depth=2, num_heads=4, intermediate_size=160, image_seq_len=16,
            codebook_size=17, num_classes=10)
# The official architecture's parameter counts at README_RAR.md's sizes (16 heads, 256
# tokens, 1024 codes, 1000 classes), counted by hand from modeling/rar.py (the paper's
# table rounds them to 261M, 461M, 955M and 1.5B).
COUNTS = {"B": 260_923_648, "L": 461_668_352, "XL": 955_425_024, "XXL": 1_498_520_704}


def official(seed=0, **over):
    """The official model with every parameter random (LayerNorm gains near 1)."""
    torch.manual_seed(seed)
    m = official_rar.RAR(**{**TINY, **over})
    for name, p in m.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name and name.endswith("weight") else 0.0,
                              std=0.2)
    return m.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(official float64, ours loaded from the official .bin)."""
    ref = official()
    path = tmp_path_factory.mktemp("rar") / "rar_tiny.bin"
    torch.save(ref.state_dict(), path)  # how rar_b.bin .. rar_xxl.bin are stored
    return ref.double(), checkpoint.load_official(str(path), kind="rar")


def test_load_reads_the_size_from_the_tensors_strictly(pair, tmp_path):
    ref, ours = pair
    c = ours.config
    assert (c.dim, c.n_layer, c.n_head, c.intermediate_size, c.grid_size, c.vocab_size,
            c.num_classes) == (64, 2, 4, 160, 4, 17, 10)
    assert not ours.training and c.cfg_power == OfficialRARConfig().cfg_power
    state = ours.state_dict()
    assert list(state) == list(ref.state_dict())  # the official keys, in the official order
    assert all(torch.equal(state[k].double(), v) for k, v in ref.state_dict().items())
    save_file({k: v.float().contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "rar.safetensors")
    again = checkpoint.load_official(str(tmp_path / "rar.safetensors"), kind="rar")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("random_order", [False, True])
def test_teacher_forced_logits_equal_the_official_forward(pair, random_order):
    ref, ours = pair
    gen = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, 17, (3, 16), generator=gen), torch.tensor([0, 4, 9])
    order = torch.stack([torch.randperm(16, generator=gen) for _ in range(3)]) if random_order \
        else None
    # the official forward: class ids offset into the shared table, N + 1 slots (the last
    # predicts nothing), and the tokens given in raster order, shuffled by ``orders``
    expected = ref.forward_fn(tokens, ref.preprocess_condition(labels), orders=order)[:, :-1]
    torch.testing.assert_close(ours(tokens, labels, order).double(), expected,
                               atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.double()(tokens, labels, order), expected,
                               atol=1e-11, rtol=1e-11)
    ours.float()
    assert expected.abs().amax() > 1 and (expected[:, 1:] - expected[:, :-1]).abs().amax() > 0.1


# Powers whose ramp decodes other tokens than half a power more within 16 tokens (0: the
# constant scale).
@pytest.mark.parametrize("scale,power,temperature", [(3.0, 0.5, 1.02), (4.0, 0.0, 1.0),
                                                     (0.0, 1.5, 1.0)])
@pytest.mark.parametrize("cache", [True, False])
def test_greedy_generation_equals_the_official_made_greedy(pair, scale, power, temperature, cache):
    ref, ours = pair
    labels = torch.tensor([1, 7, 3])
    expected = ref.generate(labels, scale, temperature, power, kv_cache=cache)
    # the official guidance_scale 0 turns guidance off: ours says so with None
    tokens = ours.generate(labels, cfg_scale=scale or None, cfg_power=power,
                           temperature=temperature, top_k=1, use_kv_cache=cache)
    assert torch.equal(tokens, expected)
    if scale:  # the schedule matters: another power decodes other tokens
        other = ours.double().generate(labels, cfg_scale=scale, cfg_power=power + 0.5,
                                       temperature=temperature, top_k=1)
        ours.float()
        assert not torch.equal(other, expected)


def test_default_power_and_order_are_the_official_ones(pair):
    _, ours = pair
    labels = torch.tensor([2, 5])
    greedy = lambda **kw: ours.generate(labels, cfg_scale=3.0, top_k=1, **kw)
    assert torch.equal(greedy(), greedy(cfg_power=ours.config.cfg_power, order="raster"))
    assert not torch.equal(greedy(), greedy(cfg_power=0.5))


@pytest.mark.parametrize("name", list(OfficialRARConfig.PRESETS))
def test_every_official_size_loads_strictly_on_meta(name):
    c = OfficialRARConfig.PRESETS[name]
    with torch.device("meta"):
        ref = official_rar.RAR(c["dim"], c["n_layer"], 16, c["intermediate_size"], 256, 1024, 1000)
    model = checkpoint.official_model(ref.state_dict(), "rar", what=name)
    assert model.config == OfficialRARConfig.from_preset(name)
    count = sum(p.numel() for p in model.parameters())
    print(f"RAR-{name}: {count:,} parameters")
    assert count == sum(p.numel() for p in ref.parameters()) == COUNTS[name]


def test_bad_official_files_give_clear_errors(pair, tmp_path):
    ref, _ = pair
    (tmp_path / "junk.bin").write_bytes(b"not torch")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable weights file"):
        checkpoint.load_official(str(tmp_path / "junk.bin"), kind="rar")
    randar_like = {"tok_embeddings.weight": torch.zeros(17, 64)}
    with pytest.raises(checkpoint.CheckpointError, match="RAR's official key pattern"):
        checkpoint.official_model(randar_like, "rar")
    state = ref.state_dict()
    with pytest.raises(checkpoint.CheckpointError, match="n_head 16 was asked for.*n_head 4"):
        checkpoint.official_model(state, "rar", n_head=16)
    with pytest.raises(checkpoint.CheckpointError, match="grid_size 16 was asked for.*grid_size 4"):
        checkpoint.official_model(state, "rar", grid_size=16)
    with pytest.raises(checkpoint.CheckpointError, match="missing.*timesteps_embeddings"):
        checkpoint.official_model({k: v for k, v in state.items() if k != "timesteps_embeddings"},
                                  "rar")
    with pytest.raises(checkpoint.CheckpointError, match="not a square grid"):
        checkpoint.official_model({**state, "pos_embed": torch.zeros(1, 1024 + 15, 64)}, "rar")
    with pytest.raises(ValueError, match="kind must be 'randar' or 'rar', got 'sar'"):
        checkpoint.official_model(state, "sar")
    with pytest.raises(ValueError, match="cond_dim must be None, got 8"):
        OfficialRAR(cond_dim=8)


def test_sample_command_draws_official_weights_with_their_tokenizer(tmp_path, capsys):
    from PIL import Image

    from sarkernels.app.cli import main
    from test_maskgit_vqgan import SMALL as VQ

    torch.save(official(codebook_size=64).state_dict(), tmp_path / "rar_tiny.bin")
    torch.save(official_rar.PretrainedTokenizer(**VQ).state_dict(), tmp_path / "vq.bin")
    common = ["sample", "--model", "rar", "--ckpt", str(tmp_path / "rar_tiny.bin"), "--vq",
              str(tmp_path / "vq.bin"), "--image-size", "16", "--labels", "0,4"]
    assert main(common + ["--cfg", "2", "--cfg-power", "1.5", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").mode == "RGB" and "wrote" in capsys.readouterr().out
    torch.save(official().state_dict(), tmp_path / "rar_17.bin")  # 17 codes, the VQ has 64
    assert main([*common[:4], str(tmp_path / "rar_17.bin"), *common[5:]]) == 2
    assert "a 17-code vocabulary but --vq" in capsys.readouterr().err
    assert main(common + ["--cfg-power", "-1"]) == 2
    assert "cfg_power must be >= 0" in capsys.readouterr().err
    assert main([*common[:2], "randar", *common[3:]]) == 2
    assert "RandAR's official key pattern" in capsys.readouterr().err


def test_our_trainer_trains_the_official_architecture_and_sample_draws_it(tmp_path, capsys):
    from sarkernels.app.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--model", "rar-official", "--steps", "3", "--dim", "32", "--heads",
                 "2", "--layers", "1", "--batch", "8", "--out", run, "--no-progress"]) == 0
    model, config, _ = checkpoint.load(run)
    assert isinstance(model, OfficialRAR) and config["model"] == "rar-official"
    assert main(["sample", "--ckpt", run, "--labels", "0,1", "--cfg", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert "ar from" in capsys.readouterr().out
