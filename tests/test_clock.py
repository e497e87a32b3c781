"""The simulated clock: seeded speeds and bandwidths, traces, each client's round time, sim_time_s in every row,
deadlines, over-selection and availability, exact replay on resume, and the bad inputs it refuses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dali_fl.config import TrainConfig
from dali_fl.engine.clock import ClockConfig, Profiles, drawn_profiles, lognormal, plan_round, read_trace
from dali_fl.engine.federation import sample_clients
from dali_fl.engine.run import prepare, train
from dali_fl.errors import DaliFlError
from dali_fl.seeds import stream
from tests.tiny import tiny_args, tiny_config, tiny_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("clock-store"))


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """A two-round run for the plot tests, which only read it."""
    run = tmp_path_factory.mktemp("clock-run") / "run"
    train(tiny_config(store, rounds=2, local_bs=25), run, progress=False)
    return run


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lognormal_spread_is_the_ratio_of_the_90th_to_the_10th_percentile():
    draws = lognormal(stream(0, 1), median=50.0, spread=10.0, n=200_000)
    p10, p50, p90 = np.percentile(draws, [10, 50, 90])
    assert p90 / p10 == pytest.approx(10.0, rel=0.02)
    assert p50 == pytest.approx(50.0, rel=0.02)
    assert (lognormal(stream(0, 1), 50.0, 1.0, 7) == 50.0).all()  # spread 1: every client alike


def test_profiles_depend_on_the_seed_alone():
    clock = ClockConfig(speed_spread=10, bandwidth_spread=4)
    a, b, c = drawn_profiles(clock, 20, 0), drawn_profiles(clock, 20, 0), drawn_profiles(clock, 20, 1)
    assert np.array_equal(a.speed, b.speed) and np.array_equal(a.down, b.down)
    assert not np.array_equal(a.speed, c.speed)
    assert np.allclose(a.up, a.down)  # upload defaults to the download bandwidth


def test_plan_drops_late_clients_keeps_the_first_m_and_skips_offline_ones():
    seconds = np.array([1.0, 5.0, 2.0, 9.0, 3.0])
    always = Profiles(np.ones(5), np.ones(5), np.ones(5))
    sampled = np.array([0, 1, 3, 4])
    p = plan_round(1, 10.0, sampled, seconds, always, ClockConfig(), 4)
    assert p.clients.tolist() == [0, 1, 3, 4] and p.end_s == 19.0 and p.dropped == 0
    p = plan_round(1, 10.0, sampled, seconds, always, ClockConfig(deadline=4.0), 4)
    assert p.clients.tolist() == [0, 4] and p.dropped == 2 and p.end_s == 14.0  # waited for the deadline
    p = plan_round(1, 0.0, sampled, seconds, always, ClockConfig(over_select=1.5), 2)
    assert p.clients.tolist() == [0, 4] and p.dropped == 2 and p.end_s == 3.0  # ends when the m-th arrives
    windows = tuple(np.array([[0.0, 5.0]]) if c == 0 else np.zeros((0, 2)) for c in range(5))
    p = plan_round(1, 6.0, sampled, seconds, Profiles(np.ones(5), np.ones(5), np.ones(5), windows), ClockConfig(), 4)
    assert p.clients.tolist() == [1, 3, 4] and p.unavailable == 1


def test_over_selection_with_fewer_online_than_m_ends_when_the_last_online_client_does():
    # Clients 0-2 come online at 100 s; client 3 alone trains at 0 s. The round said it lasted 100 s.
    windows = tuple(np.array([[100.0, 200.0]]) if c < 3 else np.zeros((0, 2)) for c in range(4))
    offline_until_100 = Profiles(np.ones(4), np.ones(4), np.ones(4), windows)
    p = plan_round(1, 0.0, np.arange(4), np.full(4, 0.75), offline_until_100, ClockConfig(over_select=2.0), 2)
    assert p.clients.tolist() == [3] and p.end_s == 0.75 and p.unavailable == 3
    p = plan_round(1, 0.0, np.arange(4), np.full(4, 0.75), offline_until_100, ClockConfig(over_select=2.0,
                                                                                           deadline=5.0), 2)
    assert p.clients.tolist() == [3] and p.end_s == 5.0  # with a deadline it waits for the others until then


def test_over_selection_puts_clients_without_samples_last():
    # Download and upload alone: the fastest, so they took the m slots and gave nothing.
    always = Profiles(np.ones(4), np.ones(4), np.ones(4))
    p = plan_round(1, 0.0, np.arange(4), np.array([0.1, 0.2, 3.0, 4.0]), always, ClockConfig(over_select=2.0), 2,
                   trains=np.array([False, False, True, True]))
    assert p.clients.tolist() == [2, 3] and p.end_s == 4.0 and p.dropped == 2


def test_over_selection_breaks_ties_by_a_draw_not_by_client_id(store, tmp_path):
    # Equal speeds and equal shares: every client finishes together, and the lowest ids always won.
    fx, _ = prepare(tiny_config(store, over_select=2.0), tmp_path / "r", resume=False, write=False)
    try:
        kept = [fx.timeline.plan(r, sample_clients).clients.tolist() for r in range(1, 21)]
    finally:
        fx.close()
    assert all(len(k) == 2 for k in kept) and len(set(map(tuple, kept))) > 2
    assert sorted({c for k in kept for c in k}) == [0, 1, 2, 3]


def test_every_row_has_the_simulated_clock(store, tmp_path):
    cfg = tiny_config(store, rounds=3, local_bs=25, speed=25.0, bandwidth=2.0)
    train(cfg, tmp_path / "run", progress=False)
    fx, _ = prepare(cfg, tmp_path / "x", resume=False, write=False)
    values, sizes = fx.upload_values(0), fx.partition.sizes()
    fx.close()
    t = 0.0
    for row in rows(tmp_path / "run"):
        clients = sample_clients(cfg, row["round"])
        slowest = max(2 * values * 4 / 1e6 / 2.0 + sizes[c] / 25.0 for c in clients)  # down + 1 epoch + up
        t += slowest
        assert row["sim_time_s"] == pytest.approx(t)
        assert row["clients_dropped"] == 0 and row["clients_sampled"] == row["num_clients"] == 2


def test_deadline_and_over_selection_aggregate_fewer_and_count_the_rest(store, tmp_path):
    common = dict(rounds=2, local_bs=25, speed_spread=10.0, frac=0.5)
    train(tiny_config(store, over_select=2.0, **common), tmp_path / "over", progress=False)
    for row in rows(tmp_path / "over"):
        assert row["clients_sampled"] == 4 and row["num_clients"] == 2 and row["clients_dropped"] == 2
    fx, _ = prepare(tiny_config(store, **common), tmp_path / "x", resume=False, write=False)
    seconds = fx.timeline.seconds
    fx.close()
    train(tiny_config(store, deadline=float(np.median(seconds)), **common), tmp_path / "deadline", progress=False)
    got = rows(tmp_path / "deadline")
    assert all(r["num_clients"] + r["clients_dropped"] == 2 for r in got)
    assert sum(r["clients_dropped"] for r in got) > 0
    assert all(r["sim_round_s"] <= float(np.median(seconds)) + 1e-9 for r in got)


def test_resume_replays_the_clock(store, tmp_path):
    common = dict(local_bs=25, speed_spread=10.0, deadline=0.0, over_select=1.5)
    train(tiny_config(store, rounds=3, **common), tmp_path / "full", progress=False)
    train(tiny_config(store, rounds=2, **common), tmp_path / "part", progress=False)
    train(tiny_config(store, rounds=3, **common), tmp_path / "part", resume=True, progress=False)
    assert [r["sim_time_s"] for r in rows(tmp_path / "full")] == [r["sim_time_s"] for r in rows(tmp_path / "part")]


def write_trace(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_gives_speeds_bandwidths_and_availability(store, tmp_path):
    trace = write_trace(tmp_path / "t.csv", ["client,speed,bandwidth,upload_bandwidth,available",
                                             "0,10,1,0.5,", "1,20,2,,0-1", "2,30,3,,", "3,40,4,,"])
    p = read_trace(trace, 4)
    assert p.speed.tolist() == [10, 20, 30, 40] and p.up.tolist() == [0.5, 2, 3, 4]
    assert p.available(1, 0.5) and not p.available(1, 2.0) and p.available(0, 1e9)
    train(tiny_config(store, rounds=4, frac=1.0, local_bs=25, trace=str(trace)), tmp_path / "run", progress=False)
    got = rows(tmp_path / "run")
    assert got[0]["clients_unavailable"] == 0 and all(r["clients_unavailable"] == 1 for r in got[1:])


@pytest.mark.parametrize("lines, words", [
    (["client,speed", "0,1"], ["header", "bandwidth"]),
    (["client,speed,bandwidth", "0,1,1", "1,1,1", "2,1,1", "7,1,1"], ["client 7", "outside"]),
    (["client,speed,bandwidth", "0,1,1", "1,1,1", "2,1,1"], ["no row for client 3"]),
    (["client,speed,bandwidth", "0,1,1", "1,0,1", "2,1,1", "3,1,1"], ["speed must be > 0"]),
    (["client,speed,bandwidth", "0,1,1", "1,1,fast", "2,1,1", "3,1,1"], ["not a number"]),
    (["client,speed,bandwidth,available", "0,1,1,5-2", "1,1,1,", "2,1,1,", "3,1,1,"], ["window"]),
    # `,` for `;` between windows: csv put 10-20 beyond the header, and the second window was lost.
    (["client,speed,bandwidth,available", "0,1,1,0-5,10-20", "1,1,1,", "2,1,1,", "3,1,1,"],
     ["line 2", "1 more field(s)", "(10-20)", "';'"]),
    (["client,speed,bandwidth,speed", "0,1,1,9", "1,1,1,9", "2,1,1,9", "3,1,1,9"], ["column speed twice"]),
])
def test_bad_traces_are_refused(tmp_path, lines, words):
    with pytest.raises(DaliFlError) as err:
        read_trace(write_trace(tmp_path / "t.csv", lines), 4)
    for word in words:
        assert word in str(err.value)


def test_a_trace_saved_with_a_byte_order_mark_reads(tmp_path):
    # Spreadsheets write one; "\ufeffclient" was not the client column, and the trace was refused as lacking it.
    trace = tmp_path / "t.csv"
    trace.write_bytes("\ufeffclient,speed,bandwidth\n0,10,1\n1,20,2\n".encode("utf-8"))
    assert read_trace(trace, 2).speed.tolist() == [10, 20]


def test_a_trace_that_is_not_a_text_file_is_one_line_and_a_link_is_followed(tmp_path):
    os.mkfifo(tmp_path / "fifo.csv")  # a read would block for ever, /dev/zero never end
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 4)
    for path, words in ((tmp_path / "fifo.csv", "is a FIFO"), (Path("/dev/zero"), "is a device"),
                        (tmp_path, "is a directory"), (tmp_path / "binary.csv", "is not text")):
        with pytest.raises(DaliFlError, match=words):
            read_trace(path, 4)
    trace = write_trace(tmp_path / "t.csv", ["client,speed,bandwidth", *(f"{c},{c + 1},1" for c in range(4))])
    (tmp_path / "link.csv").symlink_to(trace)  # traces/latest.csv -> a dated file: what a user would keep
    assert read_trace(tmp_path / "link.csv", 4).speed.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("args, words", [
    (["--speed", "0"], ["--speed", "> 0"]),
    (["--bandwidth", "-1"], ["--bandwidth", "> 0"]),
    (["--speed-spread", "0.5"], ["--speed-spread", ">= 1"]),
    (["--trace", "no-such.csv"], ["cannot read --trace"]),
    (["--deadline", "1e-6"], ["--deadline", "no client"]),
    (["--speed", "1e-320"], ["1e+12 s", "far below"]),  # metrics.jsonl held Infinity and NaN
    (["--bandwidth", "1e-300"], ["1e+12 s", "far below"]),
    (["--over-select", "3"], ["--over-select", "more than"]),
    (["--deadline", "5", "--dp-clip", "1"], ["--deadline", "--dp-clip"]),
])
def test_bad_clock_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    out = tmp_path / "run"
    assert_user_error(invoke("train", "--store", store, "--out", out, *tiny_args(), *args), *words)
    assert not out.exists()


def test_dp_takes_a_trace_of_speeds_but_not_one_that_leaves_clients_out(store, tmp_path):
    # Speeds and bandwidths change the clock only: every sampled client still counts, as DP's sampling rate says.
    speeds = write_trace(tmp_path / "s.csv", ["client,speed,bandwidth", *(f"{c},{c + 1},1" for c in range(4))])
    cfg = tiny_config(store, dp_clip=1.0, dp_noise=0.5, trace=str(speeds))
    assert cfg.clock.trace == str(speeds) and cfg.algorithms["dp"].dp_clip == 1.0
    windows = write_trace(tmp_path / "w.csv", ["client,speed,bandwidth,available", "0,1,1,0-5",
                                               *(f"{c},{c + 1},1," for c in range(1, 4))])
    with pytest.raises(DaliFlError, match="with --trace's availability windows, .* drop --trace or --dp-clip"):
        tiny_config(store, dp_clip=1.0, dp_noise=0.5, trace=str(windows))


@pytest.mark.parametrize("name,value", [("speed", 5.0), ("speed_spread", 10.0), ("bandwidth", 0.5),
                                        ("upload_bandwidth", 0.1), ("bandwidth_spread", 10.0)])
def test_a_trace_refuses_the_drawn_speeds_it_replaces(store, tmp_path, name, value):
    # They were accepted and recorded in config.json, and the simulated time was the trace's alone.
    trace = write_trace(tmp_path / "t.csv", ["client,speed,bandwidth", *(f"{c},{c + 1},1" for c in range(4))])
    with pytest.raises(DaliFlError, match=f"--{name.replace('_', '-')} {value} sets the drawn .* --trace replaces"):
        tiny_config(store, trace=str(trace), **{name: value})
    assert tiny_config(store, trace=str(trace)).clock.trace == str(trace)


def test_flower_refuses_what_it_does_not_run(store):
    from dali_fl.flower.options import config_from_run_config, run_config_from_options

    base = {"store": str(store), "device": "cpu"}
    config_from_run_config(run_config_from_options({**base, "speed_spread": 10.0}, Path("out")))  # sim_time_s only
    with pytest.raises(DaliFlError, match="--deadline runs in `dali-fl train`"):
        config_from_run_config(run_config_from_options({**base, "deadline": 3.0}, Path("out")))


def test_plot_against_simulated_time(finished, tmp_path):
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(finished),
                           "--x", "sim_time", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0 and "sim_time_s" in done.stdout


@pytest.mark.parametrize("args,words", [
    (["RUN", "NOPE"], ["nope does not exist"]),  # checked before any run's table is printed
    (["RUN", "--out", "OUT"], ["already exists", "--force"]),  # a file of the user's is kept
    (["RUN", "--out", "curves.xyz"], [".xyz", ".png"]),
    (["RUN", "--out", "missing/curves.png"], ["does not exist"]),
    (["RUN", "--x", "bogus"], ["--x", "invalid choice", "--help"]),  # argparse's usage error, in one line
])
def test_plot_metrics_refuses_in_one_line_before_printing(finished, tmp_path, args, words):
    run, out = finished, tmp_path / "mine.png"
    out.write_bytes(b"precious")
    subst = {"RUN": str(run), "NOPE": str(tmp_path / "nope"), "OUT": str(out)}
    argv = [subst.get(a, str(tmp_path / a) if "." in a else a) for a in args]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), *argv], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stdout == "" and out.read_bytes() == b"precious"
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and all(w in line for w in words), line


@pytest.mark.parametrize("edit,words", [
    (lambda row: row.pop("round_time_s"), "round_time_s = None"),  # a KeyError halfway through the table
    (lambda row: row.update(test_acc="0.5"), "test_acc = '0.5'"),  # a format-code ValueError
    (lambda row: row.update(test_acc=0.5, test_loss=None), "test_acc without test_loss"),  # a KeyError in plot
])
def test_plot_metrics_refuses_rows_it_cannot_read_in_one_line(finished, tmp_path, edit, words):
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(finished, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    edit(rows[-1])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(run)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stdout == "", (done.stdout, done.stderr)
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and f"row {len(rows)} has {words}" in line, line


@pytest.mark.parametrize("where", ["import", "run"])
def test_a_ctrl_c_in_plot_metrics_is_one_line_and_130(finished, where):
    """While it imports dali_fl (the likeliest moment), or while it reads a run."""
    script = ROOT / "tools" / "plot_metrics.py"
    patch = ("import builtins\nreal = builtins.__import__\ndef imp(name, *a, **k):\n"
             "    if name == 'dali_fl.atomic':\n        raise KeyboardInterrupt\n    return real(name, *a, **k)\n"
             "builtins.__import__ = imp\n") if where == "import" else (
             "import dali_fl.engine.rundir as r\ndef stop(*a):\n    raise KeyboardInterrupt\nr.read_metrics = stop\n")
    code = (f"import sys, runpy\nsys.path.insert(0, {str(ROOT)!r})\n{patch}"
            f"sys.argv = ['plot_metrics.py', {str(finished)!r}]\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr == "error: interrupted\n", done.stderr


def test_a_deadline_only_clients_without_samples_meet_is_refused():
    """An empty client's transfers alone fit a short deadline: every round would aggregate nothing but them."""
    from dali_fl.engine.clock import check_deadline

    seconds, trains = np.array([0.012, 0.022, 0.03]), np.array([False, True, True])
    with pytest.raises(DaliFlError, match="no client with samples can finish a round in time .the fastest takes 0.022"):
        check_deadline(ClockConfig(deadline=0.015), seconds, trains)
    check_deadline(ClockConfig(deadline=0.025), seconds, trains)  # the fastest with samples makes it


