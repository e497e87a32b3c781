"""`dali-fl prep` and `dali-fl verify` end to end, their one-line errors, and the CI entry point."""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import marker_image
from PIL import Image

import dali_fl.cli.prep as prep_cli
from dali_fl.data.sources import Source, SourceSplit
from dali_fl.data.store import open_store, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ("--source", "synthetic", "--num-train", "40", "--num-test", "10", "--quiet")


def stores_under(out: Path) -> list[Path]:
    """Everything a prep may leave in OUT apart from the downloads folder."""
    return sorted(p for p in out.iterdir() if p.name != "downloads") if out.exists() else []


def last_line(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


# --- good runs ------------------------------------------------------------------------------

def test_prep_then_verify_synthetic(invoke, tmp_path):
    result = invoke("prep", *SYNTH, "--image-size", "48", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    path = tmp_path / "synthetic-48"
    assert last_line(result.output) == str(path)
    assert last_line(result.stdout) == str(path)
    assert "wrote 50 images" in result.output
    checked = invoke("verify", path)
    assert checked.exit_code == 0, checked.output
    assert "FAIL" not in checked.output and "samples train: 16/16 re-resized samples equal" in checked.output
    assert re.search(r"all \d+ checks passed", checked.output)
    assert "class0" in checked.output  # the class-count table


def test_last_line_is_the_path_with_a_progress_bar(invoke, tmp_path):
    result = invoke("prep", "--source", "synthetic", "--num-train", "30", "--num-test", "5",
                    "--image-size", "24", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert last_line(result.output) == str(tmp_path / "synthetic-24")


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_prep_cifar10_keeps_orientation_and_colour(invoke, make_cifar, tmp_path, form):
    files = make_cifar()
    src = files.folder if form == "folder" else files.archive()
    result = invoke("prep", "--source", "cifar10", "--source-path", src, "--image-size", "32",
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    store = open_store(last_line(result.output))
    img = store.images("train")[0]
    assert tuple(img[0, 0]) == (255, 0, 0)
    assert (img[0, 1:] == (0, 255, 0)).all() and (img[1:, 0] == (255, 255, 255)).all()
    assert np.array_equal(img, marker_image())
    assert np.array_equal(store.images("train"), files.train[0])
    assert np.array_equal(store.labels("test"), files.test[1])
    assert store.manifest["classes"] == list(files.classes)
    checked = invoke("verify", store.path, "--source-path", src)
    assert checked.exit_code == 0, checked.output
    assert "samples train: 15/15" in checked.output


def test_prep_cifar100_upsampled(invoke, make_cifar, tmp_path):
    files = make_cifar("cifar100", per_member=4)
    result = invoke("prep", "--source", "cifar100", "--source-path", files.archive(), "--image-size", "64",
                    "--interpolation", "bicubic", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "cifar100-64")
    assert store.num_classes == 100 and store.manifest["interpolation"] == "bicubic"
    assert store.images("train").shape == (4, 64, 64, 3)
    assert np.array_equal(store.labels("train"), files.train[1])
    checked = invoke("verify", store.path, "--source-path", files.folder)
    assert checked.exit_code == 0, checked.output
    unchecked = invoke("verify", store.path)  # every other check runs; the skipped one is said
    assert unchecked.exit_code == 0 and "skip  samples: no --source-path" in unchecked.output
    assert "samples train:" not in unchecked.output
    none = invoke("verify", store.path, "--source-path", files.folder, "--check-samples", "0")  # it read "0/0 equal"
    assert none.exit_code == 0 and "skip  samples: --check-samples 0" in none.output
    assert "samples train:" not in none.output


@pytest.mark.parametrize("option", ["--seed", "--num-train", "--num-test"])
def test_verify_refuses_source_options_it_would_ignore(invoke, made, assert_user_error, option):
    result = invoke("verify", made, option, "7")  # the synthetic store records its own settings
    assert_user_error(result, option, "does nothing", "manifest.json")
    assert option not in invoke("verify", "--help").output  # nor does the help offer it
    assert option in invoke("prep", "--help").output


def test_a_source_path_for_synthetic_data_is_refused_as_doing_nothing(invoke, made, assert_user_error, tmp_path):
    # verify passed every check with --source-path /nonexistent: the synthetic store is regenerated, not read.
    assert_user_error(invoke("verify", made, "--source-path", tmp_path / "nonexistent"), "--source-path",
                      "does nothing", "manifest.json")
    result = invoke("prep", *SYNTH, "--image-size", "16", "--source-path", made, "--out", tmp_path / "other")
    assert_user_error(result, "--source-path does nothing for --source synthetic")
    assert not (tmp_path / "other").exists()
    line = assert_user_error(invoke("train", "--dataset", "synthetic", "--image-size", "16", "--data-dir", tmp_path),
                             "no synthetic store", "prep --source synthetic --image-size 16")
    assert "--source-path" not in line  # prep would refuse it


def test_prep_npz(invoke, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([5, 0, 1, 2, 3, 4]), x_test=x[:2],
             y_test=np.array([1, 1]))
    result = invoke("prep", "--source", "npz", "--source-path", tmp_path / "d.npz", "--image-size", "16",
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "out" / "npz-16")
    assert np.array_equal(store.images("train"), x) and list(store.labels("train")) == [5, 0, 1, 2, 3, 4]
    assert store.num_classes == 6
    assert invoke("verify", store.path, "--source-path", tmp_path / "d.npz").exit_code == 0


def test_prep_of_another_npz_with_the_same_labels_is_refused(invoke, tmp_path, assert_user_error):
    # The second prep said "nothing to do" and left the first file's images to train on.
    labels = {"y_train": np.array([0, 1, 2, 0]), "y_test": np.array([1, 2])}
    for name, seed in (("a.npz", 1), ("b.npz", 2)):
        rng = np.random.default_rng(seed)
        np.savez(tmp_path / name, x_train=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
                 x_test=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), **labels)
    args = ("prep", "--source", "npz", "--image-size", "16", "--out", tmp_path / "out", "--quiet", "--source-path")
    assert invoke(*args, tmp_path / "a.npz").exit_code == 0
    again = invoke(*args, tmp_path / "a.npz")
    assert again.exit_code == 0 and "same source images" in again.output and "nothing to do" in again.output
    assert_user_error(invoke(*args, tmp_path / "b.npz"), "other data", "train images differ", "--force")
    assert invoke(*args, tmp_path / "b.npz", "--force").exit_code == 0


def test_prep_imagefolder_with_mixed_sizes(invoke, tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    sizes = {("train", "b_dog", 0): (32, 32), ("train", "a_cat", 1): (48, 20), ("train", "a_cat", 2): (32, 32),
             ("test", "b_dog", 3): (16, 16)}
    for (split, cls, i), (h, w) in sizes.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    result = invoke("prep", "--source", "imagefolder", "--source-path", root, "--image-size", "24",
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    store = open_store(tmp_path / "out" / "imagefolder-24")
    assert store.manifest["classes"] == ["a_cat", "b_dog"]
    assert list(store.labels("train")) == [0, 0, 1] and list(store.labels("test")) == [1]
    assert store.images("train").shape == (3, 24, 24, 3)
    assert invoke("verify", store.path, "--source-path", root).exit_code == 0


def test_prep_float32_store(invoke, tmp_path):
    u8 = invoke("prep", *SYNTH, "--image-size", "40", "--out", tmp_path)
    f32 = invoke("prep", *SYNTH, "--image-size", "40", "--dtype", "float32", "--out", tmp_path)
    assert u8.exit_code == f32.exit_code == 0, (u8.output, f32.output)
    assert last_line(f32.output) == str(tmp_path / "synthetic-40-f32")
    a = open_store(tmp_path / "synthetic-40").images("test")
    b = open_store(tmp_path / "synthetic-40-f32").images("test")
    assert b.dtype == np.float32 and b.min() >= 0 and b.max() <= 1
    assert np.array_equal(b, np.asarray(a, dtype=np.float32) / np.float32(255))
    assert invoke("verify", tmp_path / "synthetic-40-f32").exit_code == 0
    from dali_fl.errors import DaliFlError
    from dali_fl.loaders.memmap_seed import MemmapSeedLoader

    assert MemmapSeedLoader.open_store(tmp_path / "synthetic-40").path == tmp_path / "synthetic-40-f32"
    # Another seed's float32 store beside it: memmap-seed trained on it, and a resume checked the uint8 one.
    other = ("prep", "--source", "synthetic", "--num-train", "40", "--num-test", "10", "--seed", "5", "--quiet")
    assert invoke(*other, "--image-size", "40", "--dtype", "float32", "--out", tmp_path, "--force").exit_code == 0
    with pytest.raises(DaliFlError, match="was made from other data .its train images differ"):
        MemmapSeedLoader.open_store(tmp_path / "synthetic-40")


# --- idempotence and force -----------------------------------------------------------------

def test_prep_is_idempotent_and_force_rebuilds(invoke, tmp_path, assert_user_error):
    args = ("prep", *SYNTH, "--image-size", "32", "--out", tmp_path)
    assert invoke(*args).exit_code == 0
    path = tmp_path / "synthetic-32"
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    again = invoke(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert last_line(again.output) == str(path)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
    inode = path.stat().st_ino
    forced = invoke(*args, "--force")
    assert forced.exit_code == 0 and "wrote 50 images" in forced.output
    assert path.stat().st_ino != inode
    other = invoke("prep", "--source", "synthetic", "--num-train", "41", "--num-test", "10", "--quiet",
                   "--image-size", "32", "--out", tmp_path)
    assert_user_error(other, "other settings", "--force")
    assert open_store(path).manifest["source_params"]["num_train"] == 40
    assert stores_under(tmp_path) == [path]


# --- verify failures -------------------------------------------------------------------------

@pytest.fixture
def made(invoke, tmp_path) -> Path:
    result = invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path / "data")
    assert result.exit_code == 0, result.output
    return tmp_path / "data" / "synthetic-32"


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1000, 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x80]))


def set_label(store: Path, value: int, update_hash: bool) -> None:
    labels = np.load(store / "train_labels.npy")
    labels[3] = value
    np.save(store / "train_labels.npy", labels)
    if update_hash:
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["splits"]["train"]["labels"]["sha256"] = sha256_file(store / "train_labels.npy")
        (store / "manifest.json").write_text(json.dumps(manifest))


def newer_version(store: Path) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["format_version"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))


def swap_classes(store: Path) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["classes"][:2] = manifest["classes"][1::-1]
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, words", [
    (lambda s: flip_byte(s / "train_images.npy"), ["sha256 train_images.npy", "prep --force"]),
    (lambda s: os.truncate(s / "test_images.npy", 5000), ["manifest and files", "prep --force"]),
    (lambda s: set_label(s, 10, update_hash=True), ["labels train", "prep --force"]),
    (lambda s: set_label(s, 10, update_hash=False), ["labels train", "sha256 train_labels.npy"]),
    (newer_version, ["manifest and files", "prep --force"]),
    (lambda s: swap_classes(s), ["classes", "prep --force"]),  # verify passed it; train named the classes wrongly
], ids=["flipped-byte", "truncated", "bad-label-rehashed", "bad-label", "newer-format", "classes-swapped"])
def test_verify_fails_on_damage(invoke, made, assert_user_error, damage, words):
    damage(made)
    result = invoke("verify", made)
    assert_user_error(result, "check(s) failed", *words)
    assert "FAIL" in result.output


