"""The one configuration builder: defaults, presets, aliases, derived fields, validation."""
from __future__ import annotations

import math

import pytest

from dali_fl.config import (
    PRESETS,
    DataConfig,
    FederationConfig,
    LocalConfig,
    TrainConfig,
    merge_options,
    option_defaults,
    option_fields,
)
from dali_fl.errors import DaliFlError
from dali_fl.model.build import ModelSpec


def test_defaults_are_the_dataclass_defaults():
    cfg = TrainConfig.from_options({})
    assert cfg.fed == FederationConfig() and cfg.local == LocalConfig() and cfg.data == DataConfig()
    assert cfg.model == ModelSpec()
    d = option_defaults()
    assert d["rounds"] == FederationConfig().rounds and d["partition"] == FederationConfig().partition
    assert d["model"] == ModelSpec().name and d["num_workers"] == DataConfig().num_workers


def test_every_cli_train_option_default_comes_from_the_config():
    from dali_fl.cli.train import train

    d = option_defaults()
    checked = 0
    for param in train.params:
        if param.name in d and param.name not in ("store", "device"):
            assert param.default == d[param.name], param.name
            checked += 1
    assert checked >= 25  # every run option is on the command line


def test_preset_then_explicit_options_win():
    cfg = TrainConfig.from_options({"rounds": 3, "model_kwargs": "depth=1"}, preset="tiny-32")
    tiny = PRESETS["tiny-32"]
    assert cfg.fed.rounds == 3 and cfg.model.kwargs == {"depth": 1}  # explicit beats the preset
    assert cfg.fed.num_users == tiny["num_users"] and cfg.local.lr == tiny["lr"]  # the preset beats defaults
    assert cfg.fed.alpha == FederationConfig().alpha  # neither: the default
    assert merge_options({"lr": 1.0}, "tiny-32")["lr"] == 1.0


@pytest.mark.parametrize("alg,agg,variant,lora,frozen_a", [
    ("fedavg", "fedit", "fedavg", False, False),
    ("fedlora", "fedit", "fedlora-fedit", True, False),
    ("fedlora", "ffa", "fedlora-ffa", True, True),
    ("fedlora", "fedex", "fedlora-fedex", True, False),
])
def test_variant_and_derived_model_fields(alg, agg, variant, lora, frozen_a):
    cfg = TrainConfig.from_options({"alg": alg, "lora_agg": agg})
    assert cfg.fed.variant == variant
    assert cfg.fed.aggregation == ("fedavg" if alg == "fedavg" else agg)
    assert cfg.model.lora is lora and cfg.model.freeze_lora_a is frozen_a


def test_aliases_are_resolved_in_the_builder():
    cfg = TrainConfig.from_options({"model": "vit", "model_variant": "scratch", "alg": "fedlora",
                                    "lora_targets": "qkv, proj"})
    assert cfg.model.name == "vit_base_patch16_224" and cfg.model.pretrained is False
    assert cfg.model.lora_targets == ("qkv", "proj")


def test_json_round_trip():
    cfg = TrainConfig.from_options({"alg": "fedlora", "lora_agg": "fedex", "model_kwargs": "depth=2,patch_size=4",
                                    "store": "s", "partition": "shards", "shards": 3})
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("options,words", [
    ({"bogus": 1}, ("--bogus", "unknown")),
    ({"lora": True}, ("--lora",)),  # derived from --alg, never set directly
    ({"alg": "fedsgd"}, ("--alg", "fedavg")),
    ({"lora_agg": "mean"}, ("--lora-agg", "fedex")),
    ({"partition": "random"}, ("--partition", "dirichlet")),
    ({"loader": "pil"}, ("--loader", "memmap")),
    ({"rounds": 0}, ("--rounds",)),
    ({"rounds": 2.5}, ("--rounds", "integer")),
    ({"seed": -1}, ("--seed", ">= 0")),
    ({"weight_decay": -1.0}, ("--weight-decay",)),
    ({"momentum": math.nan}, ("--momentum", "finite")),
    ({"lr": math.inf}, ("--lr", "finite")),
    ({"alpha": 0.0}, ("--alpha",)),
    ({"frac": 1.5}, ("--frac",)),
    ({"model_kwargs": "img_size=32"}, ("img_size", "store")),
    ({"model_kwargs": "depth=100000000"}, ("depth=100000000", "from 1 to 1024")),  # timm built it without end
    ({"model_kwargs": "depth=nan"}, ("depth=nan", "whole number")),
    ({"model_kwargs": "depth=2.5"}, ("depth=2.5", "whole number")),
    ({"model_kwargs": "mlp_ratio=inf"}, ("mlp_ratio=inf", "above 0 and at most 64")),
    ({"model_kwargs": "embed_dim=0"}, ("embed_dim=0",)),
    ({"model_kwargs": "in_chans=1"}, ("in_chans=1", "RGB")),
])
def test_bad_options_are_one_clear_error(options, words):
    with pytest.raises(DaliFlError) as err:
        TrainConfig.from_options(options)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_option_names_are_unique_and_cover_every_section():
    fields = option_fields()
    assert {section for section, _ in fields.values()} == {"fed", "local", "model", "data", "algorithms", "clock"}
    # Each algorithm's options are declared in its own file and land in its own Params.
    assert fields["prox_mu"] == ("algorithms", "fedprox") and fields["scaffold"] == ("algorithms", "scaffold")
    assert fields["server_opt"] == ("algorithms", "fedopt") and fields["fednova"] == ("algorithms", "fednova")
    assert fields["model"] == ("model", "name") and fields["model_kwargs"] == ("model", "kwargs")
    assert "lora" not in fields and "freeze_lora_a" not in fields


