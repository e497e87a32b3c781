"""`python -m benchmarks.bench_loader` end to end on a tiny store, and the machinery both benchmarks share."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path

import pytest

import benchmarks.bench_loader as loader_bench
from benchmarks.measure import ROOT
from benchmarks.report import results_dir, table
from benchmarks.round_settings import Settings as RoundSettings
from benchmarks.round_settings import settings_from_args
from benchmarks.sampler import Sampler

RESULT_KEYS = {"kind", "build_s", "images_per_s", "cpu_core_s_per_1k", "switch_ms", "peak_rss_mib", "peak_pss_mib",
               "rounds"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_loader_benchmark_measures_each_kind_in_a_child(tmp_path: Path) -> None:
    out = tmp_path / "out"
    loader_bench.main(["--image-size", "16", "--num-images", "64", "--clients", "2", "--samples-per-client", "16",
                       "--local-ep", "1", "--repeats", "1", "--batch-size", "8", "--kinds", "memmap",
                       "--workers", "0", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    doc = json.loads((out / "loader-16px.json").read_text())
    assert set(doc) == {"command", "machine", "settings", "results"}
    assert doc["command"].startswith("python -m benchmarks.bench_loader ") and "<outside-repo>" in doc["command"]
    assert doc["settings"]["data_dir"] == doc["settings"]["out"] == "<outside-repo>"  # no tmp paths leak
    [r] = doc["results"]
    assert set(r) == RESULT_KEYS and r["kind"] == "memmap"
    assert r["images_per_s"] > 0 and r["switch_ms"] > 0
    assert math.isfinite(r["cpu_core_s_per_1k"])  # a few ms of work: below the 10 ms tick of process CPU times
    assert 0 < r["peak_pss_mib"] <= r["peak_rss_mib"] * 1.1
    assert "| memmap |" in (out / "loader-16px.md").read_text()


def test_settings_survive_the_child_spec(tmp_path: Path) -> None:
    parser = loader_bench.build_parser()
    s = loader_bench.settings_from_args(parser.parse_args(["--kinds", "dali,memmap", "--data-dir", "rel"]), parser)
    assert s.kinds == ("dali", "memmap") and s.data_dir.is_absolute()  # children run from the repository root
    assert loader_bench.Settings(**json.loads(json.dumps(s.as_json()))) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.clients = 3  # frozen
    from benchmarks.bench_round import build_parser

    parser = build_parser()
    r = settings_from_args(parser.parse_args(["--device", "cpu", "--kinds", "memmap@0", "--rounds", "1"]), parser)
    record = json.loads(json.dumps(r.record()))
    assert not {"data_dir", "out", "in_process", "plot"} & set(record)  # how to run is not a result
    assert RoundSettings(**record) == r


def test_results_follow_one_naming_scheme() -> None:
    machine = {"id": "cpu2-some-cpu"}
    assert results_dir(machine) == ROOT / "benchmarks" / "results" / f"cpu2-some-cpu-{dt.date.today():%Y%m%d}"
    assert results_dir(machine, Path("elsewhere")) == Path("elsewhere")
    assert table(("loader", "a", "b"), [["x", "1", "2"]]) == ["| loader | a | b |", "|---|---:|---:|", "| x | 1 | 2 |"]



def test_host_fed_and_gpu_resident_loader_runs_write_different_files() -> None:
    # gpu_check runs `dali,dali-resize` host-fed and then with --data-on-gpu: the second must not replace the first.
    name = loader_bench.result_name
    assert name(224, 32, ["dali", "memmap"], False) == "loader-224px"
    host = name(224, 32, ["dali", "dali-resize"], False)
    gpu = name(224, 32, ["dali", "dali-resize"], True)
    assert host == "loader-224px-resize-from-32px" and gpu == "loader-224px-resize-from-32px-data-on-gpu"
    assert name(224, 32, ["dali"], True) == "loader-224px-data-on-gpu"

TINY_RUN = ["--image-size", "16", "--clients", "2", "--samples-per-client", "16", "--kinds", "memmap"]


def tiny_settings(tmp_path: Path, *args: str) -> loader_bench.Settings:
    parser = loader_bench.build_parser()
    return loader_bench.settings_from_args(parser.parse_args([*TINY_RUN, "--data-dir", str(tmp_path), *args]), parser)


def test_other_num_images_or_seed_get_stores_of_their_own(tmp_path: Path) -> None:
    # A re-run with another --num-images or --seed died on "synthetic-16 was made with other settings ... --force".
    runs = [("--num-images", "64"), ("--num-images", "65"), ("--num-images", "64", "--seed", "1")]
    paths = [loader_bench.prepare_stores(tiny_settings(tmp_path, *run))["memmap"] for run in runs]
    assert len(set(paths)) == 3
    again = loader_bench.prepare_stores(tiny_settings(tmp_path, *runs[0]))["memmap"]
    assert again == paths[0]
    from dali_fl.data.store import open_store
    assert [open_store(p).manifest["source_params"]["num_train"] for p in paths] == [64, 65, 64]


def test_a_user_error_is_one_line_without_a_traceback(tmp_path: Path, capsys) -> None:
    path = Path(loader_bench.prepare_stores(tiny_settings(tmp_path, "--num-images", "64"))["memmap"])
    (path / "manifest.json").unlink()  # what is left is not a store: prep would refuse to replace it
    with pytest.raises(SystemExit) as exit_:
        loader_bench.main([*TINY_RUN, "--num-images", "64", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1].startswith("error: ") and "is not a store" in err


def test_data_on_gpu_without_cuda_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    # It built the stores, then each child died with two tracebacks.
    with pytest.raises(SystemExit) as exit_:
        loader_bench.main(["--kinds", "dali", "--data-on-gpu", "--data-dir", str(tmp_path / "data")])
    assert exit_.value.code == 2 and "--data-on-gpu needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_sampler_reads_pss_on_its_schedule() -> None:
    every = Sampler(interval=0.2, pss_every_s=0)
    every.sample()
    assert every.peak["pss"] > 0 and every.peak["rss"] > 0 and every.peak["pss_store"] == 0  # no store given
    sparse = Sampler(interval=0.25)  # PSS about every 5 s: the first sample, then every 20th
    sparse.sample()
    sparse.peak["pss"] = 0
    sparse.sample()
    assert sparse.peak["pss"] == 0 and sparse.peak["rss"] > 0