def test_verify_compares_a_given_source_even_with_no_sample_to_re_resize(invoke, tmp_path, assert_user_error):
    """--check-samples 0 dropped --source-path, and with it the check of every raw image's sha256."""
    for name, seed in (("a", 0), ("b", 1)):
        rng = np.random.default_rng(seed)
        np.savez(tmp_path / f"{name}.npz", x_train=rng.integers(0, 255, (6, 8, 8, 3), np.uint8),
                 y_train=np.arange(6) % 2, x_test=rng.integers(0, 255, (2, 8, 8, 3), np.uint8), y_test=np.arange(2))
    assert invoke("prep", "--source", "npz", "--source-path", tmp_path / "a.npz", "--image-size", "8", "--quiet",
                  "--out", tmp_path).exit_code == 0
    store = tmp_path / "npz-8"
    checked = invoke("verify", store, "--source-path", tmp_path / "a.npz", "--check-samples", "0")
    assert checked.exit_code == 0 and "ok    source sha256 train" in checked.output, checked.output
    assert "skip  samples: --check-samples 0" in checked.output
    result = invoke("verify", store, "--source-path", tmp_path / "b.npz", "--check-samples", "0")
    assert_user_error(result, "source sha256 train")


def test_verify_and_prep_explain_what_is_wrong(invoke, made):
    os.truncate(made / "test_images.npy", 5000)
    assert "test_images.npy is truncated" in invoke("verify", made).output
    prep = invoke("prep", *SYNTH, "--image-size", "32", "--out", made.parent)
    assert "test_images.npy is truncated" in prep.output
    newer_version(made)
    assert "newer than this dali-fl understands" in invoke("verify", made).output