def test_a_config_json_from_before_the_algorithms_had_sections_loads_as_it_ran():
    """Before the algorithm seam, config.json kept prox_mu and scaffold in "local", the server step and DP in
    "server"; and DP drew a fixed-size sample then."""
    import json

    cfg = TrainConfig.from_options(dict(prox_mu=0.01, server_opt="adam", server_lr=0.01, dp_clip=1.0, dp_noise=0.5))
    doc = json.loads(cfg.to_json())
    algs = doc.pop("algorithms")
    doc["local"].update(prox_mu=0.01, scaffold=False)
    doc["server"] = {**algs["fedopt"], **{k: v for k, v in algs["dp"].items() if k in ("dp_clip", "dp_noise",
                                                                                         "dp_delta")}}
    old = TrainConfig.from_json(json.dumps(doc))
    assert old.algorithms["fedprox"].prox_mu == 0.01 and not old.algorithms["scaffold"].scaffold
    assert old.algorithms["fedopt"] == cfg.algorithms["fedopt"]
    assert (old.algorithms["dp"].dp_clip, old.algorithms["dp"].dp_noise) == (1.0, 0.5)
    assert old.algorithms["dp"].dp_sampling == "fixed" and cfg.algorithms["dp"].dp_sampling == "poisson"
    assert old.local == cfg.local


def test_a_model_larger_than_the_machines_memory_is_refused_before_it_is_built():
    from dali_fl.model.build import ModelSpec, build_model

    spec = ModelSpec("vit_tiny_patch16_224", {"depth": 100, "embed_dim": 16384, "num_heads": 16, "patch_size": 8},
                     pretrained=False)  # 322 G parameters: 1.2 TB of float32
    with pytest.raises(DaliFlError, match=r"G parameters: \d+ GiB in float32, more than this machine"):
        build_model(spec, num_classes=10, img_size=32, seed=0)


def test_a_model_that_is_not_a_vit_is_named_as_such():
    from dali_fl.model.build import ModelSpec, build_model

    with pytest.raises(DaliFlError, match="resnet18 is not a Vision Transformer"):
        build_model(ModelSpec("resnet18", pretrained=False), num_classes=10, img_size=32, seed=0)


def test_a_model_with_batchnorm_running_statistics_is_refused():
    # LeViT takes img_size like a ViT, but its BatchNorm running means are buffers no client exchanges: they
    # would escape averaging, DP's clip and noise, and the checkpoint.
    from dali_fl.model.build import ModelSpec, build_model

    with pytest.raises(DaliFlError, match=r"levit_128s keeps BatchNorm running statistics \(52 layers"):
        build_model(ModelSpec("levit_128s", pretrained=False), num_classes=10, img_size=32, seed=0)


def test_flag_kwargs_take_true_or_false_in_any_case():
    from dali_fl.model.build import ModelSpec, build_model, parse_model_kwargs

    tiny = "patch_size=8,depth=1,embed_dim=16,num_heads=2"
    model = build_model(ModelSpec("vit_tiny_patch16_224", parse_model_kwargs(tiny + ",qkv_bias=False"),
                                  pretrained=False), num_classes=10, img_size=32, seed=0)
    assert model.blocks[0].attn.qkv.bias is None
    with pytest.raises(DaliFlError, match="qkv_bias=no must be true or false"):  # timm read "no" as true
        build_model(ModelSpec("vit_tiny_patch16_224", parse_model_kwargs(tiny + ",qkv_bias=no"), pretrained=False),
                    num_classes=10, img_size=32, seed=0)


@pytest.mark.parametrize("layout", ["server", "algorithms"])
def test_a_config_json_from_before_poisson_sampling_of_a_run_without_dp_loads(layout):
    """Older files wrote DP's fields (dp_clip 0) for every run; the fixed-size sample DP ran with then is no
    setting of a run that did not use DP (--dp-sampling without --dp-clip is refused)."""
    import json

    cfg = TrainConfig.from_options(dict(server_opt="adam", server_lr=0.01))
    doc = json.loads(cfg.to_json())
    dp = {k: v for k, v in doc["algorithms"]["dp"].items() if k in ("dp_clip", "dp_noise", "dp_delta")}
    if layout == "server":
        doc["server"] = {**doc["algorithms"].pop("fedopt"), **dp}
        del doc["algorithms"]
    else:
        doc["algorithms"]["dp"] = dp
    old = TrainConfig.from_json(json.dumps(doc))
    assert old.algorithms == cfg.algorithms
