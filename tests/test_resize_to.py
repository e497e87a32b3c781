"""`--resize-to N`: batches resized on the device equal the store prep resized offline, and every misuse is one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_fl.config import TrainConfig, option_defaults
from dali_fl.data.resize import resize_batch
from dali_fl.data.sources import Source, in_memory_split, load_synthetic
from dali_fl.data.store import Store, open_store, write_store
from dali_fl.errors import DaliFlError
from dali_fl.loaders import MAX_RESIZE_TO, make_loader
from dali_fl.loaders.normalize import IMAGENET
from dali_fl.loaders.order import epoch_order
from tests.tiny import loader_args

N_TRAIN = 64
CPU = torch.device("cpu")
TINY_ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8,depth=1,embed_dim=32,num_heads=2",
             "--no-pretrained", "--num-users", "2", "--frac", "1", "--local-ep", "1", "--local-bs", "16",
             "--partition", "iid", "--eval-bs", "16", "--device", "cpu", "--quiet", "--rounds", "1"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Store]:
    """The same 64 synthetic images stored at their native 32 px and pre-resized by prep to 64 and 224 px."""
    out = tmp_path_factory.mktemp("stores")
    source = load_synthetic(N_TRAIN, 16, seed=0)
    return {size: open_store(write_store(source, out, size, progress=False)[0]) for size in (32, 64, 224)}


def pixels(x: torch.Tensor) -> torch.Tensor:
    """A normalized NCHW batch back in uint8 intensity units (before normalization)."""
    mean = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET.std).view(1, 3, 1, 1) * 255
    return x.float() * std + mean


def serve(kind: str, store: Store, augment: bool, image_size=None, seed: int = 3) -> torch.Tensor:
    """One shuffled epoch over the whole train split, as one tensor."""
    with make_loader(kind, store, "train", batch_size=16, device=CPU, norm=IMAGENET, augment=augment,
                     image_size=image_size) as ld:
        return torch.cat([x for x, _ in ld.epoch(np.arange(N_TRAIN), seed)])


def agreement(got: torch.Tensor, want: torch.Tensor, label: str, record_property, least: float = 0.999) -> float:
    """Fraction of values within one intensity level (recorded and printed); returns the max |diff|."""
    assert got.shape == want.shape
    diff = (pixels(got) - pixels(want)).abs()
    within = float((diff <= 1 + 1e-3).float().mean())  # 1e-3: the float round trip through normalization
    exact, worst = float((diff <= 1e-3).float().mean()), float(diff.max())
    record_property("within_one_level", within)
    record_property("max_abs_diff", worst)
    print(f"\nresize {label}: {within:.6f} within 1 level ({exact:.4f} equal), max |diff| {worst:.3f}")
    assert within >= least, (label, within, worst)
    return worst


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
@pytest.mark.parametrize("kind", ["dali", "memmap"])
@pytest.mark.parametrize("size", [64, 224])
def test_resized_batches_match_the_prepped_store(stores, kind, augment, size, record_property):
    got = serve(kind, stores[32], augment, image_size=size)
    want = serve(kind, stores[size], augment)  # the same seed: the same order, flips and crop offsets
    assert got.shape == (N_TRAIN, 3, size, size)
    worst = agreement(got, want, f"{kind} 32->{size} augment={augment}", record_property)
    if kind == "memmap":
        assert worst < 1e-3  # on the CPU the memmap kind runs prep's own uint8 kernel: bit-identical


def prepped(store: Store, size: int, method: str = "bilinear") -> torch.Tensor:
    """What prep makes of the store's train images at `size`, in serve()'s order, normalized as the loaders do."""
    small = resize_batch(np.asarray(store.images("train"))[epoch_order(np.arange(N_TRAIN), 3)], size, method)
    return (torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET.std).view(1, 3, 1, 1)


def noise_store(root: Path, size: int, interpolation: str = "bilinear") -> Store:
    """Uniform random pixels at `size`: the worst case for a resize filter, where smooth data hides differences."""
    x = np.random.default_rng(0).integers(0, 256, (N_TRAIN, size, size, 3), dtype=np.uint8)
    splits = {s: in_memory_split(x, np.arange(len(x)) % 10) for s in ("train", "test")}
    source = Source("npz", tuple(str(c) for c in range(10)), splits)
    return open_store(write_store(source, root, size, interpolation=interpolation, progress=False)[0])


@pytest.mark.parametrize("kind", ["dali", "memmap"])
@pytest.mark.parametrize("case", ["smooth 224->64", "noise 64->32", "noise 32->224"])
def test_dali_shrinking_differs_from_prep_at_the_border(stores, tmp_path, kind, case, record_property):
    # Shrinking, DALI's antialiased filter repeats the edge pixel where prep (Pillow's algorithm) renormalizes the
    # weights over the pixels inside: the interior is within one level, the outermost rows and columns are not.
    # Smooth data hides it; random pixels show it. Enlarging, the filter never reaches past the edge.
    native, size = int(case.split()[1].split("->")[0]), int(case.split("->")[1])
    store = stores[224] if case.startswith("smooth") else noise_store(tmp_path, native)
    got, want = serve(kind, store, False, image_size=size), prepped(store, size)
    interior = agreement(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], f"{kind} {case} interior", record_property)
    if kind == "memmap":
        assert interior < 1e-3 and float((pixels(got) - pixels(want)).abs().max()) < 1e-3  # prep's own kernel
    else:
        worst = agreement(got, want, f"{kind} {case} whole image", record_property, least=0.9)
        assert (worst > 1 + 1e-3) == (case == "noise 64->32")  # dali.py and the README say so


def test_augmentation_is_drawn_at_the_output_size(stores):
    plain, augmented = serve("dali", stores[32], False, 64), serve("dali", stores[32], True, 64)
    assert augmented.shape == plain.shape == (N_TRAIN, 3, 64, 64)  # crop keeps N, padding stays 4 px at N
    assert not torch.equal(plain, augmented)
    zero = pixels(augmented).abs().amax(dim=(1, 2)) < 1e-3  # padded zero rows at the top or bottom of a crop
    assert zero.any(), "some 4-px padded crops must show zero rows"


@pytest.mark.parametrize("kind", ["dali", "memmap"])
def test_bicubic_stores_resize_bicubic(tmp_path, kind, record_property):
    source = load_synthetic(N_TRAIN, 16, seed=0)
    native, big = (open_store(write_store(source, tmp_path, n, interpolation="bicubic", progress=False)[0])
                   for n in (32, 224))
    got, want = serve(kind, native, True, image_size=224), serve(kind, big, True)
    # DALI's cubic keeps floats between passes and clamps at borders, Pillow's (prep's) rounds, clips its overshoot
    # and renormalizes: on every row, not only at the border.
    worst = agreement(got, want, f"{kind} 32->224 bicubic", record_property, least=0.95)
    noise = noise_store(tmp_path / "noise", 32, "bicubic")
    worst_noise = agreement(serve(kind, noise, False, image_size=224), prepped(noise, 224, "bicubic"),
                            f"{kind} noise 32->224 bicubic", record_property, least=0.9)
    assert kind == "dali" or max(worst, worst_noise) < 1e-3


@pytest.mark.parametrize("kind", ["dali", "memmap"])
def test_resize_to_the_store_size_is_a_no_op(stores, kind):
    with make_loader(kind, stores[32], "train", batch_size=16, device=CPU, norm=IMAGENET, image_size=32) as ld:
        assert ld.cfg.resize is None and ld.cfg.image_size == 32
    assert torch.equal(serve(kind, stores[32], True, 32), serve(kind, stores[32], True))


@pytest.mark.parametrize("value", [0, -3, MAX_RESIZE_TO + 1, 2.5, True, "64"])
def test_bad_targets_are_refused(stores, value):
    with pytest.raises(DaliFlError, match="--resize-to"):
        make_loader("memmap", stores[32], "train", batch_size=8, device=CPU, norm=IMAGENET, image_size=value)
    with pytest.raises(DaliFlError, match="--resize-to"):
        TrainConfig.from_options({"resize_to": value})


def test_memmap_seed_has_no_resize_step(stores):
    with pytest.raises(DaliFlError, match="memmap-seed.*no resize step"):
        make_loader("memmap-seed", stores[32], "train", batch_size=8, device=CPU, norm=IMAGENET, image_size=64)
    with pytest.raises(DaliFlError, match="--resize-to needs the dali or memmap loader"):
        TrainConfig.from_options({"loader": "memmap-seed", "resize_to": 64})


def test_config_round_trips_the_target():
    assert option_defaults()["resize_to"] is None and TrainConfig.from_options({}).data.resize_to is None
    cfg = TrainConfig.from_options({"resize_to": 224, "store": "s"})
    assert cfg.data.resize_to == 224 and TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("args,words", [
    (["--resize-to", "0"], ("--resize-to", "1..")),
    (["--resize-to", "5000"], ("--resize-to",)),
    (["--resize-to", "64", "--loader", "memmap-seed"], ("--resize-to", "memmap-seed")),
    (["--resize-to", "4"], ("4px", "patch")),  # smaller than the 8 px patch: timm builds it, forward fails
])
def test_cli_misuse_is_one_line(invoke, assert_user_error, stores, tmp_path, args, words):
    result = invoke("train", "--store", stores[32].path, "--out", tmp_path / "run", *TINY_ARGS, *args)
    assert_user_error(result, *words)
    assert not (tmp_path / "run").exists()


def test_pretrained_size_check_uses_the_target(invoke, assert_user_error, stores, tmp_path):
    result = invoke("train", "--store", stores[32].path, "--out", tmp_path / "run", "--model", "vit_tiny_patch16_224",
                    "--pretrained", "--resize-to", "64", "--device", "cpu", "--quiet")
    assert_user_error(result, "--resize-to 64", "224")  # refused before any download is tried


@pytest.mark.parametrize("loader", ["dali", "memmap"])
def test_train_builds_the_model_at_the_target(invoke, stores, tmp_path: Path, loader):
    run = tmp_path / "run"
    result = invoke("train", "--store", stores[32].path, "--out", run, *TINY_ARGS, "--resize-to", "64",
                    *loader_args(loader))
    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads((run / "config.json").read_text())["data"]["resize_to"] == 64
    from safetensors.torch import load_file

    pos = load_file(str(run / "checkpoint" / "state.safetensors"))["pos_embed"]
    assert pos.shape[1] == 1 + (64 // 8) ** 2  # 64 px at patch 8: 64 tokens (+ class token), not 16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present here")
@pytest.mark.parametrize("kind,data_on_gpu", [("dali", False), ("dali", True), ("memmap", False)])
def test_resize_on_the_gpu_matches_the_prepped_store(stores, kind, data_on_gpu, record_property):
    dev = torch.device("cuda", 0)
    with make_loader(kind, stores[32], "train", batch_size=16, device=dev, norm=IMAGENET, augment=True,
                     data_on_gpu=data_on_gpu, image_size=224) as ld:
        got = torch.cat([x for x, _ in ld.epoch(np.arange(N_TRAIN), 3)])
    assert got.device == dev
    label = f"{kind}{' data_on_gpu' if data_on_gpu else ''} cuda 32->224 augment=True"
    agreement(got.cpu(), serve(kind, stores[224], True), label, record_property)
