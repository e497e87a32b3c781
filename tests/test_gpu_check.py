"""`make gpu-check --quick`: the whole GPU harness, shrunk and on the CPU, so it works before a GPU arrives."""
from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu_check


@pytest.mark.slow
def test_quick_gpu_check_writes_every_result_and_the_summary(tmp_path):
    out = gpu_check.main(["--quick", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    names = {p.name for p in out.iterdir()}
    assert {"summary.md", "gpu-tests.txt", "environment.json", "round-fedlora-16px.json",
            "round-fedavg-16px.json"} <= names
    assert any(n.startswith("loader-") and n.endswith(".json") for n in names)
    summary = (out / "summary.md").read_text()
    assert "## fedlora" in summary and "## fedavg" in summary and "| dali |" in summary and "| memmap |" in summary
    assert "| dali-resize |" in summary  # FedLoRA from the native store, resized on the device
    assert "GPU tests (`pytest -m gpu`)" in summary
    assert "## fedlora, vit_tiny_patch16_224 at 16 px on cpu, torch.compile" in summary  # compiled beside eager
    assert (out / "compiled" / "round-fedlora-16px.json").exists()
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and "dali" in env


def test_a_full_check_without_cuda_stops_with_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^error: the GPU check needs CUDA; install it or run with --quick$"):
        gpu_check.environment(quick=False)


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_loader, bench_round

    calls = []

    def boom(argv):
        calls.append(argv)
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(gpu_check, "gpu_tests", lambda out: {"returncode": 1, "summary": "1 failed, 12 passed"})
    monkeypatch.setattr(bench_loader, "main", boom)
    monkeypatch.setattr(bench_round, "main", lambda argv: sys.exit("error: --kinds has no kind"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: 5 step\(s\) failed; see .*summary.md \(tracebacks in errors.txt\)$"):
        gpu_check.main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert len(calls) == 1  # every loader run was attempted (one on the CPU) ...
    summary = (out / "summary.md").read_text()  # ... and so was every round run, and the page still written
    assert "| pytest -m gpu |" in summary and "failed: 1 failed, 12 passed" in summary
    assert summary.count("failed: SystemExit: error: --kinds has no kind") == 3  # fedlora, fedavg, compiled
    assert "failed: RuntimeError: CUDA error: an illegal memory access was encountered |" in summary
    errors = (out / "errors.txt").read_text()
    assert "more detail" in errors and "Traceback" in errors


def test_a_check_with_no_failures_returns_its_folder(tmp_path, monkeypatch):
    from benchmarks import bench_loader, bench_round

    monkeypatch.setattr(gpu_check, "gpu_tests", lambda out: {"returncode": 0, "summary": "13 skipped"})
    monkeypatch.setattr(bench_loader, "main", lambda argv: None)
    monkeypatch.setattr(bench_round, "main", lambda argv: None)
    out = gpu_check.main(["--quick", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert not (out / "errors.txt").exists()
    assert "| bench_round fedlora --compile |" in (out / "summary.md").read_text()


def test_steps_picks_the_kinds_of_step_to_rerun(tmp_path, monkeypatch):
    from benchmarks import bench_loader, bench_round

    ran = []
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda out: ran.append("tests"))
    monkeypatch.setattr(bench_loader, "main", lambda argv: ran.append("loader"))
    monkeypatch.setattr(bench_round, "main", lambda argv: ran.append("compile" if "--compile" in argv else "round"))
    out = gpu_check.main(["--quick", "--steps", "round,compile", "--out", str(tmp_path / "out")])
    assert ran == ["round", "round", "compile"]  # fedlora, fedavg, then compiled fedlora; no tests, no loader
    assert "pytest -m gpu" not in (out / "summary.md").read_text().split("## Steps")[1].split("GPU tests")[0]
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--quick", "--steps", "round,gpu"])
    assert err.value.code == 2


def test_a_gpu_check_runs_the_headline_rounds_before_the_detail(tmp_path):
    steps = gpu_check.plan(tmp_path, tmp_path, "cuda", False, set(gpu_check.STEPS))
    names = [name for _, name, *_ in steps]
    assert names[:3] == ["pytest -m gpu", "bench_round fedlora", "bench_round fedavg"]
    assert [n.split(" --kinds")[0] for n in names[3:5]] == ["bench_loader", "bench_loader"]
    assert "--data-on-gpu" in names[4] and names[5:] == ["bench_round fedlora --compile"]
    fedlora = steps[1][3]
    assert fedlora[fedlora.index("--kinds") + 1] == "dali,dali-gpu,memmap@4,memmap@8,memmap-seed,dali-gpu-resize"
    assert fedlora[fedlora.index("--model") + 1] == "vit_base_patch16_224" and "--device" in fedlora


def test_the_summary_says_whether_the_resident_native_split_fits_a_12_gb_card():
    row = {"kind": "dali-gpu-resize", "round_time_s": 5.0, "bound_round_time_s": 4.9, "data_stall": 0.01,
           "busy_cores": 0.8, "cpu_core_s_per_1k_images": 0.2, "peak_rss_mib": 3000, "peak_gpu_mem_mib": 2500}
    doc = {"settings": {"alg": "fedlora", "model": "vit_base_patch16_224", "image_size": 224},
           "machine": {"device": "cuda:0"}}
    fits = "\n".join(gpu_check.round_table({**doc, "results": [{**row, "peak_gpu_used_mib": 4100.0}]}))
    assert "| 2500 | 4100 |" in fits and "peaked at 4100 MiB" in fits and "it fits the seed's 12 GB card" in fits
    too_big = "\n".join(gpu_check.round_table({**doc, "results": [{**row, "peak_gpu_used_mib": 13000.0}]}))
    assert "it does not fit the seed's 12 GB card" in too_big
    on_cpu = "\n".join(gpu_check.round_table({**doc, "results": [{**row, "peak_gpu_used_mib": None}]}))
    assert "12 GB" not in on_cpu  # no NVML reading, no verdict
