"""bench_algorithms: each suite trains its runs on the same images and writes one comparable table."""
from __future__ import annotations

import json

from benchmarks.bench_algorithms import RESIZE_TO, main, store_px
from dali_fl.errors import DaliFlError


def test_resize_to_suite_trains_from_both_stores(tmp_path, capsys):
    main(["--suite", "resize-to", "--rounds", "2", "--num-train", "40", "--num-test", "20", "--num-users", "2",
          "--frac", "1", "--alpha", "10", "--out", str(tmp_path)])
    stem = tmp_path / "resize-to-224px-alpha10-frac1"
    doc = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert list(doc["results"]) == list(RESIZE_TO)
    assert all([r["round"] for r in rows] == [1, 2] for rows in doc["results"].values())
    md = stem.with_name(stem.name + ".md").read_text()
    assert "mean / max round gap to store-224" in md and "resize_to=224" in md
    first_row = next(line for line in md.splitlines() if line.startswith("| store-224 |"))
    assert "| 0.000 / 0.000 |" in first_row  # the first run's gap to itself
    assert stem.with_name(stem.name + ".png").stat().st_size > 0


def test_suites_name_their_image_size():
    assert store_px("algorithms") == store_px("lora-ranks") == 32
    assert store_px("resize-to") == 224


def test_clock_suite_runs_to_one_simulated_budget(tmp_path):
    main(["--suite", "clock", "--rounds", "1", "--num-train", "200", "--num-test", "20", "--alpha", "10",
          "--only", "sync", "fedbuff-c10-k5", "--out", str(tmp_path)])
    stem = tmp_path / "clock-32px-alpha10-frac0.5"
    doc = json.loads(stem.with_name(stem.name + ".json").read_text())
    budget = doc["clock"]["budget_s"]
    assert len(doc["results"]["sync"]) == 1 and doc["results"]["sync"][-1]["sim_time_s"] == budget
    steps = doc["results"]["fedbuff-c10-k5"]
    assert len(steps) == doc["clock"]["rounds"]["fedbuff-c10-k5"] and steps[-1]["sim_time_s"] <= budget
    assert "acc at budget" in stem.with_name(stem.name + ".md").read_text()
    assert stem.with_name(stem.name + ".png").stat().st_size > 0


def test_a_run_that_stops_keeps_its_rounds_and_the_suite_goes_on(tmp_path, monkeypatch):
    """A DP run whose loss becomes NaN is a row that says so; the runs before and after it are kept."""
    import dali_fl.engine.run as run_module

    train = run_module.train

    def diverging(cfg, run_dir, **kw):
        if run_dir.name == "fedavg-eps1":  # as a NaN loss in round 2 would: round 1 written, then the refusal
            train(cfg.replace(fed={"rounds": 1}), run_dir, **kw)
            raise DaliFlError("training loss became nan in round 2 at client 3; nothing of round 2 "
                                         "was saved")
        return train(cfg, run_dir, **kw)

    monkeypatch.setattr(run_module, "train", diverging)
    main(["--suite", "dp", "--rounds", "2", "--num-train", "200", "--num-test", "20", "--alpha", "10",
          "--only", "fedavg-eps1", "fedavg-epsinf", "--out", str(tmp_path)])
    stem = tmp_path / "dp-32px-alpha10-frac0.5"
    doc = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert [r["round"] for r in doc["results"]["fedavg-eps1"]] == [1]
    assert [r["round"] for r in doc["results"]["fedavg-epsinf"]] == [1, 2]
    assert doc["stopped"] == {"fedavg-eps1": "training loss became nan in round 2 at client 3"}
    row = next(ln for ln in stem.with_name(stem.name + ".md").read_text().splitlines() if "| fedavg-eps1 |" in ln)
    assert row.endswith("| training loss became nan in round 2 at client 3 |")
