"""The run directory's guarantees: one writer, nothing NaN or half-made saved, tampered files refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import write_store
from dali_fl.engine.rundir import RunLock
from dali_fl.errors import DaliFlError
from tests.tiny import tiny_args, tiny_store

TINY = tiny_args(alg="fedlora", lora_r=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("stores"))


def _train(invoke, store, out, *extra):
    return invoke("train", "--store", store, "--out", out, *TINY, *extra)


def _finished(invoke, store, out, rounds=2):
    result = _train(invoke, store, out, "--rounds", rounds)
    assert result.exit_code == 0, result.output
    return out


def test_a_second_holder_of_a_run_directory_is_refused_and_named(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(DaliFlError, match=f"in use by another dali-fl train \\(process {os.getpid()}\\)"):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released on exit: the next holder gets it at once
        pass


def _cli(*args: object, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dali_fl", "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(proc: subprocess.Popen, path: Path, timeout: float = 300.0) -> None:
    """Until `path` exists, failing early (with the process's stderr) if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_real_processes_on_one_out_only_one_runs_and_a_killed_holder_frees_it(store, tmp_path):
    out = tmp_path / "run"
    first = _cli("--store", store, "--out", out, *TINY, "--rounds", 500)
    try:
        _wait_for(first, out / "config.json")
        first.send_signal(signal.SIGSTOP)  # it holds the lock while stopped, and leaves the cores to the others
        second = _cli("--store", store, "--out", out, *TINY, "--rounds", 1)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2 and err.strip().splitlines() == [
            f"error: {out} is in use by another dali-fl train (process {first.pid}); wait for it to finish "
            "or choose another --out"]
        resumed = _cli("--resume", out, "--quiet")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 2 and f"process {first.pid}" in err
        assert first.poll() is None, "the first run must still be running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    meta = out / "checkpoint" / "meta.json"
    done = json.loads(meta.read_text())["round"] if meta.exists() else 0
    again = _cli("--resume", out, "--rounds", done + 1, "--quiet")  # takes the lock at once: kill -9 left none
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err


def test_non_finite_weights_with_a_finite_loss_are_not_saved(invoke, assert_user_error, store, tmp_path,
                                                             monkeypatch):
    import dali_fl.engine.federation as fed

    real = fed.local_train

    def poisoning(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        return result  # the loss it reports is still finite

    monkeypatch.setattr(fed, "local_train", poisoning)
    assert_user_error(_train(invoke, store, tmp_path / "r", "--rounds", 2), "round 1", "non-finite", "not saved")
    assert not (tmp_path / "r" / "checkpoint").exists()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize("args,words", [
    (("--seed", "-1"), ("--seed",)),
    (("--weight-decay", "-1"), ("--weight-decay",)),
    (("--momentum", "nan", "--optimizer", "sgd"), ("--momentum", "finite")),
    (("--model-kwargs", "patch_size=0"), ("patch_size=0", "from 1 to")),
    (("--model-kwargs", "patch_size=4,depth=-1"), ("depth=-1", "from 1 to")),
    (("--model-kwargs", "patch_size=4,embed_dim=0"), ("embed_dim=0", "from 1 to")),
    (("--model-kwargs", "patch_size=4,embed_dim=30,num_heads=4"), ("vit_tiny_patch16_224",)),
    (("--lora-targets", "["), ("'['", "regular expression")),
    (("--lora-targets", ","), ("--lora-targets", "no module")),
    (("--nproc", "0"), ("--nproc", "x>=1")),
    (("--nproc", "-2"), ("--nproc", "x>=1")),
    (("--alg", "bogus"), ("--alg", "'fedavg', 'fedlora'")),
    (("--preset", "nope"), ("--preset", "tiny-32")),
    (("--image-size", "x"), ("--image-size", "not a valid integer")),
])
def test_bad_options_fail_in_one_line_before_any_directory_exists(invoke, assert_user_error, store, tmp_path,
                                                                 args, words):
    assert_user_error(_train(invoke, store, tmp_path / "r", "--rounds", 1, *args), *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,words", [
    (("prep", "--source", "bogus"), ("--source", "'synthetic'")),
    (("prep", "--image-size", "abc"), ("--image-size", "integer")),
    (("partition", "STORE", "--num-users", "4", "--seed", "-1"), ("--seed",)),
    (("trian",), ("trian", "train")),
    (("train", "--store", "STORE", "--alg", "fedavg", "--lora-r", "4"), ("--lora-r", "--alg fedlora")),
    (("train", "--store", "STORE", "--alg", "fedavg", "--lora-agg", "fedex"), ("--lora-agg", "--alg fedlora")),
    # Options another option's value makes the run ignore, while config.json would record them:
    (("train", "--store", "STORE", "--partition", "iid", "--alpha", "0.1"), ("--alpha 0.1", "--partition dirichlet")),
    (("train", "--store", "STORE", "--partition", "shards", "--min-size", "3"), ("--min-size 3", "dirichlet")),
    (("train", "--store", "STORE", "--partition", "dirichlet", "--shards", "5"), ("--shards 5", "--partition shards")),
    (("train", "--store", "STORE", "--momentum", "0.5"), ("--momentum 0.5", "--optimizer adamw ignores it")),
    (("train", "--store", "STORE", "--num-workers", "8"), ("--num-workers 8", "--loader dali ignores it")),
    (("train", "--store", "STORE", "--loader", "memmap-seed", "--num-workers", "0"), ("--loader memmap-seed ignores",)),
    (("train", "--store", "STORE", "--dp-clip", "1", "--dp-clip-lr", "0.3"), ("--dp-clip-lr", "--dp-adaptive-clip")),
    (("partition", "STORE", "--partition", "iid", "--alpha", "0.1"), ("--alpha 0.1", "--partition iid ignores it")),
    (("train", "--store", "STORE", "--model_variant", "scratch", "--pretrained"), ("--model-variant", "disagree")),
    (("train", "--store", "STORE", "--model_variant", "pretrained", "--no-pretrained"), ("--no-pretrained",)),
])
def test_usage_errors_are_one_line_with_the_choices(invoke, assert_user_error, store, args, words):
    assert_user_error(invoke(*[store if a == "STORE" else a for a in args]), *words)


def test_a_run_killed_before_its_config_starts_fresh_and_one_killed_after_resumes(invoke, store, tmp_path,
                                                                                  monkeypatch):
    import dali_fl.engine.run as run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "atomic_write_text", killed)  # after the partition, before config.json
    result = _train(invoke, store, tmp_path / "r", "--rounds", 1)
    assert result.exit_code == 130 and "--resume" not in result.output  # there is no run to continue
    assert _interrupted_line(result) == "error: interrupted; nothing half-written was kept"
    empty = tmp_path / "given"
    empty.mkdir()  # a directory the user made for the run: it stays, empty again
    assert _train(invoke, store, empty, "--rounds", 1).exit_code == 130
    assert sorted(p.name for p in empty.iterdir()) in ([], [".lock"])
    monkeypatch.undo()
    assert not (tmp_path / "r").exists()
    _finished(invoke, store, tmp_path / "r", rounds=1)  # a fresh run takes the directory

    import dali_fl.engine.federation as fed

    monkeypatch.setattr(fed, "local_train", killed)  # config.json written, no round finished
    result = _train(invoke, store, tmp_path / "s", "--rounds", 1)
    assert result.exit_code == 130
    assert _interrupted_line(result) == f"error: interrupted; continue with `dali-fl train --resume {tmp_path / 's'}`"
    monkeypatch.undo()
    assert (tmp_path / "s" / "config.json").exists() and not (tmp_path / "s" / "checkpoint").exists()
    result = invoke("train", "--resume", tmp_path / "s", "--quiet")
    assert result.exit_code == 0, result.output