def test_verify_missing_store(invoke, tmp_path, assert_user_error):
    assert_user_error(invoke("verify", tmp_path / "nope"), "does not exist", "dali-fl prep")


# --- bad input: one line, exit 2, no traceback, nothing left behind ------------------------------

def _cifar_dir(make_cifar, tmp_path):
    return make_cifar().folder


def _not_cifar(make_cifar, tmp_path):
    (tmp_path / "pics").mkdir()
    return tmp_path / "pics"


def _truncated_pickle(make_cifar, tmp_path):
    files = make_cifar()
    blob = files.member("data_batch_2").read_bytes()
    files.member("data_batch_2").write_bytes(blob[:5000])
    return files.folder


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _code_pickle(make_cifar, tmp_path):
    import pickle

    files = make_cifar()
    files.member("test_batch").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned"), protocol=2))
    return files.archive()


BAD_INPUTS = {
    "missing-path": (lambda m, t: t / "nowhere", [], ["does not exist", "--source-path"]),
    "not-cifar-dir": (_not_cifar, [], ["not a CIFAR layout", "cifar-10-batches-py"]),
    "truncated-pickle": (_truncated_pickle, [], ["data_batch_2", "re-download"]),
    "code-in-pickle": (_code_pickle, [], ["test_batch", "refusing to load"]),
    "size-0": (_cifar_dir, ["--image-size", "0"], ["--image-size 0 is out of range", "224"]),
    "size-huge": (_cifar_dir, ["--image-size", "100000"], ["--image-size 100000 is out of range", "224"]),
    "size-negative": (_cifar_dir, ["--image-size", "-1"], ["out of range"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_prep_bad_input(invoke, make_cifar, tmp_path, assert_user_error, case):
    make_path, extra, words = BAD_INPUTS[case]
    src = make_path(make_cifar, tmp_path)
    out = tmp_path / "out"
    result = invoke("prep", "--source", "cifar10", "--source-path", src, "--out", out, "--quiet", *extra)
    assert_user_error(result, *words)
    assert stores_under(out) == []
    assert not (tmp_path / "pwned").exists()


def test_prep_output_under_a_regular_file(invoke, tmp_path, assert_user_error):
    (tmp_path / "file").write_text("x")
    result = invoke("prep", *SYNTH, "--image-size", "16", "--out", tmp_path / "file" / "data")
    assert_user_error(result, "cannot write", "--out")


def test_prep_cifar_without_a_source(invoke, tmp_path, assert_user_error):
    result = invoke("prep", "--source", "cifar10", "--out", tmp_path / "out")
    assert_user_error(result, "--source-path", "cifar-10-batches-py", "cifar-10-python.tar.gz", "--download")
    assert stores_under(tmp_path / "out") == []


def test_prep_download_offline(invoke, tmp_path, monkeypatch, assert_user_error):
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    result = invoke("prep", "--source", "cifar10", "--download", "--out", tmp_path / "out", "--quiet")
    assert_user_error(result, "could not download cifar10", "--source-path")
    assert stores_under(tmp_path / "out") == []


def test_prep_on_a_damaged_store_says_force(invoke, made, assert_user_error):
    flip_byte(made / "train_images.npy")  # prep does not hash 7.5 GB on every run; verify does
    os.truncate(made / "train_labels.npy", 100)
    result = invoke("prep", *SYNTH, "--image-size", "32", "--out", made.parent)
    assert_user_error(result, "train_labels.npy", "--force")
    assert invoke("prep", *SYNTH, "--image-size", "32", "--out", made.parent, "--force").exit_code == 0
    assert invoke("verify", made).exit_code == 0


def test_prep_on_a_directory_of_the_user_s_does_not_suggest_force(invoke, tmp_path, assert_user_error):
    mine = tmp_path / "synthetic-32"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")  # --force would refuse it too: the first answer must say so
    for extra in ((), ("--force",)):
        line = assert_user_error(invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path, *extra),
                                 "not a store", "not empty", "choose another --out")
        assert "re-run" not in line
    assert (mine / "notes.txt").read_text() == "mine"
    mine.joinpath("notes.txt").unlink()  # an empty directory: --force may fill it, and the answer says so
    assert_user_error(invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path), "--force")
    assert invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path, "--force").exit_code == 0


