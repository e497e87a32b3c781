"""Mixed precision in the client and the whole train command on each device: CPU twins here, CUDA ones on a GPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dali_fl.config import LocalConfig
from dali_fl.data.store import open_store
from dali_fl.engine.local import ClientResult, local_train
from dali_fl.loaders import make_loader
from dali_fl.loaders.normalize import IMAGENET
from dali_fl.model.build import build_model
from tests.tiny import tiny_args, tiny_config, tiny_store

NO_GPU = "needs a CUDA GPU; none is present here"
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("gpu-paths"))


def client_update(store: Path, device: str, amp, kind: str = "dali") -> tuple[ClientResult, torch.Tensor]:
    """One client's local epoch (3 SGD steps) from a seeded tiny ViT; returns its result and weight update."""
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    s = open_store(store)
    model = build_model(tiny_config(store).model, s.num_classes, s.image_size, seed=0).to(dev)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = LocalConfig(local_ep=1, local_bs=32, lr=0.05, optimizer="sgd", momentum=0.0)
    with make_loader(kind, s, "train", batch_size=32, device=dev, norm=IMAGENET, augment=False) as ld:
        result = local_train(model, ld, np.arange(96), cfg, seed=0, amp=amp, device=dev)
    delta = torch.cat([(p.detach() - b).flatten().float() for p, b in zip(model.parameters(), before)])
    return result, delta.cpu()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_steps_follow_the_float32_steps(store, device, amp):
    ref_result, ref = client_update(store, device, None)
    result, got = client_update(store, device, amp)  # fp16 goes through the GradScaler
    assert result.steps == ref_result.steps == 3
    assert math.isfinite(result.loss) and result.loss == pytest.approx(ref_result.loss, rel=0.02)
    cosine = float(F.cosine_similarity(got, ref, dim=0))
    ratio = float(got.norm() / ref.norm())
    print(f"\n{device} {amp}: update cosine {cosine:.5f}, norm ratio {ratio:.4f} against float32")
    assert cosine > 0.98 and 0.9 < ratio < 1.1, (cosine, ratio)
    assert not torch.equal(got, ref)  # autocast was in effect: the steps are close, not the same


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("kind", ["dali", "memmap"])
def test_a_client_update_on_the_gpu_equals_the_cpu_one(store, kind):
    _, cpu = client_update(store, "cpu", None, kind)
    _, gpu = client_update(store, "cuda", None, kind)  # TF32 matmuls: about 1e-3 relative
    assert float(F.cosine_similarity(gpu, cpu, dim=0)) > 0.999
    torch.testing.assert_close(gpu, cpu, rtol=0.02, atol=2e-4)


def train_run(invoke, store: Path, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    """`dali-fl train` for two rounds of the tiny federation; returns its weights and metrics rows."""
    loader = extra[extra.index("--loader") + 1] if "--loader" in extra else "memmap"
    args = tiny_args(store=store, out=out, rounds=2, augment=False, optimizer="sgd", lr=0.05, momentum=0.0,
                     loader=loader)
    at = args.index("--device")
    del args[at:at + 2]  # each run names its device in `extra` (--gpu 0 or --device cpu)
    result = invoke("train", *args, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(out / "checkpoint" / "state.safetensors")), rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.parametrize("extra", [["--loader", "dali"], ["--loader", "dali", "--data-on-gpu"],
                                   ["--loader", "memmap"]], ids=["dali", "dali-data-on-gpu", "memmap"])
def test_training_on_the_gpu_follows_the_cpu_run(invoke, store, tmp_path, extra):
    cpu, cpu_rows = train_run(invoke, store, tmp_path / "cpu", "--device", "cpu", "--amp", "off", *extra[:2])
    gpu, gpu_rows = train_run(invoke, store, tmp_path / "gpu", "--gpu", "0", "--amp", "off", *extra)
    assert gpu.keys() == cpu.keys()
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=0.05, atol=1e-3)
    assert [r["test_acc"] for r in gpu_rows] == pytest.approx([r["test_acc"] for r in cpu_rows], abs=0.04)
    assert all(r["peak_gpu_mem_mb"] > 0 for r in gpu_rows)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs_finish_finite(invoke, store, tmp_path, device, amp):
    where = ["--gpu", "0"] if device == "cuda" else ["--device", "cpu"]
    weights, rows = train_run(invoke, store, tmp_path / amp, *where, "--amp", amp, "--loader", "dali")
    assert len(rows) == 2 and all(torch.isfinite(t).all() for t in weights.values())
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in rows)
