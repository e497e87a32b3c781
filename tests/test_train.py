"""End-to-end training through the CLI on a tiny store and a tiny ViT (CPU, no downloads)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from dali_fl.config import TrainConfig
from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import write_store
from dali_fl.engine.federation import run_round
from dali_fl.engine.run import prepare
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_names
from tests.tiny import kill_at_client, loader_args

TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2",
             "--no-pretrained", "--num-users", "4", "--frac", "0.5", "--local-ep", "1", "--local-bs", "32",
             "--partition", "iid", "--eval-bs", "200", "--device", "cpu", "--quiet", "--lr", "2e-3"]
METRIC_KEYS = {"round", "test_acc", "test_loss", "train_loss", "num_clients", "num_samples", "round_time_s",
               "data_wait_s", "compute_s", "images_per_s", "peak_gpu_mem_mb"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """A 16 px synthetic store (uint8 and the float32 twin memmap-seed reads)."""
    root = tmp_path_factory.mktemp("stores")
    source = load_synthetic(400, 200, seed=0)
    write_store(source, root, 16, progress=False)
    write_store(source, root, 16, dtype="float32", progress=False)
    return root / "synthetic-16"


def train(invoke, store, out, *extra):
    result = invoke("train", "--store", store, "--out", out, *TINY_ARGS, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loader", ["dali", "memmap", "memmap-seed"])
def test_two_rounds_write_every_output(invoke, stores, tmp_path, loader):
    rows = train(invoke, stores, tmp_path / "run", "--rounds", "2", *loader_args(loader))
    run = tmp_path / "run"
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert METRIC_KEYS <= r.keys() and 0.0 <= r["test_acc"] <= 1.0 and r["peak_gpu_mem_mb"] is None
        assert r["num_clients"] == 2 and r["num_samples"] == 200  # 2 of 4 clients x 100 samples each
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["loader"] == loader and config["fed"]["rounds"] == 2
    part = json.loads((run / "partition.json").read_text())
    assert sorted(np.concatenate([c["indices"] for c in part["clients"]]).tolist()) == list(range(400))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_test_acc"] == rows[-1]["test_acc"]
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["round"] == 2
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_learns_far_above_chance(invoke, stores, tmp_path):
    rows = train(invoke, stores, tmp_path / "run", "--rounds", "4", *loader_args("memmap"), "--frac", "1",
                 "--local-ep", "2", "--no-augment")
    assert rows[-1]["test_acc"] > 0.3, rows  # 10 classes: chance is 0.1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_resume_matches_uninterrupted_run(invoke, stores, tmp_path):
    common = (*loader_args("memmap"), "--alg", "fedlora", "--lora-agg", "fedex")
    full = train(invoke, stores, tmp_path / "full", "--rounds", "4", *common)
    train(invoke, stores, tmp_path / "half", "--rounds", "2", *common)
    result = invoke("train", "--resume", tmp_path / "half", "--rounds", "4", "--quiet")
    assert result.exit_code == 0, result.output
    resumed = [json.loads(x) for x in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] for r in resumed] == [r["test_acc"] for r in full]
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("base::") for k in a)  # fedex ships changed base weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_killed_mid_round_resumes_from_round_before(invoke, stores, tmp_path, monkeypatch):
    kill_at_client(monkeypatch, 6)  # round 3, first client
    result = invoke("train", "--store", stores, "--out", tmp_path / "run", *TINY_ARGS, "--rounds", "4",
                    *loader_args("memmap"))
    assert result.exit_code == 130 and "--resume" in result.output
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["round"] == 2
    monkeypatch.undo()
    assert invoke("train", "--resume", tmp_path / "run", "--quiet").exit_code == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    full = train(invoke, stores, tmp_path / "full", "--rounds", "4", *loader_args("memmap"))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in full]


def _config(store: Path, **options) -> TrainConfig:
    lora = {"lora_r": 2} if options.get("alg") == "fedlora" else {}  # FedAvg refuses LoRA options it would ignore
    workers = {"num_workers": 0} if options.get("loader", "memmap") == "memmap" else {}  # others refuse it
    return TrainConfig.from_options({**lora, **workers, **dict(model="vit_tiny_patch16_224", pretrained=False,
                                    num_users=4, model_kwargs="patch_size=4,depth=1,embed_dim=32,num_heads=2",
                                    frac=0.5, partition="iid", local_bs=32, store=store, loader="memmap",
                                    augment=False), **options})


def test_fedlora_exchanges_only_lora_and_head(stores, tmp_path, monkeypatch):
    import dali_fl.engine.federation as fed

    fx, _ = prepare(_config(stores, alg="fedlora"), tmp_path / "run", resume=False)
    names = trainable_names(fx.model)
    assert names and all(".lora_A." in n or ".lora_B." in n or ".head." in n for n in names)
    frozen = {n: p.detach().clone() for n, p in fx.model.named_parameters() if not p.requires_grad}
    sent = []
    real_add = fed.RunningSum.add
    monkeypatch.setattr(fed.RunningSum, "add",
                        lambda self, state, n, *rest: (sent.append(set(state)), real_add(self, state, n, *rest)))
    run_round(fx, 1)
    assert sent and all(keys == set(names) for keys in sent)
    for n, p in fx.model.named_parameters():
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)  # fedit never touches the base
    fx.close()


def _live() -> dict[str, int]:
    """Counts that grow with every leaked round: live tensors, open file descriptors, threads."""
    import gc
    import threading
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    return {"tensors": tensors,
            "fds": psutil.Process().num_fds(), "threads": threading.active_count()}


@pytest.mark.parametrize("loader", ["dali", "memmap"])
def test_nothing_accumulates_across_rounds(stores, tmp_path, loader):
    # Counts, not RSS against a fixed bound (allocator noise); benchmarks/bench_round reports RSS per round.
    fx, _ = prepare(_config(stores, alg="fedavg", loader=loader), tmp_path / "run", resume=False)
    for r in range(1, 3):
        run_round(fx, r)
    before = _live()
    for r in range(3, 7):
        run_round(fx, r)
    after = _live()
    fx.close()
    assert after == before


def test_adam_on_the_cpu_keeps_the_default_kernel():
    from dali_fl.config import LocalConfig
    from dali_fl.engine.local import make_optimizer

    assert not make_optimizer([torch.nn.Parameter(torch.zeros(2))], LocalConfig()).defaults.get("fused")


class _Batches:
    """A loader whose first batch overflows fp16's loss scale and whose others do not."""

    def epoch(self, indices, seed, shuffle=True):
        gen = torch.Generator().manual_seed(0)
        for scale in (1e4, 1.0, 1.0):
            yield torch.randn(4, 8, generator=gen) * scale, torch.tensor([0, 1, 0, 1])