def test_prep_force_keeps_a_file_the_user_put_in_a_store(invoke, tmp_path, assert_user_error):
    """--force replaced the store whole, with a partition plot saved beside its arrays."""
    args = ("prep", *SYNTH, "--image-size", "32", "--out", tmp_path)
    assert invoke(*args).exit_code == 0
    (tmp_path / "synthetic-32" / "notes.txt").write_text("mine")
    assert_user_error(invoke(*args, "--force"), "holds 'notes.txt'", "move it out first")
    assert (tmp_path / "synthetic-32" / "notes.txt").read_text() == "mine"


# --- numbers from options and manifests: checked before anything is allocated ----------------------

@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["--seed -1", ">= 0"]),
    (["--num-train", "100000000"], ["--num-train 100000000", "at most 1000000"]),
    (["--num-test", "0"], ["--num-test 0", "at least 1"]),
], ids=["negative-seed", "huge-num-train", "zero-num-test"])
def test_prep_rejects_bad_synthetic_numbers(invoke, tmp_path, assert_user_error, args, words):
    result = invoke("prep", "--source", "synthetic", "--image-size", "16", "--out", tmp_path, "--quiet", *args)
    assert_user_error(result, *words)
    assert stores_under(tmp_path) == []


def test_prep_checks_the_disk_before_generating(invoke, tmp_path, monkeypatch, assert_user_error):
    import shutil
    from types import SimpleNamespace

    def never(*args, **kwargs):
        raise AssertionError("the source must not be generated when its store cannot fit")
    monkeypatch.setattr(prep_cli, "load_source", never)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10 ** 12, free=10 ** 9))
    result = invoke("prep", "--num-train", "1000000", "--image-size", "224", "--out", tmp_path / "new" / "dir")
    assert_user_error(result, "the store needs 150.68 GB", "1.00 GB free", "--image-size")


