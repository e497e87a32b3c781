"""Opening a store checks every size, type and file it reads before using it: one line naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_sources import deny_reading

import dali_fl.data.store as store_mod
from dali_fl.data.resize import resize_batch
from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import open_store, sha256_file, verify_store, write_store
from dali_fl.errors import DaliFlError


@pytest.fixture
def store(tmp_path) -> Path:
    """A good 8px synthetic store: 10 train and 5 test images, 10 classes."""
    path, _ = write_store(load_synthetic(10, 5, seed=0), tmp_path / "stores", 8, progress=False)
    return path


def edit_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def save_array(path: Path, name: str, array: np.ndarray, split: str, key: str) -> None:
    """Replace a store file and make the manifest agree with it, as a hand-made store would."""
    np.save(path / name, array)
    edit_manifest(path, lambda m: m["splits"][split][key].update(
        shape=list(array.shape), dtype=str(array.dtype), sha256=sha256_file(path / name)))


def refused(path: Path, *words: str) -> str:
    """open_store must refuse with a single line holding every word; verify reports the same line."""
    with pytest.raises(DaliFlError) as err:
        open_store(path)
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


# --- sizes and types read from the manifest --------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("image_size", 1e30, ["image_size is 1e+30", "not an integer in 1..4096"]),
    ("image_size", "8", ["image_size is '8'"]),
    ("image_size", True, ["image_size is True"]),
    ("image_size", 0, ["image_size is 0"]),
    ("classes", list(range(10)), ["classes is", "class names"]),
    ("classes", [], ["classes is []"]),
    ("dtype", "float64", ["dtype is 'float64'", "uint8"]),
    ("format_version", "1", ["format_version is '1'"]),
    ("interpolation", "lanczos", ["interpolation is 'lanczos'"]),
    ("source_params", {"num_train": 10, "rm": "-rf"}, ["source_params is", "num_train, num_test, seed"]),
    ("source_params", {"num_train": -4}, ["source_params.num_train is -4"]),
    ("splits", {}, ["splits is {}"]),
])
def test_manifest_fields_are_checked(store, field, value, words):
    edit_manifest(store, lambda m: m.update({field: value}))
    msg = refused(store, "manifest.json is invalid", "--force", *words)
    checks, _, _ = verify_store(store)
    assert not checks[0].ok and checks[0].detail == msg


@pytest.mark.parametrize("change, words", [
    (lambda e: e.update(count=1e12), ["splits.train.count is 1000000000000.0"]),
    (lambda e: e.update(count=10 ** 12), ["splits.train.count", "1..100000000"]),
    (lambda e: e.update(count=11), ["splits.train.images.shape is [10, 8, 8, 3]", "[11, 8, 8, 3]"]),
    (lambda e: e["images"].update(shape=[10, 8, 8, 3, 1]), ["splits.train.images.shape"]),
    (lambda e: e["images"].update(shape=[10, 8, 8]), ["single-channel"]),
    (lambda e: e["images"].update(dtype="float32"), ["splits.train.images.dtype is 'float32'", "not uint8"]),
    (lambda e: e["labels"].update(dtype="float64"), ["splits.train.labels.dtype is 'float64'", "not int64"]),
    (lambda e: e["labels"].update(sha256=None), ["splits.train.labels.sha256 is None"]),
    (lambda e: e.pop("labels"), ["splits.train.labels is None"]),
], ids=["float-count", "huge-count", "count-vs-shape", "5d-shape", "grey-shape", "images-dtype", "labels-dtype",
        "sha256", "no-labels"])
def test_split_entries_must_agree_with_count_and_image_size(store, change, words):
    edit_manifest(store, lambda m: change(m["splits"]["train"]))
    refused(store, "manifest.json is invalid", *words)


def test_huge_image_size_agreeing_with_its_shapes_is_refused(store):
    # Manifest fields that agree with each other on a 1e6-pixel side: only the range check stops them.
    def huge(m):
        m["image_size"] = 10 ** 6
        for entry in m["splits"].values():
            entry["images"]["shape"] = [entry["count"], 10 ** 6, 10 ** 6, 3]
    edit_manifest(store, huge)
    refused(store, "image_size is 1000000", "1..4096")


def test_resize_refuses_absurd_sizes_and_empty_images():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    for size in (0, 10 ** 30, 5000, 8.0):
        with pytest.raises(DaliFlError, match="must be an integer in 1..4096"):
            resize_batch(images, size)
    with pytest.raises(DaliFlError, match="empty images"):
        resize_batch(np.zeros((2, 0, 4, 3), np.uint8), 8)


# --- arrays that contradict the manifest or the classes ------------------------------------------

@pytest.mark.parametrize("shape", [(10, 8, 8), (10, 8, 8, 1)], ids=["NHW", "NHW1"])
def test_single_channel_images_are_refused(store, shape):
    save_array(store, "train_images.npy", np.zeros(shape, np.uint8), "train", "images")
    refused(store, "train.images.shape", "single-channel")


@pytest.mark.parametrize("shape", [(10, 8, 8), (10, 8, 8, 1)], ids=["NHW", "NHW1"])
def test_single_channel_file_under_an_rgb_manifest(store, shape):
    np.save(store / "train_images.npy", np.zeros(shape, np.uint8))
    refused(store, "train_images.npy", "single-channel", "manifest says")


def test_float64_labels_are_refused(store):
    labels = np.load(store / "train_labels.npy").astype(np.float64)
    save_array(store, "train_labels.npy", labels, "train", "labels")
    refused(store, "train.labels.dtype is 'float64'", "int64")
    edit_manifest(store, lambda m: m["splits"]["train"]["labels"].update(dtype="int64"))
    refused(store, "train_labels.npy holds float64", "manifest says int64")


def test_fortran_order_is_refused(store):
    images = np.asfortranarray(np.load(store / "test_images.npy"))
    np.save(store / "test_images.npy", images)
    refused(store, "test_images.npy", "Fortran")


@pytest.mark.parametrize("split, value", [("train", 10), ("test", 10), ("test", -1), ("train", 2 ** 40)])
def test_labels_out_of_range_fail_on_open(store, split, value):
    labels = np.load(store / f"{split}_labels.npy")
    labels[-1] = value
    save_array(store, f"{split}_labels.npy", labels, split, "labels")
    refused(store, f"{split}_labels.npy holds label {value}", "outside 0..9", "10 classes")
    checks, _, _ = verify_store(store)  # verify still reports it as its own check, next to the others
    assert [c.name for c in checks if not c.ok] == [f"labels {split}"]


# --- the store's files: plain, inside the store, readable ---------------------------------------

@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.npy", "sub/train_labels.npy", "..", "", "manifest.json"])
def test_file_entries_must_name_files_inside_the_store(store, name):
    (store.parent / "secret.npy").write_bytes((store / "train_labels.npy").read_bytes())
    edit_manifest(store, lambda m: m["splits"]["train"]["labels"].update(file=name))
    refused(store, "splits.train.labels.file", "not the name of a file inside the store")


def test_two_arrays_cannot_share_a_file(store):
    edit_manifest(store, lambda m: m["splits"]["test"]["labels"].update(file="train_labels.npy"))
    refused(store, "train_labels.npy", "more than one array")


def test_symlinked_npy_is_refused(store, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    (store / "train_labels.npy").rename(outside)
    (store / "train_labels.npy").symlink_to(outside)
    refused(store, "train_labels.npy is a symlink", "--force")


def test_symlinked_manifest_is_refused(store, tmp_path):
    (store / "manifest.json").rename(tmp_path / "m.json")
    (store / "manifest.json").symlink_to(tmp_path / "m.json")
    refused(store, "manifest.json is a symlink")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["manifest.json", "test_images.npy"])
def test_fifo_in_a_store_does_not_hang(store, name):
    (store / name).unlink()
    os.mkfifo(store / name)
    refused(store, name, "not a regular file")


def test_directory_in_place_of_an_npy(store):
    (store / "test_labels.npy").unlink()
    (store / "test_labels.npy").mkdir()
    refused(store, "test_labels.npy is not a regular file")


@pytest.mark.parametrize("name", ["manifest.json", "train_images.npy"])
def test_unreadable_file_is_not_called_corrupt(store, monkeypatch, name):
    deny_reading(monkeypatch, store_mod, store / name)
    msg = refused(store, f"cannot read {store / name}", "Permission denied", "permissions")
    assert "corrupt" not in msg and "unreadable or incomplete" not in msg


def test_oversized_or_nested_manifest(store, monkeypatch):
    (store / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(store, "manifest.json is unreadable", "RecursionError")
    monkeypatch.setattr(store_mod, "MAX_MANIFEST_BYTES", 100)
    (store / "manifest.json").write_text(" " * 101)
    refused(store, "manifest.json is 0 MB, not a manifest")


def test_a_good_store_still_opens_and_verifies(store):
    s = open_store(store)
    assert (s.image_size, s.num_classes, s.images("train").shape) == (8, 10, (10, 8, 8, 3))
    checks, _, _ = verify_store(store, load_synthetic(10, 5, seed=0))
    assert all(c.ok for c in checks), checks
    with pytest.raises(DaliFlError, match="--check-samples -1 is negative"):
        verify_store(store, check_samples=-1)