def test_fp16_steps_the_loss_scaler_skips_are_counted_apart_from_the_steps_taken():
    from dali_fl.config import LocalConfig
    from dali_fl.engine.local import local_train

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    cfg = LocalConfig(optimizer="sgd", lr=0.1)
    res = local_train(model, _Batches(), np.arange(12), cfg, 0, torch.float16, torch.device("cpu"))
    assert (res.steps, res.skipped_steps) == (2, 1)  # the overflowing batch changed nothing
    res = local_train(model, _Batches(), np.arange(12), cfg, 0, None, torch.device("cpu"))
    assert (res.steps, res.skipped_steps) == (3, 0)  # no scaler, no skipping


def test_an_fp16_run_reports_the_steps_skipped_each_round(invoke, stores, tmp_path):
    rows = train(invoke, stores, tmp_path / "fp16", "--rounds", "1", "--amp", "fp16")
    assert type(rows[0]["amp_skipped_steps"]) is int and rows[0]["amp_skipped_steps"] >= 0
    assert "amp_skipped_steps" not in train(invoke, stores, tmp_path / "off", "--rounds", "1", "--amp", "off")[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_runs_use_fused_adamw_and_tf32():
    from dali_fl.config import LocalConfig
    from dali_fl.engine.device import resolve_device
    from dali_fl.engine.local import make_optimizer

    device = resolve_device(0, None)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2, device=device))], LocalConfig())
    assert opt.defaults["fused"] is True