def test_config_json_round_trips_the_clock(store):
    cfg = tiny_config(store, speed_spread=3.0, deadline=2.5)
    assert TrainConfig.from_json(cfg.to_json()).clock == cfg.clock


def test_a_run_whose_every_round_aggregated_nobody_says_so(tmp_path, caplog):
    from dali_fl.engine.run import write_summary

    empty = {"num_clients": 0, "num_samples": 0, "clients_sampled": 2, "round_time_s": 0.0}
    write_summary(tmp_path, [{"round": 1, **empty}, {"round": 2, **empty, "num_clients": 1}])  # an empty client
    assert "no round trained on any sample" in caplog.text
    caplog.clear()
    write_summary(tmp_path, [{"round": 1, **empty}, {"round": 2, **empty, "num_clients": 1, "num_samples": 5}])
    assert "no round trained" not in caplog.text


def test_a_resume_follows_a_moved_trace_but_refuses_an_edited_one(store, tmp_path):
    from dali_fl.config import load_config

    trace = write_trace(tmp_path / "t.csv", ["client,speed,bandwidth", "0,10,1", "1,20,2", "2,30,3", "3,40,4"])
    run = tmp_path / "run"
    train(tiny_config(store, rounds=1, local_bs=25, trace=str(trace)), run, progress=False)

    def resume(trace_path: str) -> None:
        doc = json.loads((run / "config.json").read_text())
        doc["clock"]["trace"] = trace_path  # a hand edit: the trace moved
        (run / "config.json").write_text(json.dumps(doc))
        cfg = load_config(run)
        train(cfg.replace(fed={"rounds": cfg.fed.rounds + 1}), run, resume=True, progress=False)

    moved = trace.rename(tmp_path / "moved.csv")
    resume(str(moved))  # the same contents at another path
    moved.write_text(moved.read_text().replace("0,10,1", "0,99,1"))
    with pytest.raises(DaliFlError, match="moved.csv .clock.trace in config.json. is not the file this run started"):
        resume(str(moved))
    with pytest.raises(DaliFlError, match="no longer names the clock.trace file"):
        resume("")