def _interrupted_line(result) -> str:
    """The one line an interrupted command ends with (no traceback before it)."""
    assert "Traceback" not in result.output, result.output
    return result.output.rstrip("\n").splitlines()[-1]


def test_a_ctrl_c_while_a_checkpoint_is_written_keeps_the_last_whole_one_and_no_temp(invoke, store, tmp_path,
                                                                                     monkeypatch):

    run = _finished(invoke, store, tmp_path / "r", rounds=1)
    before = load_file(str(run / "checkpoint" / "state.safetensors"))

    real = Path.write_bytes

    def killed(path, data):
        if path.name != "state.safetensors":
            return real(path, data)
        real(path, data[:4])  # part of the new checkpoint is on disk when the Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", killed)
    result = invoke("train", "--resume", run, "--rounds", 2, "--quiet")
    assert result.exit_code == 130 and "--resume" in _interrupted_line(result)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock") == []
    after = load_file(str(run / "checkpoint" / "state.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.undo()
    assert invoke("train", "--resume", run, "--rounds", 2, "--quiet").exit_code == 0


def test_a_ctrl_c_while_the_commands_are_imported_is_one_line(monkeypatch):
    import importlib

    from click.testing import CliRunner

    from dali_fl.cli import _Group

    def interrupted(name):
        raise KeyboardInterrupt  # torch's import takes seconds: the likeliest moment for a Ctrl-C

    monkeypatch.setattr(importlib, "import_module", interrupted)
    result = CliRunner().invoke(_Group("dali-fl"), ["train", "--help"])
    assert result.exit_code == 130 and _interrupted_line(result) == "error: interrupted"


def test_a_ctrl_c_while_click_is_imported_is_one_line():
    # What the console script does (`from dali_fl.cli import main`), with the Ctrl-C landing in `import click`.
    code = ("import builtins\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n    if name == 'click':\n        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\nbuiltins.__import__ = imp\nfrom dali_fl.cli import main\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr == "error: interrupted\n", proc.stderr


def test_the_command_list_answers_without_importing_torch():
    # Every command module imports torch (3 s here); listing them, or a mistyped one, needs none of it.
    code = ("import sys\nfrom dali_fl.cli import main\nsys.argv = ['dali-fl', sys.argv[1]]\n"
            "try:\n    main()\nfinally:\n    print('torch' in sys.modules, file=sys.stderr)\n")
    listed = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and listed.stderr == "False\n", listed.stderr
    assert all(f"  {name} " in listed.stdout for name in ("flower", "partition", "prep", "train", "verify"))
    typo = subprocess.run([sys.executable, "-c", code, "trian"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and typo.stderr.startswith("error: No such command 'trian'"), typo.stderr
    assert typo.stderr.endswith("False\n"), typo.stderr


def test_the_command_list_says_what_each_command_says_of_itself():
    import click

    from dali_fl.cli import COMMANDS, cli

    ctx = click.Context(cli)
    for name, (_, line) in COMMANDS.items():
        command = cli.get_command(ctx, name)
        assert command.name == name and command.help.split("\n\n")[0] == line, name
    assert sorted(c.name for c in cli.commands.values()) == sorted(COMMANDS)  # every command the modules hold


def test_a_full_disk_at_the_metrics_row_or_the_lock_is_one_line(invoke, assert_user_error, store, tmp_path,
                                                                monkeypatch):
    import errno

    from dali_fl.engine import rundir

    real_fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", full)  # the row's append: it was a traceback and exit 1
    assert_user_error(_train(invoke, store, tmp_path / "r", "--rounds", 1), "cannot append round 1",
                      "metrics.jsonl", "No space left", "--resume")
    monkeypatch.undo()

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "pwrite", no_room)  # the lock's pid: a traceback, and the directory stayed
    with RunLock(tmp_path / "locked"):
        pass


def test_resume_cannot_go_below_the_finished_rounds(invoke, assert_user_error, store, tmp_path):
    run = _finished(invoke, store, tmp_path / "r", rounds=2)
    config = (run / "config.json").read_text()
    assert_user_error(invoke("train", "--resume", run, "--rounds", 1), "finished round 2", "--rounds 2")
    assert (run / "config.json").read_text() == config


def test_a_relative_store_is_saved_absolute_so_resume_works_from_elsewhere(invoke, store, tmp_path, monkeypatch):
    monkeypatch.chdir(store.parent)
    _finished(invoke, Path(store.name), tmp_path / "r", rounds=1)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["store"] == str(store)
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--resume", tmp_path / "r", "--rounds", 2, "--quiet")
    assert result.exit_code == 0, result.output


def _tamper_partition(run: Path) -> None:
    doc = json.loads((run / "partition.json").read_text())
    doc["clients"][0]["indices"][-1] = 10**6
    (run / "partition.json").write_text(json.dumps(doc))


def _tamper_meta(content: str):
    return lambda run: (run / "checkpoint" / "meta.json").write_text(content)


def _wrong_shape(run: Path) -> None:
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3, 3)
    save_file(tensors, str(path))


def _one_weight(run: Path) -> None:
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name].view(-1)[0] += 1  # same names, shapes and size: it resumed as if nothing had happened
    save_file(tensors, str(path))


def _non_object_metrics_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")


@pytest.mark.parametrize("tamper,words", [
    (_tamper_partition, ("partition.json", "not the partition this run started with")),
    (_tamper_meta("{}"), ("meta.json", "no valid round")),
    (_tamper_meta('{"round": "2"}'), ("meta.json", "no valid round")),
    (_wrong_shape, ("state.safetensors", "sha256 differs")),
    (_one_weight, ("state.safetensors", "sha256 differs", "changed after the run wrote it")),
    (_non_object_metrics_line, ("metrics.jsonl line 2",)),
])
def test_tampered_run_files_are_refused_on_resume(invoke, assert_user_error, store, tmp_path, tamper, words):
    run = _finished(invoke, store, tmp_path / "r", rounds=2)
    tamper(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3), *words)


class _NotATensor:
    pass


def test_a_store_whose_labels_changed_is_refused_on_resume(invoke, assert_user_error, tmp_path):
    # Only the manifest was compared: labels edited in place (the manifest untouched) resumed silently.
    import numpy as np

    own = tiny_store(tmp_path / "data")
    run = _finished(invoke, own, tmp_path / "r", rounds=1)
    labels = own / "train_labels.npy"
    np.save(labels, (np.load(labels) + 1) % 10)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 2, "--quiet"), "train_labels.npy",
                      "differs from the labels", "dali-fl verify")