# --- bad input ------------------------------------------------------------------------------

def test_missing_store(invoke, assert_user_error, tmp_path):
    assert_user_error(invoke("train", "--store", tmp_path / "nope", *TINY_ARGS), "does not exist", "prep")


def test_image_size_mismatch_says_which_and_how(invoke, assert_user_error, stores, tmp_path):
    result = invoke("train", "--store", stores, "--out", tmp_path / "r", "--model", "vit", "--pretrained",
                    "--device", "cpu", "--quiet")
    assert_user_error(result, "16px", "224", "prep --image-size 224", "--resize-to 224")


def test_a_presets_image_size_is_named_as_the_presets_and_resize_to_meets_it(invoke, assert_user_error, stores,
                                                                             tmp_path):
    preset = ("--preset", "fedlora-vit-b16", "--store", stores, "--out", tmp_path / "r", "--device", "cpu")
    line = assert_user_error(invoke("train", *preset, "--no-pretrained"), "--preset fedlora-vit-b16 trains at 224px",
                             "--resize-to 224")
    assert "--image-size 224 but" not in line  # the user gave no --image-size
    # With --resize-to 224 the preset's size is met: what stops this run is the missing pretrained weights.
    assert_user_error(invoke("train", *preset, "--resize-to", "224", *loader_args("memmap"), "--rounds", "1"),
                      "pretrained weights", "--weights")
    # Another --resize-to is a second size: the line names both, and the flag that trains at the user's.
    assert_user_error(invoke("train", *preset, "--resize-to", "64", "--no-pretrained"), "trains at 224px",
                      "--resize-to makes them 64px", "--resize-to 224", "--image-size 64 to train at 64px")
    assert invoke("train", *preset, "--resize-to", "64", "--image-size", "64", "--no-pretrained", "--rounds", "1",
                  "--model-kwargs", "depth=1,embed_dim=32,num_heads=2", "--local-ep", "1", "--num-users", "2",
                  "--frac", "1", "--quiet").exit_code == 0


def test_a_dataset_prep_does_not_know_is_told_with_the_sources_it_does(invoke, assert_user_error, tmp_path):
    assert_user_error(invoke("train", "--dataset", "imagenet", "--data-dir", tmp_path), "imagenet",
                      "cifar10", "imagefolder")


def test_a_negative_gpu_is_not_an_index(invoke, assert_user_error, stores):
    assert_user_error(invoke("train", "--store", stores, "--gpu", "-1"), "--gpu -1 is not a GPU index")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("gpu", ["0", "7"])
