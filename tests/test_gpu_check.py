"""`make gpu-check --quick`: the whole GPU harness, shrunk and on the CPU, so it works before a GPU arrives."""
from __future__ import annotations

import json
import sys
import tarfile
import time

import pytest

from benchmarks import check_steps, check_summary, gpu_check


@pytest.mark.slow
def test_quick_gpu_check_writes_every_result_and_the_summary(tmp_path):
    report = tmp_path / "OUT"
    out = gpu_check.main(["--quick", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                          "--report-dir", str(report)])
    names = {p.name for p in out.iterdir()}
    assert {"summary.md", "gpu-tests.txt", "environment.json", "round-fedlora-16px.json", "round-fedavg-16px.json",
            "round-fedlora-16px-memmap.json", "round-fedavg-16px-memmap.json",
            "round-fedlora-16px-gpu12gib.json", "round-fedavg-16px-gpu12gib.json",
            "round-fedlora-16px-compile.json"} <= names  # one name per step: none overwrote another
    assert any(n.startswith("loader-") and n.endswith(".json") for n in names)
    summary = (out / "summary.md").read_text()
    assert "## fedlora" in summary and "## fedavg" in summary and "| dali |" in summary and "| memmap |" in summary
    assert "| dali-resize |" in summary  # FedLoRA from the native store, resized on the device
    assert "GPU tests (`pytest -m gpu`)" in summary and "s a test and" in summary  # run under its limits
    assert "| stores |" in summary and len(list((tmp_path / "data").rglob("*_images.npy"))) >= 4
    assert "## fedlora, vit_tiny_patch16_224 at 16 px on cpu, torch.compile" in summary  # compiled beside eager
    assert "## fedavg, vit_tiny_patch16_224 at 16 px on cpu, --gpu-mem-gib ignored on the CPU" in summary
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] and "dali" in env
    # What comes back from a lent machine: the same page, the error log, and every result in one archive.
    assert (report / "summary.md").read_text() == summary
    assert (report / "errors.txt").read_text() == "no step has failed so far\n"
    with tarfile.open(report / "results.tgz") as tar:
        assert {f"out/{n}" for n in names} <= set(tar.getnames())


def test_a_full_check_without_cuda_stops_with_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^error: the GPU check needs CUDA; install it or run with --quick$"):
        gpu_check.environment(quick=False)


def test_only_the_stores_part_runs_before_dali_has_arrived():
    gpu = {"cuda_available": True, "dali": None}
    assert gpu_check.missing(gpu, need_dali=False) is None  # the first call: DALI's parts still travelling
    assert gpu_check.missing(gpu) == "DALI (nvidia-dali-cuda120)"
    assert gpu_check.missing({**gpu, "cuda_available": False}, need_dali=False) == "CUDA"
    assert gpu_check.missing({**gpu, "dali": "2.4.0"}) is None


def stub_steps(monkeypatch, loader=lambda argv: None, rounds=lambda argv: None, tests=None) -> list:
    """Replace every step's work; returns the list each call appends its kind of step to."""
    from benchmarks import bench_loader, bench_round

    ran = []
    tests = tests or (lambda out, left: {"returncode": 0, "summary": "13 skipped"})
    monkeypatch.setattr(gpu_check, "make_stores", lambda runs: ran.append("stores") or 3)
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda *a: (ran.append("tests"), tests(*a))[1])
    monkeypatch.setattr(bench_loader, "main", lambda argv: (ran.append("loader"), loader(argv))[1])
    monkeypatch.setattr(bench_round, "main",
                        lambda argv: (ran.append(gpu_check.round_kind(argv)[0]), rounds(argv))[1])
    return ran


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path, monkeypatch):
    def boom(argv):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    ran = stub_steps(monkeypatch, loader=boom, rounds=lambda argv: sys.exit("error: --kinds has no kind"),
                     tests=lambda out, left: {"returncode": 1, "summary": "1 failed, 12 passed"})
    out, report = tmp_path / "out", tmp_path / "OUT"
    with pytest.raises(SystemExit, match=r"^error: 9 step\(s\) failed; see .*summary.md \(tracebacks in errors.txt\)$"):
        gpu_check.main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data"),
                        "--report-dir", str(report)])
    assert ran == ["stores", "memmap", "memmap", "round", "round", "memory", "memory", "tests", "loader",
                   "compile"]  # every step ran
    summary = (out / "summary.md").read_text()  # ... and the page still written
    assert "| pytest -m gpu |" in summary and "failed: 1 failed, 12 passed" in summary
    assert summary.count("failed: SystemExit: error: --kinds has no kind") == 7  # 2 memmap, 2 DALI, 2 capped, compiled
    assert "failed: RuntimeError: CUDA error: an illegal memory access was encountered |" in summary
    errors = (out / "errors.txt").read_text()
    assert "more detail" in errors and "Traceback" in errors
    assert (report / "errors.txt").read_text() == errors and (report / "summary.md").read_text() == summary