def test_unsafe_or_garbage_weights_are_one_line(invoke, assert_user_error, tmp_path):
    store, _ = write_store(load_synthetic(8, 4, seed=0), tmp_path, 224, progress=False)  # pretrained ViTs want 224
    torch.save({"model": _NotATensor()}, tmp_path / "pickled.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    common = ("--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2",
              "--device", "cpu", "--num-users", "2", "--rounds", "1")
    os.mkfifo(tmp_path / "fifo.pth")  # loading it would block
    (tmp_path / "junk.pth").write_bytes(bytes(range(7, 250)))
    (tmp_path / "text.pth").write_bytes(b"hello world this is junk" * 10)  # torch.load: a bare KeyError 101
    for weights, words in (("pickled.pth", ("pickle", "safetensors")), ("garbage.safetensors", ("cannot be read",)),
                           ("fifo.pth", ("is a FIFO, not a file",)), ("junk.pth", ("not a PyTorch checkpoint",)),
                           ("text.pth", ("cannot be read", "(KeyError: "))):
        result = invoke("train", "--store", store, "--out", tmp_path / "r", *common, "--weights", tmp_path / weights)
        assert_user_error(result, weights, *words)
    # Random init would ignore the file, while config.json named it: the run would look as if it used them.
    result = invoke("train", "--store", store, "--out", tmp_path / "r", *common, "--weights",
                    tmp_path / "garbage.safetensors", "--no-pretrained")
    assert_user_error(result, "--weights", "only with --pretrained", "drop --weights")
    assert not (tmp_path / "r").exists()