def test_gpu_without_cuda(invoke, assert_user_error, stores, gpu):
    assert_user_error(invoke("train", "--store", stores, "--gpu", gpu), f"--gpu {gpu}", "not available", "--device cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_out_of_range_lists_devices(invoke, assert_user_error, stores):
    assert_user_error(invoke("train", "--store", stores, "--gpu", "99"), "--gpu 99", "GPU(s)")


def test_a_dataset_the_store_does_not_hold_is_refused(invoke, assert_user_error, stores, tmp_path):
    # The store decides what trains: a --dataset that disagrees was silently ignored.
    assert_user_error(invoke("train", "--dataset", "cifar", "--store", stores, "--out", tmp_path / "r"),
                      "--dataset cifar", "holds synthetic", "drop --dataset")
    assert not (tmp_path / "r").exists()


def test_seed_command_parses_and_needs_only_store_and_gpu(invoke, assert_user_error, tmp_path):
    seed = ("train --alg fedlora --model vit --model_variant pretrained --dataset cifar --image_size 224 "
            "--use_offline_data --epochs 150 --num_users 100 --frac 0.1 --local_ep 5 --local_bs 32 --lr 0.0003").split()
    if not torch.cuda.is_available():
        assert_user_error(invoke(*seed, "--gpu", "2"), "--gpu 2", "not available")
    line = assert_user_error(invoke(*seed, "--device", "cpu", "--data-dir", tmp_path), "no cifar10 store")
    assert "dali-fl prep --source cifar10" in line and "--image-size 224" in line


def test_resume_of_a_non_run(invoke, assert_user_error, tmp_path):
    assert_user_error(invoke("train", "--resume", tmp_path), "not a dali-fl run")


@pytest.mark.parametrize("args,words", [
    (("--frac", "0"), ("--frac",)),
    (("--alg", "fedlora", "--lora-targets", "nonexistent_layer"), ("nonexistent_layer", "matches no")),
    (("--model-kwargs", "img_size=32"), ("img_size",)),
    (("--local-bs", "0"), ("--local-bs",)),
])
def test_bad_training_options(invoke, assert_user_error, stores, tmp_path, args, words):
    assert_user_error(invoke("train", "--store", stores, "--out", tmp_path / "r", *TINY_ARGS, *args), *words)
    assert not (tmp_path / "r" / "checkpoint").exists()


def test_existing_run_is_not_overwritten(invoke, assert_user_error, stores, tmp_path):
    train(invoke, stores, tmp_path / "run", "--rounds", "1", *loader_args("memmap"))
    assert_user_error(invoke("train", "--store", stores, "--out", tmp_path / "run", *TINY_ARGS), "--resume")


def test_nan_loss_names_round_and_client(invoke, assert_user_error, stores, tmp_path):
    result = invoke("train", "--store", stores, "--out", tmp_path / "r", *TINY_ARGS, *loader_args("memmap"),
                    "--optimizer", "sgd", "--lr", "1e30", "--rounds", "3")
    assert_user_error(result, "round", "client", "--lr")


def test_offline_pretrained_without_weights_is_one_line(invoke, assert_user_error, monkeypatch, tmp_path):
    import dali_fl.model.build as model

    monkeypatch.setattr(model, "_cached_offline", lambda name: False)
    monkeypatch.setattr(model, "_hub_reachable", lambda timeout=3.0: False)
    write_store(load_synthetic(20, 10, seed=0), tmp_path, 224, progress=False)
    result = invoke("train", "--store", tmp_path / "synthetic-224", "--out", tmp_path / "r", "--model", "vit",
                    "--device", "cpu", "--num-users", "2")
    assert_user_error(result, "--weights", "cache", "--no-pretrained")


def test_local_weights_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    from dali_fl.model.build import ModelSpec, build_model

    kwargs = dict(depth=1, embed_dim=32, num_heads=2)
    donor = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **kwargs)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model(ModelSpec("vit_tiny_patch16_224", kwargs, pretrained=True,
                                  weights=str(tmp_path / "w.safetensors")), num_classes=10, img_size=224, seed=0)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 10


def _weights(path, num_classes: int = 1000, **kwargs):
    """A tiny ViT's state dict saved as safetensors (`kwargs` over depth 2, width 32); returns the donor."""
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes,
                              **{"depth": 2, "embed_dim": 32, "num_heads": 2, **kwargs})
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    return donor


def _build(path, num_classes: int = 10):
    from dali_fl.model.build import ModelSpec, build_model

    return build_model(ModelSpec("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), pretrained=True,
                                 weights=str(path)), num_classes=num_classes, img_size=224, seed=0)


@pytest.mark.parametrize("made,store_px", [(32, 32), (224, 224), (224, 32), (32, 224)])
def test_local_weights_are_checked_against_their_own_image_size(tmp_path, made, store_px):
    # The size check read the hub's 224px for any --weights file: a user's own 32px weights were refused on a 32px
    # store, and on a 224px store timm resampled their 2x2 position embeddings to 14x14 without a word.
    from dali_fl.model.build import ModelSpec, build_model

    donor = _weights(tmp_path / "w.safetensors", img_size=made)
    spec = ModelSpec("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2), pretrained=True,
                     weights=str(tmp_path / "w.safetensors"))
    if made != store_px:
        with pytest.raises(DaliFlError, match=rf"made for {made}px images .* the model takes {store_px}px"):
            build_model(spec, num_classes=10, img_size=store_px, seed=0)
        return
    model = build_model(spec, num_classes=10, img_size=store_px, seed=0)
    torch.testing.assert_close(model.pos_embed, donor.pos_embed)


