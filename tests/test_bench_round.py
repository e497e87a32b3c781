"""Smoke test of `python -m benchmarks.bench_round`: a real round per loader kind on a tiny store, in-process."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.bench_round as bench
import dali_fl.engine.federation  # noqa: F401  (torch + timm imported at collection, not inside the timed test)
from benchmarks.wrappers import CachedBatch, TimedLoader

TINY_VIT = "patch_size=4,depth=1,embed_dim=32,num_heads=2"
PER_KIND = ("round_time_s", "data_wait_s", "compute_s", "aggregate_s", "bound_round_time_s", "data_stall",
            "cpu_core_s", "busy_cores", "cpu_core_s_per_1k_images", "peak_rss_mib", "peak_pss_mib",
            "peak_pss_anon_mib", "peak_pss_store_mib",
            "gpu_util_pct", "peak_gpu_mem_mib", "client_switch_ms", "images_per_round")


@pytest.mark.timeout(120)
def test_round_benchmark_reports_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = bench.main(["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5",
                      "--model-kwargs", TINY_VIT, "--rounds", "1", "--kinds", "memmap,dali", "--device", "cpu",
                      "--threads", "1", "--in-process", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    stem = out / "round-fedavg-16px"
    files = sorted((tmp_path / "data").rglob("*_images.npy"))  # train and test, whole pages
    store_mib = sum(-(-f.stat().st_size // 4096) * 4096 for f in files) / 2**20
    assert json.loads(stem.with_suffix(".json").read_text())["results"] == doc["results"]
    assert stem.with_suffix(".png").stat().st_size > 10_000
    table = stem.with_suffix(".md").read_text()
    assert "| memmap |" in table and "| dali |" in table and "<outside-repo>" in table  # no tmp paths leak
    assert [r["kind"] for r in doc["results"]] == ["memmap", "dali"]
    for r in doc["results"]:
        assert set(PER_KIND) <= set(r), set(PER_KIND) - set(r)
        assert r["images_per_round"] == 100  # 2 of 4 IID clients x 50 images x 1 local epoch
        for key in ("round_time_s", "compute_s", "aggregate_s", "bound_round_time_s"):
            assert r[key] > 0 and math.isfinite(r[key]), (r["kind"], key, r[key])
        # CPU time is a difference of 10-ms-granular counters less the sampler's own share: on a round this tiny
        # it can dip just below zero, so only its presence is checked here (the benchmarks report the figure).
        assert math.isfinite(r["cpu_core_s"]) and math.isfinite(r["busy_cores"])
        assert 0 <= r["data_wait_s"] < r["round_time_s"]
        assert 0.0 <= r["data_stall"] < 1.0  # clamped at 0; data_stall_raw keeps the sign of the noise
        assert r["busy_cores"] <= len(__import__("os").sched_getaffinity(0)) + 1  # + sampling slack
        assert 0 < r["peak_pss_anon_mib"] < r["peak_pss_mib"] <= r["peak_rss_mib"] * 1.1
        assert 0 < r["peak_pss_store_mib"] <= store_mib, (r["peak_pss_store_mib"], store_mib)  # one copy
        assert r["gpu_util_pct"] is None and r["peak_gpu_mem_mib"] is None  # CPU run: no GPU figures
        assert r["train_gflops_per_image"] > 0 and r["achieved_tflops"] > 0 and r["mfu"] is None  # no GPU peak
        assert r["client_switch_ms"] is not None and r["client_switch_ms"] > 0  # 2 clients: one switch
        assert r["store"] == "synthetic-16"


def test_bound_serves_the_real_batch_sizes_and_switches_are_timed() -> None:
    cached = CachedBatch(torch.arange(32 * 3).view(32, 3).float(), torch.arange(32))
    timed = TimedLoader(cached)
    a, b = np.arange(70), np.arange(5)
    for indices in (a, a, b):  # one client with two epochs, then the next client
        sizes = [len(y) for _, y in timed.epoch(indices, seed=0)]
    assert sizes == [5]
    assert [len(y) for _, y in cached.epoch(a, 0)] == [32, 32, 6]
    clients, epochs = timed.gaps()
    assert len(clients) == 1 and len(epochs) == 1 and min(clients + epochs) >= 0


def test_help_lists_the_options() -> None:
    text = bench.build_parser().format_help()
    for flag in ("--model", "--model-kwargs", "--alg", "--preset", "--image-size", "--num-train", "--num-users",
                 "--frac", "--local-ep", "--local-bs", "--kinds", "--device", "--rounds", "--out", "--scaling"):
        assert flag in text


def test_flops_are_counted_per_trained_image_and_peaks_are_known() -> None:
    from benchmarks.flops import peak_tflops, train_flops_per_image

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    # forward 2*48*10, weight gradient 2*48*10; the input needs no gradient
    assert train_flops_per_image(model, 4, "cpu") == 4 * 48 * 10
    assert all(p.grad is None for p in model.parameters())  # nothing left behind for the next step
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops(None) is None and peak_tflops("Some New GPU") is None
    # the whole name: an L40 is not an L4, a PCIe H100 not the SXM part, and an unknown variant is not guessed
    assert (peak_tflops("NVIDIA L40"), peak_tflops("NVIDIA L4"), peak_tflops("NVIDIA L40S")) == (181.0, 121.0, 362.1)
    assert peak_tflops("NVIDIA H100 PCIe") == 756.5 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10G") is None and peak_tflops("NVIDIA H100 NVL") == 835.5


OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
CAP = {"gpu_mem_cap_gib": 12.0, "gpu_mem_fraction": 0.151, "gpu_total_mib": 81559.0}


def test_a_kind_out_of_memory_under_the_cap_is_a_result_and_the_rest_are_measured(tmp_path, monkeypatch) -> None:
    from benchmarks import round_point

    real = round_point.measure_rounds

    def dali_runs_out(s, point):
        if point["kind"] == "dali":
            raise torch.cuda.OutOfMemoryError(OOM)
        return real(s, point)

    # As on a GPU: the cap is set, dali runs out of memory under it, memmap fits.
    monkeypatch.setattr(round_point, "cap_gpu_memory", lambda device, gib: dict(CAP))
    monkeypatch.setattr(round_point, "gpu_peaks", lambda device: {"peak_gpu_mem_mib": 12100.0,
                                                                  "peak_gpu_reserved_mib": 12280.0})
    monkeypatch.setattr(round_point, "measure_rounds", dali_runs_out)
    out = tmp_path / "out"
    doc = bench.main(["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5",
                      "--model-kwargs", TINY_VIT, "--rounds", "1", "--kinds", "memmap,dali", "--device", "cpu",
                      "--threads", "1", "--in-process", "--gpu-mem-gib", "12", "--data-dir", str(tmp_path / "data"),
                      "--out", str(out)])
    memmap, dali = doc["results"]
    assert memmap["fits_gpu_mem_cap"] and memmap["round_time_s"] > 0 and memmap["peak_gpu_reserved_mib"] == 12280.0
    assert not dali["fits_gpu_mem_cap"] and dali["out_of_memory"] == OOM and "round_time_s" not in dali
    stem = out / "round-fedavg-16px-gpu12gib"  # its own name: the uncapped run's files stay
    assert json.loads(stem.with_suffix(".json").read_text())["settings"]["gpu_mem_gib"] == 12.0
    table = stem.with_suffix(".md").read_text()
    assert "| dali | out of memory under the 12 GiB cap |" in table and "capped at 12 GiB" in table
    assert stem.with_suffix(".png").exists()  # drawn from the kinds that ran


def test_only_out_of_memory_under_a_cap_is_caught(monkeypatch) -> None:
    from benchmarks import round_point
    from benchmarks.round_settings import settings_from_args

    parser = bench.build_parser()
    s = settings_from_args(parser.parse_args(["--device", "cpu", "--gpu-mem-gib", "12"]), parser)
    s = dataclasses.replace(s, device="cuda:0")  # as on a GPU; measure_rounds is replaced below
    errors = iter([torch.cuda.OutOfMemoryError(OOM), RuntimeError("CUDA error: illegal memory access"),
                   torch.cuda.OutOfMemoryError(OOM)])
    monkeypatch.setattr(round_point, "measure_rounds", lambda s, point: (_ for _ in ()).throw(next(errors)))
    monkeypatch.setattr(round_point, "gpu_peaks", lambda device: {"peak_gpu_mem_mib": 1.0,
                                                                  "peak_gpu_reserved_mib": 2.0})
    monkeypatch.setattr(round_point, "cap_gpu_memory", lambda device, gib: dict(CAP))
    row = round_point.measure_point(s, {"kind": "dali-gpu-resize"})
    assert row["out_of_memory"] == OOM and row["fits_gpu_mem_cap"] is False and row["gpu_mem_cap_gib"] == 12.0
    with pytest.raises(RuntimeError, match="illegal memory access"):  # any other error is still an error
        round_point.measure_point(s, {"kind": "dali-gpu-resize"})
    monkeypatch.setattr(round_point, "cap_gpu_memory", lambda device, gib: None)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # and without a cap, so is running out of memory
        round_point.measure_point(s, {"kind": "dali-gpu-resize"})


def test_the_cap_is_ignored_on_the_cpu(caplog) -> None:
    from benchmarks import round_point

    with caplog.at_level("INFO", logger="bench_round"):
        assert round_point.cap_gpu_memory("cpu", 12.0) is None
    assert "--gpu-mem-gib 12.0 ignored: device cpu has no GPU memory to cap" in caplog.text
    assert round_point.cap_gpu_memory("cuda:0", None) is None  # no cap asked: CUDA is not even touched


def test_waiting_for_the_gpu_at_epoch_ends_is_compute_not_data_wait(tmp_path, monkeypatch) -> None:
    # TimedLoader's epoch-end sync runs inside local training's timed next(): 0.2 s of queued "GPU work" per
    # epoch landed in data_wait_s (the bound and every kind showed a wait that was compute).
    import time

    from benchmarks.round_point import timed_round
    from benchmarks.sampler import Sampler
    from dali_fl.engine.run import prepare
    from tests.tiny import tiny_config, tiny_store

    fx, _ = prepare(tiny_config(tiny_store(tmp_path), num_users=4, frac=0.5, local_ep=2), tmp_path / "run",
                    resume=False, write=False)

    class OnCuda:  # the real loader, reporting a CUDA device so that TimedLoader syncs
        device = torch.device("cuda")

        def epoch(self, *args, **kwargs):
            return fx.train_loader.epoch(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: time.sleep(0.2))
    try:
        out = timed_round(fx, 1, OnCuda(), Sampler())
    finally:
        fx.close()
    assert out["data_wait_s"] < 0.2 and out["compute_s"] >= 0.8  # 2 clients x 2 epochs x 0.2 s, now compute


def _row(round_: int, time_s: float, cpu: float) -> dict:
    """A measured round whose figures all follow from its time, so a row mixing two rounds shows."""
    return dict(round=round_, num_clients=2, images=100, round_time_s=time_s, data_wait_s=time_s / 4,
                compute_s=time_s / 2, aggregate_s=0.1, other_s=time_s / 4 - 0.1, images_per_s=100 / time_s,
                cpu_core_s=cpu, busy_cores=cpu / time_s, gpu_util_pct=None, gpu_used_mib=None,
                peak_gpu_mem_mb=None, client_switch_s=[0.01], epoch_switch_s=[])


def test_an_even_count_of_rounds_reports_one_round_not_the_average_of_two(monkeypatch) -> None:
    from benchmarks import round_point

    rounds = [_row(2, 2.0, 4.0), _row(3, 1.0, 3.0)]
    bounds = [_row(2, 0.9, 1.0), _row(3, 0.8, 3.5)]  # the faster bound round used more CPU than round 3
    row = round_point.summarize({"kind": "dali"}, 1.0, rounds[0], rounds, bounds, {})
    assert row["median_round"] == 3 and row["round_time_s"] == 1.0
    assert row["images_per_s"] == 100.0 and row["cpu_core_s"] == 3.0 and row["busy_cores"] == 3.0
    assert row["bound_round_time_s"] == 0.8 and row["bound_cpu_core_s"] == 3.5
    assert row["cpu_core_s_per_1k_images"] == 30.0
    assert row["loader_core_s_per_1k_images"] is None  # less than its bound: noise, not a negative cost
    row = round_point.summarize({"kind": "dali"}, 1.0, rounds[0], rounds, [_row(2, 0.9, 1.0), _row(3, 0.8, 1.0)], {})
    assert row["loader_core_s_per_1k_images"] == pytest.approx(1000 * (3.0 - 1.0) / 100)


def test_the_seed_s_store_pages_are_read_before_its_workers_exit(tmp_path: Path) -> None:
    """memmap-seed's workers map the float32 store and exit each epoch: a PSS sample after that finds nothing."""
    doc = bench.main(["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5",
                      "--model-kwargs", TINY_VIT, "--rounds", "1", "--kinds", "memmap-seed", "--device", "cpu",
                      "--threads", "1", "--in-process", "--data-dir", str(tmp_path / "data"),
                      "--out", str(tmp_path / "out")])
    [f32] = (tmp_path / "data").rglob("*-f32/train_images.npy")
    row = doc["results"][0]
    # 100 of the 200 rows, 3 KiB each and spread over the file: over half its pages are read in one round
    assert row["peak_pss_store_mib"] >= 0.4 * f32.stat().st_size / 2**20, (row["peak_pss_store_mib"], f32)
    assert 0 <= row["data_wait_s"] < row["round_time_s"] and row["images_per_round"] == 100


def test_a_label_names_the_results_and_must_be_a_plain_word(capsys) -> None:
    from benchmarks.round_settings import settings_from_args

    parser = bench.build_parser()
    s = settings_from_args(parser.parse_args(["--device", "cpu", "--alg", "fedavg", "--image-size", "32",
                                                      "--label", "memmap"]), parser)
    assert bench.result_name(s) == "round-fedavg-32px-memmap" and "label" not in s.record()
    with pytest.raises(SystemExit):
        settings_from_args(parser.parse_args(["--device", "cpu", "--label", "../x"]), parser)
    assert "--label '../x': letters, digits" in capsys.readouterr().err