@pytest.mark.parametrize("args, words", [
    (["--check-samples", "-1"], ["--check-samples -1 is negative"]),
    (["--seed", "-5"], ["--seed -5"]),
])
def test_verify_rejects_bad_numbers(invoke, made, assert_user_error, args, words):
    assert_user_error(invoke("verify", made, *args), *words)


def edit_manifest(store: Path, change) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_verify_store_with_an_absurd_image_size(invoke, made, assert_user_error):
    edit_manifest(made, lambda m: m.update(image_size=1e30))
    result = invoke("verify", made)
    assert_user_error(result, "check(s) failed", "manifest and files")
    assert "image_size is 1e+30, not an integer in 1..4096" in result.output


def test_verify_names_the_manifest_when_its_source_cannot_be_regenerated(invoke, made, assert_user_error):
    edit_manifest(made, lambda m: m["source_params"].update(num_train=10 ** 9))
    result = invoke("verify", made)
    assert_user_error(result, "synthetic-32/manifest.json", "num_train", "1000000")


# --- interruption --------------------------------------------------------------------------

def interrupt_midway(monkeypatch) -> list:
    """Make prep's source raise KeyboardInterrupt on its second chunk, as a Ctrl-C would."""
    import dali_fl.data.store as store_mod

    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 8 * 32 * 32 * 3)
    real, calls = prep_cli.load_source, []

    def load(*args, **kwargs):
        source = real(*args, **kwargs)
        train = source.splits["train"]

        def read(a, b):
            calls.append((a, b))
            if a > 0:
                raise KeyboardInterrupt
            return train.read(a, b)
        return Source(source.name, source.classes, {**source.splits, "train": SourceSplit(train.labels, read)},
                      source.params)
    monkeypatch.setattr(prep_cli, "load_source", load)
    return calls


