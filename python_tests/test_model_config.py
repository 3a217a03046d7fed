"""Model configs: one dataclass per family, presets, and the dict form checkpoints store."""
import json
import re
from dataclasses import asdict

import pytest
import torch

from sarkernels.models import (MODELS, DecoderOnlyConfig, OfficialRARConfig, RandARTransformer,
                               RARConfig, RARTransformer, SARConfig, SARTransformer)

SMALL = dict(vocab_size=17, num_classes=10, grid_size=4, dim=32, n_head=4, n_kv_head=2,
             multiple_of=32, class_dropout=0.2, dropout=0.05)
CONFIGS = {
    "sar": SARConfig(encoder_layers=2, decoder_layers=1, train_order="raster",
                     train_schedule="cosine", train_steps="2-4", **SMALL),
    "randar": DecoderOnlyConfig(n_layer=2, token_dropout=0.3, **SMALL),
    "rar": RARConfig(n_layer=2, anneal=[0.1, 0.6], **SMALL),
    "rar-official": OfficialRARConfig(n_layer=2, anneal=[0.2, 0.7], cfg_power=1.5,
                                      **{**SMALL, "n_kv_head": None}),
}


def build(kind, *args, **kwargs):
    torch.manual_seed(0)
    return MODELS[kind](*args, **kwargs)


@pytest.mark.parametrize("kind", list(MODELS))
def test_config_survives_json_and_rebuilds_the_same_model(kind):
    cfg = CONFIGS[kind]
    stored = json.loads(json.dumps(asdict(cfg)))  # as config.json holds it
    model, rebuilt = build(kind, cfg), build(kind, **stored)
    assert model.config == cfg and rebuilt.config == cfg
    assert type(rebuilt.config) is MODELS[kind].config_class
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fields_are_normalised_as_checkpoints_store_them():
    assert CONFIGS["rar"].anneal == (0.1, 0.6)
    assert CONFIGS["sar"].train_steps == [2, 3, 4]
    assert SARConfig(grid_size=4, train_steps=range(3, 5)).train_steps == [3, 4]


@pytest.mark.parametrize("kind", list(MODELS))
def test_fields_override_a_given_config_which_stays_as_it_was(kind):
    cfg = CONFIGS[kind]
    model = build(kind, cfg, dim=64, n_head=8)
    assert (model.config.dim, model.config.n_head, cfg.dim) == (64, 8, 32)
    assert model.config.vocab_size == cfg.vocab_size
    assert model.output.weight.shape == (17, 64)


@pytest.mark.parametrize("kind", list(MODELS))
def test_unknown_arguments_are_a_type_error_naming_them(kind):
    with pytest.raises(TypeError, match="colour"):
        MODELS[kind](colour=3, **SMALL)
    other = CONFIGS["sar" if kind != "sar" else "randar"]
    with pytest.raises(TypeError, match=f"config must be a {MODELS[kind].config_class.__name__}, "
                                        f"got {type(other).__name__}"):
        MODELS[kind](other)
    with pytest.raises(TypeError, match="config must be a .*, got dict"):
        MODELS[kind](asdict(CONFIGS[kind]))


def test_anneal_is_rar_only_and_layer_names_are_per_family():
    with pytest.raises(TypeError, match="anneal"):
        RandARTransformer(anneal=(0.2, 0.8), **SMALL)
    with pytest.raises(TypeError, match="n_layer"):
        SARTransformer(n_layer=2, **SMALL)
    with pytest.raises(TypeError, match="encoder_layers"):
        RARTransformer(encoder_layers=2, **SMALL)


@pytest.mark.parametrize("kw,match", [
    (dict(train_order="spiral"), "train_order must be .*got 'spiral'"),
    (dict(train_schedule="ar"), "train_schedule one of .*got 'random', 'ar'"),
    (dict(train_steps=17), "train_steps: set counts must be in \\[1, 16\\]")])
def test_sar_config_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        SARConfig(grid_size=4, **kw)
    with pytest.raises(ValueError, match=match):
        SARTransformer(grid_size=4, **kw)


@pytest.mark.parametrize("config_class,name,expect", [
    (SARConfig, "XL", dict(dim=1280, encoder_layers=18, decoder_layers=18, n_head=20)),
    (DecoderOnlyConfig, "XXL", dict(dim=1536, n_layer=48, n_head=24)),
    (RARConfig, "B", dict(dim=768, n_layer=12, n_head=12))])
def test_presets_set_their_sizes_and_take_overrides(config_class, name, expect):
    cfg = config_class.from_preset(name, vocab_size=17, n_head=4)
    assert {k: getattr(cfg, k) for k in expect} == {**expect, "n_head": 4}
    assert cfg.vocab_size == 17 and cfg.num_classes == config_class().num_classes
    names = re.escape(str(list(config_class.PRESETS)))
    with pytest.raises(ValueError, match=f"unknown preset 'M'; choose from {names}"):
        config_class.from_preset("M")


@pytest.mark.parametrize("cls", [SARTransformer, RandARTransformer, RARTransformer])
def test_model_presets_build_from_the_config_preset(cls):
    with torch.device("meta"):
        model = cls.from_preset("B", vocab_size=17, grid_size=4)
    assert model.config == cls.config_class.from_preset("B", vocab_size=17, grid_size=4)
    assert model.tok_embeddings.weight.shape == (17, 768)