def test_relative_weights_are_saved_absolute_so_resume_works_from_elsewhere(invoke, tmp_path, monkeypatch):
    _weights(tmp_path / "w.safetensors", depth=1)
    store, _ = write_store(load_synthetic(8, 4, seed=0), tmp_path, 224, progress=False)  # what the weights expect
    args = ("--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=1,embed_dim=32,num_heads=2", "--device",
            "cpu", "--num-users", "2", "--partition", "iid", "--quiet")
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--store", store, "--out", tmp_path / "r", *args, "--rounds", "1", "--weights",
                    "w.safetensors")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["weights"] == str(tmp_path /
                                                                                              "w.safetensors")
    monkeypatch.chdir("/")
    result = invoke("train", "--resume", tmp_path / "r", "--rounds", "2", "--quiet")
    assert result.exit_code == 0, result.output  # it read "cannot read --weights w.safetensors (no such file)"


def test_weights_that_leave_the_model_partly_random_are_refused(tmp_path):
    # timm loads such files with strict=False once the head is dropped, and only logs what it skipped: a run
    # trained from random init while config.json named the weights.
    from safetensors.torch import save_file

    _weights(tmp_path / "shallow.safetensors", depth=1)
    _weights(tmp_path / "deep.safetensors", depth=3)
    donor = load_file(str(tmp_path / "deep.safetensors"))
    save_file({f"model.{k}": v for k, v in donor.items()}, str(tmp_path / "prefixed.safetensors"))
    for name, words in (("shallow", "not in it (e.g. blocks.1."), ("deep", "the model lacks (e.g. blocks.2."),
                        ("prefixed", "not in it")):
        with pytest.raises(DaliFlError, match=rf"--weights .*{name}.safetensors cannot be read .*{re.escape(words)}"):
            _build(tmp_path / f"{name}.safetensors")


def test_a_head_that_fits_the_dataset_is_loaded_and_one_that_does_not_is_not(tmp_path):
    tuned = _weights(tmp_path / "tuned.safetensors", num_classes=10)  # already fine-tuned on 10 classes: it was
    model = _build(tmp_path / "tuned.safetensors")  # thrown away, as timm compares with ImageNet's 1000
    torch.testing.assert_close(model.head.weight, tuned.head.weight)
    imagenet = _weights(tmp_path / "imagenet.safetensors")
    model = _build(tmp_path / "imagenet.safetensors")
    assert model.head.out_features == 10
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, imagenet.blocks[1].mlp.fc2.weight)


def test_lora_targets_are_linear_layers_outside_the_head(tmp_path):
    # `proj` also named the patch embedding's Conv2d, whose 4-d factors FedEx cannot fold (a crash after a round);
    # `head` and `.*mlp.*` reached peft, which raised its own traceback.
    import timm

    from dali_fl.model.build import lora_modules

    model = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2, num_classes=10)
    assert lora_modules(model, ("proj",)) == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert lora_modules(model, (".*mlp.*",)) == [f"blocks.{b}.mlp.{f}" for b in (0, 1) for f in ("fc1", "fc2")]
    with pytest.raises(DaliFlError, match="'head' matches no Linear layer outside the head"):
        lora_modules(model, ("head",))
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", depth=1, embed_dim=32, num_heads=2,
                                  num_classes=10)
    from dali_fl.model.build import ModelSpec, apply_lora

    wrapped = apply_lora(distilled, ModelSpec("deit_tiny_distilled_patch16_224", lora=True))  # two heads
    trainable = {n.split(".modules_to_save")[0].split(".")[-1] for n, p in wrapped.named_parameters()
                 if p.requires_grad and "modules_to_save" in n}
    assert trainable == {"head", "head_dist"}
