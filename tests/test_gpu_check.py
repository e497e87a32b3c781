"""`make gpu-check --quick`: the whole GPU harness, shrunk and on the CPU, so it works before a GPU arrives."""
from __future__ import annotations

import json

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