def test_a_bare_group_prints_its_help_not_an_error(invoke):
    result = invoke("flower")
    assert result.output.startswith("Usage: cli flower") and "error:" not in result.output  # CliRunner names it cli


def test_a_run_stopped_at_an_unevaluated_round_reports_that_rounds_accuracy_as_final(invoke, store, tmp_path,
                                                                                   monkeypatch):
    # Killed in round 4 of 4 with --eval-every 2, then resumed with --rounds 3: no round was left to play, and the
    # summary called round 2's accuracy final.
    from tests.tiny import kill_at_client

    whole = _train(invoke, store, tmp_path / "whole", "--rounds", 3, "--eval-every", 2)
    assert whole.exit_code == 0, whole.output
    kill_at_client(monkeypatch, 7)  # two clients a round: the first of round 4
    assert _train(invoke, store, tmp_path / "cut", "--rounds", 4, "--eval-every", 2).exit_code == 130
    monkeypatch.undo()
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1]["test_acc"] is None
    result = invoke("train", "--resume", tmp_path / "cut", "--rounds", 3, "--quiet")
    assert result.exit_code == 0, result.output
    want, got = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("whole", "cut"))
    assert want["final_test_acc"] != [r["test_acc"] for r in rows if r["test_acc"] is not None][-1]
    assert got["final_test_acc"] == want["final_test_acc"] and got["rounds"] == 3


def test_a_finished_run_continued_and_interrupted_has_no_summary_of_the_shorter_run(invoke, store, tmp_path,
                                                                                   monkeypatch):
    from tests.tiny import kill_at_client

    run = _finished(invoke, store, tmp_path / "r", rounds=1)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 1
    kill_at_client(monkeypatch, 3)  # the first client of round 3: round 2 is logged
    assert invoke("train", "--resume", run, "--rounds", 3, "--quiet").exit_code == 130
    assert not (run / "summary.json").exists()  # it said a 1-round run was finished