def test_a_check_with_no_failures_returns_its_folder(tmp_path, monkeypatch):
    stub_steps(monkeypatch)
    out = gpu_check.main(["--quick", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    assert not (out / "errors.txt").exists()
    assert "| bench_round fedlora --compile |" in (out / "summary.md").read_text()


def test_each_call_runs_its_part_and_writes_pages_of_its_own(tmp_path, monkeypatch):
    ran = stub_steps(monkeypatch)
    out = tmp_path / "out"
    gpu_check.main(["--quick", "--part", "stores", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert ran == ["stores"]  # the call that carries DALI's first part
    ran.clear()
    gpu_check.main(["--quick", "--part", "memmap", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert ran == ["memmap", "memmap"]  # the next part's call: the DataLoader kinds, fedlora then fedavg
    ran.clear()
    gpu_check.main(["--quick", "--part", "rounds", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert ran == ["round", "round", "memory", "memory"]  # call A: fedlora, fedavg, both capped at 12 GiB
    ran.clear()
    gpu_check.main(["--quick", "--part", "detail", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert ran == ["tests", "loader", "compile"]  # call B
    assert {"summary-stores.md", "summary-memmap.md", "summary-rounds.md", "summary-detail.md",
            "environment-rounds.json", "environment-detail.json"} <= {p.name for p in out.iterdir()}  # none replaced
    assert "bench_round fedlora --gpu-mem-gib 12" in (out / "summary-rounds.md").read_text()


def test_steps_picks_the_kinds_of_step_to_rerun(tmp_path, monkeypatch):
    ran = stub_steps(monkeypatch)
    out = gpu_check.main(["--quick", "--steps", "round,compile", "--out", str(tmp_path / "out")])
    assert ran == ["round", "round", "compile"]  # fedlora, fedavg, then compiled fedlora; no tests, no loader
    steps_table = (out / "summary-round-compile.md").read_text().split("## Steps")[1].split("GPU tests")[0]
    assert "| bench_round fedavg |" in steps_table and "pytest -m gpu" not in steps_table
    for bad in (["--steps", "round,gpu"], ["--steps", "round", "--part", "rounds"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as err:
            gpu_check.main(["--quick", *bad])
        assert err.value.code == 2


def test_the_step_running_at_the_deadline_is_cut_and_the_pages_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setattr(check_steps, "MIN_STEP_S", 0.3)
    ran = stub_steps(monkeypatch, rounds=lambda argv: time.sleep(30))  # a hung round
    out, report = tmp_path / "out", tmp_path / "OUT"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--quick", "--part", "rounds", "--budget-s", "1", "--out", str(out), "--report-dir",
                        str(report)])
    assert err.value.code == 124 and time.monotonic() - t0 < 10
    assert ran == ["round"]  # cut at 1 s; the rest not started
    summary = (report / "summary.md").read_text()
    assert "| bench_round fedlora |" in summary and "cut: the time limit was reached (SIGALRM)" in summary
    assert summary.count("not run: the time limit was reached") == 3
    assert "TimeUp" in (report / "errors.txt").read_text() and (report / "results.tgz").stat().st_size > 0


def test_a_step_is_not_started_without_the_time_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(check_steps, "MIN_STEP_S", 5)
    ran = stub_steps(monkeypatch)
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--quick", "--part", "detail", "--budget-s", "4", "--out", str(tmp_path / "out")])
    assert err.value.code == 124 and ran == []
    assert "not run: 4 s of the budget left" in (tmp_path / "out" / "summary-detail.md").read_text()


def test_an_outer_timeouts_sigterm_cuts_the_step_like_the_deadline(tmp_path, monkeypatch):
    import os
    import signal

    def killed(argv):
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends before it kills
        time.sleep(30)

    stub_steps(monkeypatch, rounds=killed)
    before = signal.getsignal(signal.SIGTERM)  # an earlier test's library (Ray) may have set its own
    with pytest.raises(SystemExit) as err:
        gpu_check.main(["--quick", "--steps", "round", "--out", str(tmp_path / "out")])
    assert err.value.code == 124
    assert "cut: the time limit was reached (SIGTERM)" in (tmp_path / "out" / "summary-round.md").read_text()
    assert signal.getsignal(signal.SIGTERM) is before  # put back for whoever runs next


def test_the_gpu_test_step_limits_follow_the_budget():
    assert gpu_check.tests_limits(None) == (240.0, 60)  # no budget: still far below setup.cfg's 600 s a test
    assert gpu_check.tests_limits(270) == (108.0, 27)  # call B of the lease: 40% of what is left
    assert gpu_check.tests_limits(40) == (30.0, 20)  # never less than a CUDA start and one DALI build need


@pytest.mark.slow
def test_a_gpu_test_step_past_its_limit_is_killed_with_its_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "tests_limits", lambda left: (1.0, 1))
    t0 = time.monotonic()
    res = gpu_check.gpu_tests(tmp_path)  # pytest's collection alone takes longer than 1 s
    assert time.monotonic() - t0 < 15
    assert res["returncode"] == 124 and res["summary"].startswith("killed at the step's limit of 1 s")
    assert (tmp_path / "gpu-tests.txt").read_text().startswith("# pytest -m gpu -v -rs -p no:cacheprovider "
                                                               "--timeout 1 ")


def test_a_gpu_check_runs_the_headline_rounds_before_the_detail(tmp_path):
    steps = gpu_check.plan(tmp_path, tmp_path, "cuda", False, set(gpu_check.STEPS))
    names = [name for _, name, *_ in steps]
    assert names[:8] == ["stores", "bench_round fedlora --kinds memmap@4,memmap@8,memmap-seed",
                         "bench_round fedavg --kinds memmap@4,memmap@8,memmap-seed", "bench_round fedlora",
                         "bench_round fedavg", "bench_round fedlora --gpu-mem-gib 12",
                         "bench_round fedavg --gpu-mem-gib 12", "pytest -m gpu"]
    assert [n.split(" --kinds")[0] for n in names[8:10]] == ["bench_loader", "bench_loader"]
    assert "--data-on-gpu" in names[9] and names[10:] == ["bench_round fedlora --compile"]
    fedlora = steps[3][3]
    assert fedlora[fedlora.index("--kinds") + 1] == "dali,dali-gpu,dali-gpu-resize"
    assert fedlora[fedlora.index("--model") + 1] == "vit_base_patch16_224" and "--device" in fedlora
    capped = steps[6][3]
    assert capped[capped.index("--kinds") + 1] == "dali-gpu-resize"
    from benchmarks.bench_round import build_parser

    parsed = build_parser().parse_args(capped)
    assert parsed.gpu_mem_gib == 12 and parsed.rounds == 1 and parsed.model == "vit_base_patch16_224"
    # The DataLoader kinds need no DALI: their call runs while DALI's parts still travel.
    assert {kind for kind, *_ in steps if kind in gpu_check.NO_DALI} == set(gpu_check.PARTS["stores"]) | {"memmap"}


def test_every_step_of_a_gpu_check_writes_files_of_its_own(tmp_path):
    from benchmarks import bench_loader, bench_round

    stems = []
    for kind, _, _, argv in gpu_check.plan(tmp_path, tmp_path, "cuda", False, set(gpu_check.STEPS)):
        if kind == "loader":
            a = bench_loader.build_parser().parse_args(argv)
            stems.append(bench_loader.result_name(a.image_size, a.native_size, a.kinds.split(","), a.data_on_gpu))
        elif kind not in ("tests", "stores"):
            a = bench_round.build_parser().parse_args(argv)
            stems.append(bench_round.result_name(a))
    assert len(stems) == 9 and len(set(stems)) == 9, stems


ROW = {"kind": "dali-gpu-resize", "round_time_s": 5.0, "bound_round_time_s": 4.9, "data_stall": 0.01,
       "busy_cores": 0.8, "cpu_core_s_per_1k_images": 0.2, "peak_rss_mib": 3000, "peak_gpu_mem_mib": 2500}
DOC = {"settings": {"alg": "fedlora", "model": "vit_base_patch16_224", "image_size": 224},
       "machine": {"device": "cuda:0"}}
CAP = {"gpu_mem_cap_gib": 12, "gpu_mem_fraction": 0.151, "gpu_total_mib": 81559.0}


def test_the_12_gb_verdict_adds_what_ran_outside_torch_to_the_capped_peak():
    capped = {**DOC, "settings": {**DOC["settings"], "gpu_mem_gib": 12}}

    def verdict(**row) -> str:
        return "\n".join(check_summary.round_table({**capped, "results": [
            {**ROW, **CAP, "fits_gpu_mem_cap": True, "peak_gpu_reserved_mib": 3100, **row}]}))

    fits = verdict(peak_gpu_used_mib=3900.0)  # 800 MiB of context and DALI pools beside torch's 2500 allocated
    assert "torch capped at 12 GiB" in fits and "fraction 0.151 of the 79.6 GiB card" in fits
    assert "2500 MiB allocated, 3100 MiB reserved" in fits and "About 800 MiB ran outside torch" in fits
    assert "3300 MiB, so it fits a 12 GiB card" in fits
    # torch stayed under its cap, but the context and pools outside it would not leave torch enough on the card
    too_big = verdict(peak_gpu_mem_mib=11000, peak_gpu_reserved_mib=11500, peak_gpu_used_mib=13000.0)
    assert "12500 MiB, so it does not fit a 12 GiB card" in too_big and "it fits" not in too_big
    assert "so whether it fits a 12 GiB card is open" in verdict(peak_gpu_used_mib=None)
    oom = {"kind": "dali-gpu-resize", **CAP, "fits_gpu_mem_cap": False, "peak_gpu_mem_mib": 12100.0,
           "peak_gpu_reserved_mib": 12280.0, "out_of_memory": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    too_big = "\n".join(check_summary.round_table({**capped, "results": [oom]}))
    assert "| dali-gpu-resize | out of memory under the 12 GiB cap |" in too_big
    assert "it does not fit a 12 GiB card. torch held 12100 MiB when it failed (CUDA out of memory." in too_big


def test_an_uncapped_run_reports_nvml_as_context_and_gives_no_verdict():
    text = "\n".join(check_summary.round_table({**DOC, "results": [{**ROW, "peak_gpu_used_mib": 4100.0}]}))
    assert "| 2500 | 4100 |" in text and "device-used peak 4100 MiB" in text and "context only" in text
    assert "it fits" not in text and "does not fit" not in text
    on_cpu = "\n".join(check_summary.round_table({**DOC, "results": [{**ROW, "peak_gpu_used_mib": None}]}))
    assert "12 GB" not in on_cpu  # no NVML reading, no line


def test_the_budget_counts_from_the_start_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(check_steps, "MIN_STEP_S", 5)
    ran = stub_steps(monkeypatch)
    with pytest.raises(SystemExit) as err:  # started 60 s ago (imports, CUDA): of 62 s, 2 are left
        gpu_check.main(["--quick", "--part", "rounds", "--budget-s", "62", "--out", str(tmp_path / "out")],
                       started=time.time() - 60)
    assert err.value.code == 124 and ran == []
    assert "not run: 2 s of the budget left" in (tmp_path / "out" / "summary-rounds.md").read_text()
    assert abs(gpu_check.process_start() - time.time()) < 3600  # this test process's own start


def test_the_stores_part_names_its_machine_without_dali(monkeypatch):
    from benchmarks.measure import machine_info

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as on the lent machine before the parts are in
    info = machine_info("cpu")
    assert info["dali"] is None and info["id"].startswith("cpu")


# Installed here for dali-fl's other parts, absent from the lent GPU machine (nothing can be installed there, and
# only DALI's parts are carried): the check must neither import them nor need them.
NOT_ON_THE_GPU_MACHINE = ("flwr", "ray", "dp_accounting")


@pytest.mark.slow
def test_the_rounds_run_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """A module-level import of Flower, Ray or dp-accounting on the rounds' path would stop the lent call at once."""
    import os
    import subprocess
    from pathlib import Path

    site = tmp_path / "site"
    site.mkdir()  # sitecustomize runs in every interpreter the check starts, its child processes too
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({NOT_ON_THE_GPU_MACHINE}))\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])}
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--steps", "stores,round",
           "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary-stores-round.md").read_text()
    assert "| bench_round fedlora |" in summary and "| bench_round fedavg |" in summary and "| ok |" in summary
    assert "failed" not in summary.lower(), summary
    probe = subprocess.run([sys.executable, "-c", "import flwr"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr  # the blocking itself works