def test_interrupted_prep_leaves_nothing_usable(invoke, tmp_path, monkeypatch, assert_user_error):
    calls = interrupt_midway(monkeypatch)
    result = invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path)
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "error: interrupted" in result.output
    assert len(calls) == 2 and stores_under(tmp_path) == []
    monkeypatch.undo()
    assert_user_error(invoke("verify", tmp_path / "synthetic-32"), "does not exist")
    stale = tmp_path / ".synthetic-32.tmp-999999999"  # what `kill -9` during prep leaves
    (stale / "partial").mkdir(parents=True)
    assert invoke("prep", *SYNTH, "--image-size", "32", "--out", tmp_path).exit_code == 0
    assert stores_under(tmp_path) == [tmp_path / "synthetic-32"]
    assert invoke("verify", tmp_path / "synthetic-32").exit_code == 0


# --- CI entry point ---------------------------------------------------------------------------

def test_make_test_installs_test_extras_and_ci_runs_only_make_test():
    makefile = (ROOT / "Makefile").read_text()
    rules = dict(re.findall(r"^(\S+):[^\n=]*\n((?:\t[^\n]*\n?)*)", makefile, flags=re.M))
    deps = {t: d.split() for t, d in re.findall(r"^(\S+):[ \t]*([^\n=]*)$", makefile, flags=re.M)}

    def needs_stamp(target: str) -> bool:  # directly, or through a prerequisite such as lint
        return any(d == "$(STAMP_TEST)" or (d in deps and d != target and needs_stamp(d)) for d in deps[target])
    assert needs_stamp("test"), "test must depend on the test stamp"
    assert "pytest" in rules["test"]
    assert re.search(r"pip install .*-e '\.\[test(,[a-z]+)*\]'", rules["$(STAMP_TEST)"])
    assert "test =" in (ROOT / "pyproject.toml").read_text()
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    commands = [line.strip() for line in ci.read_text().splitlines()
                if line.strip() and not line.startswith("#")
                and not line.startswith(("set -", 'cd "$(dirname'))]
    assert commands == ["make test"]
