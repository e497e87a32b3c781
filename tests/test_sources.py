"""Raw sources: CIFAR-10/100 (directory and .tar.gz), npz, image folder, synthetic, and their bad inputs."""
from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import pickle
import socket
import tarfile
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import cifar_pickle, marker_image
from PIL import Image

import dali_fl.data.sources as sources_mod
from dali_fl.data.sources import in_memory_split, load_source, synthetic_arrays
from dali_fl.errors import DaliFlError


def read_all(source, split: str) -> np.ndarray:
    data = source.splits[split]
    return np.asarray(data.read(0, data.count))


# --- CIFAR ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "parent", "archive"])
def test_cifar_loads_every_form_in_file_order(make_cifar, name, form):
    files = make_cifar(name)
    path = {"folder": files.folder, "parent": files.folder.parent, "archive": files.archive()}[form]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. numpy.core deprecation while unpickling the official files
        source = load_source(name, path)
    assert source.name == name and source.classes == files.classes
    for split, (images, labels) in (("train", files.train), ("test", files.test)):
        assert np.array_equal(read_all(source, split), images)
        assert np.array_equal(source.splits[split].labels, labels)
        assert source.splits[split].labels.dtype == np.int64


def test_cifar_rows_are_channel_planar_and_row_major(make_cifar):
    source = load_source("cifar10", make_cifar().folder)
    img = read_all(source, "train")[0]
    assert img.shape == (32, 32, 3)
    assert tuple(img[0, 0]) == (255, 0, 0)  # red: R plane first, not channel-scrambled
    assert (img[0, 1:] == (0, 255, 0)).all()  # rest of the top row green: rows, not columns
    assert (img[1:, 0] == (255, 255, 255)).all()
    assert np.array_equal(img, marker_image())


def test_cifar_folder_and_archive_agree(make_cifar):
    files = make_cifar()
    a, b = load_source("cifar10", files.folder), load_source("cifar10", files.archive())
    for split in ("train", "test"):
        assert np.array_equal(read_all(a, split), read_all(b, split))


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["data_batch_3", "re-download"]),
    ("garbage", ["data_batch_3", "re-download"]),
    ("list", ["data_batch_3", "not a cifar batch"]),
    ("no_data", ["data_batch_3", "3072"]),
    ("short_labels", ["data_batch_3", "labels"]),
    ("label_type", ["data_batch_3", "labels"]),
    ("label_range", ["label", "range"]),
])
def test_damaged_cifar_batch_is_a_clear_error(make_cifar, damage, words):
    files = make_cifar()
    member = files.member("data_batch_3")
    blob = member.read_bytes()
    batch = pickle.loads(blob, encoding="bytes")
    replace = {
        "truncate": lambda: blob[: len(blob) // 2],
        "garbage": lambda: b"this is not a pickle at all",
        "list": lambda: cifar_pickle([1, 2, 3]),
        "no_data": lambda: cifar_pickle({**batch, b"data": batch[b"data"][:, :100]}),
        "short_labels": lambda: cifar_pickle({**batch, b"labels": batch[b"labels"][:-1]}),
        "label_type": lambda: cifar_pickle({**batch, b"labels": 7}),
        "label_range": lambda: cifar_pickle({**batch, b"labels": [10] * len(batch[b"labels"])}),
    }[damage]
    member.write_bytes(replace())
    for path in (files.folder, files.archive(files.folder.parent / f"{damage}.tar.gz")):
        with pytest.raises(DaliFlError) as err:
            load_source("cifar10", path)
        msg = str(err.value)
        assert "\n" not in msg
        for word in words:
            assert word.lower() in msg.lower(), (word, msg)


class Evil:
    """Unpickling this runs a shell command, as any pickle may."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Plain:
    """An ordinary class instance: a CIFAR file never holds one."""


def test_unpickler_refuses_code_and_nothing_runs(make_cifar, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2)
    pickle.loads(payload)  # control: an ordinary unpickler runs the command
    assert marker.exists()
    marker.unlink()
    files = make_cifar()
    files.member("data_batch_1").write_bytes(payload)
    for path in (files.folder, files.archive()):
        with pytest.raises(DaliFlError, match=r"data_batch_1.*refusing to load (posix|os)\.system"):
            load_source("cifar10", path)
    assert not marker.exists()


def test_unpickler_refuses_class_instances(make_cifar):
    files = make_cifar()
    files.member("batches.meta").write_bytes(pickle.dumps(Plain(), protocol=2))
    with pytest.raises(DaliFlError, match="batches.meta.*refusing to load"):
        load_source("cifar10", files.folder)


@pytest.mark.parametrize("meta", [{b"label_names": 10}, {b"label_names": []}, {b"other": [b"a"]}])
def test_meta_without_class_names(make_cifar, meta):
    files = make_cifar()
    files.member("batches.meta").write_bytes(cifar_pickle(meta))
    with pytest.raises(DaliFlError, match="batches.meta in .* has no class names"):
        load_source("cifar10", files.folder)


def test_download_folder_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DaliFlError, match="cannot create the download folder.*--out"):
        load_source("cifar10", None, download=True, download_root=tmp_path / "file" / "downloads")


def test_not_a_cifar_layout(tmp_path, make_cifar):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"x")
    with pytest.raises(DaliFlError, match="not a CIFAR layout.*cifar-10-batches-py"):
        load_source("cifar10", tmp_path / "photos")
    with pytest.raises(DaliFlError, match="not a CIFAR layout.*cifar-100-python"):
        load_source("cifar100", make_cifar("cifar10").folder)  # the other dataset's folder


def test_broken_archives(make_cifar, tmp_path):
    archive = make_cifar().archive()
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DaliFlError, match="cut.tar.gz.*(truncated|corrupt|not a readable)"):
        load_source("cifar10", cut)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DaliFlError, match="notes.txt is not a readable CIFAR archive"):
        load_source("cifar10", text)
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(make_cifar(root=tmp_path / "other").member("batches.meta"), arcname="x/batches.meta")
    with pytest.raises(DaliFlError, match="has no data_batch_1"):
        load_source("cifar10", partial)


def test_cifar_without_path_or_download_says_how(tmp_path):
    with pytest.raises(DaliFlError, match="--source-path.*--download"):
        load_source("cifar10", None)


def _no_network(*args, **kwargs):
    raise OSError("network unreachable (test)")


def test_download_offline_fails_fast_with_a_how_to(tmp_path, monkeypatch):
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        _no_network()

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DaliFlError) as err:
        load_source("cifar10", None, download=True, download_root=tmp_path / "dl")
    assert 1 <= len(attempts) <= 2, attempts  # fast = one look at the network, not a client's retry loop
    msg = str(err.value)
    assert "\n" not in msg and "could not download cifar10" in msg
    assert "--source-path" in msg and "cifar-10-python.tar.gz" in msg


def test_download_uses_torchvision_and_reports_its_failure(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raise RuntimeError("Error downloading cifar-100-python.tar.gz:\nTried https://... got DNS failure")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(DaliFlError, match="could not download cifar100") as err:
        load_source("cifar100", None, download=True, download_root=tmp_path / "dl")
    assert calls and calls[0][2] is True
    assert "\n" not in str(err.value)


def test_download_accepts_what_torchvision_fetched(make_cifar, tmp_path, monkeypatch):
    import torchvision.datasets

    root = tmp_path / "dl"

    class Fetched:
        def __init__(self, root_arg, train, download):
            make_cifar(root=Path(root_arg))  # what a successful download extracts
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Fetched)
    source = load_source("cifar10", None, download=True, download_root=root)
    assert source.splits["train"].count == 15


# --- npz, image folder, synthetic --------------------------------------------------------

def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (7, 20, 24, 3), dtype=np.uint8), "y_train": np.arange(7) % 4,
              "x_test": rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8), "y_test": np.array([3, 0, 1])}
    np.savez(tmp_path / "d.npz", **arrays)
    source = load_source("npz", tmp_path / "d.npz")
    assert source.classes == ("0", "1", "2", "3")
    assert np.array_equal(read_all(source, "train"), arrays["x_train"])
    assert np.array_equal(source.splits["test"].labels, [3, 0, 1])


@pytest.mark.parametrize("bad, words", [
    ("missing_key", ["y_test", "x_train, y_train, x_test, y_test"]),
    ("npy_file", ["single .npy array", "np.savez"]),
    ("garbage", ["not a readable .npz", "np.savez"]),
    ("text", ["not an .npz (zip) archive", "np.savez"]),
    ("float_images", ["x_train", "uint8"]),
    ("gray_images", ["x_train", "(N, H, W, 3)"]),
    ("label_count", ["y_test", "3 integers"]),
    ("negative_label", ["label", "range"]),
    ("pickled", ["not a readable .npz"]),
    ("empty_test", ["x_test", "no images"]),
])
def test_bad_npz(tmp_path, bad, words):
    x = np.zeros((3, 8, 8, 3), np.uint8)
    y = np.array([0, 1, 2])
    good = dict(x_train=x, y_train=y, x_test=x, y_test=y)
    path = tmp_path / "d.npz"
    if bad == "missing_key":
        np.savez(path, x_train=x, y_train=y, x_test=x)
    elif bad == "npy_file":
        np.save(tmp_path / "d.npy", x)
        (tmp_path / "d.npy").rename(path)
    elif bad == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not a zip")
    elif bad == "text":
        path.write_text("x_train,y_train\n1,2\n")
    elif bad == "pickled":
        np.savez(path, **{**good, "y_test": np.array([{"a": 1}] * 3, dtype=object)})
    else:
        changes = {"float_images": dict(x_train=x.astype(np.float32)), "gray_images": dict(x_train=x[..., 0]),
                   "label_count": dict(y_test=y[:2]), "negative_label": dict(y_train=np.array([0, -1, 2])),
                   "empty_test": dict(x_test=x[:0], y_test=y[:0])}
        np.savez(path, **{**good, **changes[bad]})
    with pytest.raises(DaliFlError) as err:
        load_source("npz", path)
    for word in words:
        assert word.lower() in str(err.value).lower(), (word, str(err.value))


def save_png(path: Path, img: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    (im.convert(mode) if mode else im).save(path)


def test_imagefolder_sorted_classes_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    expected = {"train": [], "test": []}
    # created out of order and with mixed sizes and modes
    plan = [("train", "zebra", (32, 32)), ("train", "ant", (40, 28)), ("train", "ant", (32, 32)),
            ("train", "moth", (17, 50)), ("test", "zebra", (32, 32)), ("test", "ant", (64, 64))]
    for i, (split, cls, (h, w)) in enumerate(plan):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        save_png(root / split / cls / f"{i:03d}.png", img)
        expected[split].append((cls, f"{i:03d}", img))
    save_png(root / "train" / "moth" / "999_gray.png", np.full((32, 32), 77, np.uint8))
    (root / "train" / "moth" / "notes.txt").write_text("not an image")
    expected["train"].append(("moth", "999_gray", np.full((32, 32, 3), 77, np.uint8)))
    source = load_source("imagefolder", root)
    assert source.classes == ("ant", "moth", "zebra")
    for split, items in expected.items():
        items.sort(key=lambda t: (source.classes.index(t[0]), t[1]))
        data = source.splits[split]
        assert list(data.labels) == [source.classes.index(c) for c, _, _ in items]
        got = data.read(0, data.count)
        assert len(got) == len(items)
        for img, (_, _, want) in zip(got, items):
            assert np.array_equal(img, want)


def test_imagefolder_16_bit_grey_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clipped 16-bit grey at 255: a 0..65535 gradient came out 99.6% white.
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    root = tmp_path / "folder"
    for split in ("train", "test"):
        save_png(root / split / "cat" / "g16.png", gradient)
    with Image.open(root / "train" / "cat" / "g16.png") as im:
        assert im.mode.startswith("I;16")  # what the test is about
    got = load_source("imagefolder", root).splits["train"].read(0, 1)[0]
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    assert np.array_equal(got, np.repeat((gradient >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert (got == 255).mean() < 0.01


def test_wide_grey_outside_16_bits_is_refused(tmp_path):
    from dali_fl.data.sources import _wide_grey_to_rgb
    assert np.array_equal(_wide_grey_to_rgb(np.array([[0, 256, 65535]], np.int32), tmp_path / "a.png")[0, :, 0],
                          [0, 1, 255])
    with pytest.raises(DaliFlError, match="a.png.*-1..70000.*0..65535"):
        _wide_grey_to_rgb(np.array([[-1, 70000]], np.int32), tmp_path / "a.png")


def test_imagefolder_bad_inputs(tmp_path):
    root = tmp_path / "folder"
    (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DaliFlError, match="train/CLASS/.*test/CLASS"):
        load_source("imagefolder", root)
    (root / "test" / "dog").mkdir(parents=True)
    with pytest.raises(DaliFlError, match="not in train: \\['dog'\\]"):
        load_source("imagefolder", root)
    (root / "test" / "dog").rmdir()
    (root / "test" / "cat").mkdir()
    with pytest.raises(DaliFlError, match="holds no"):
        load_source("imagefolder", root)
    save_png(root / "train" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (root / "test" / "cat" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    source = load_source("imagefolder", root)
    with pytest.raises(DaliFlError, match="cannot read image .*b.png"):
        source.splits["test"].read(0, 1)


def test_imagefolder_says_what_it_skips_and_refuses_a_class_without_images(tmp_path, caplog):
    """A class of .webp images became a class of none (its label kept, the head an output for it), and a
    .ipynb_checkpoints folder a class that shifted every label after it."""
    root = tmp_path / "folder"
    for split in ("train", "test"):
        save_png(root / split / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
        (root / split / ".ipynb_checkpoints").mkdir()
    (root / "train" / "cat" / "b.webp").write_bytes(b"RIFF")
    source = load_source("imagefolder", root)
    assert source.classes == ("cat",) and source.splits["train"].count == 1
    assert "a hidden folder is not a class" in caplog.text and "(e.g. b.webp)" in caplog.text
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "c.tif").write_bytes(b"II*")
    with pytest.raises(DaliFlError, match=r"train/dog holds no .png/.jpg/.jpeg/.bmp images"):
        load_source("imagefolder", root)


def test_synthetic_is_seeded_and_learnable():
    a, la = synthetic_arrays(200, seed=3, split="train")
    b, lb = synthetic_arrays(200, seed=3, split="train")
    c, _ = synthetic_arrays(200, seed=4, split="train")
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8 and set(la) <= set(range(10))
    means = np.stack([a[la == k].mean(axis=0) for k in range(10) if (la == k).any()])
    assert means.std(axis=0).mean() > 10, "class templates must differ for the data to be learnable"
    source = load_source("synthetic", num_train=12, num_test=5, seed=3)
    assert source.params == {"num_train": 12, "num_test": 5, "seed": 3}
    assert source.splits["train"].count == 12 and source.splits["test"].count == 5


def test_load_source_argument_errors(tmp_path):
    with pytest.raises(DaliFlError, match="unknown source 'mnist'"):
        load_source("mnist")
    with pytest.raises(DaliFlError, match="does not exist"):
        load_source("cifar10", tmp_path / "nope")
    with pytest.raises(DaliFlError, match="npz needs --source-path"):
        load_source("npz")
    with pytest.raises(DaliFlError, match="at least 1"):
        load_source("synthetic", num_train=0)


# --- sizes read from the input are bounded before anything is allocated ----------------------

def save_npz(path: Path, **changes) -> Path:
    """A small valid npz source, with some arrays replaced."""
    x, y = np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 2])
    np.savez(path, **{"x_train": x, "y_train": y, "x_test": x, "y_test": y, **changes})
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize("label", [5_000_000, 2 ** 40])
def test_one_huge_label_does_not_build_huge_class_lists(tmp_path, label):
    path = save_npz(tmp_path / "d.npz", y_train=np.array([0, 1, label]))
    with pytest.raises(DaliFlError, match=rf"d.npz: y_train holds label {label}, out of range.*0\.\.99999"):
        load_source("npz", path)


def test_uint64_label_above_int64_is_reported_as_it_is(tmp_path):
    path = save_npz(tmp_path / "d.npz", y_test=np.array([0, 1, 2 ** 63], dtype=np.uint64))
    with pytest.raises(DaliFlError, match=r"y_test holds label 9223372036854775808, out of range"):
        load_source("npz", path)


def npz_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """An npz whose x_train header declares `shape` but holds no data: what a compressed bomb declares."""
    save_npz(path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "a") as z:
        names = [n for n in z.namelist() if n != "x_train.npy"]
        kept = {n: z.read(n) for n in names}
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in kept.items():
            z.writestr(name, blob)
        z.writestr("x_train.npy", header.getvalue())
    return path


def test_npz_declared_sizes_are_checked_before_loading(tmp_path):
    path = npz_declaring(tmp_path / "bomb.npz", (3, 10 ** 6, 10 ** 6, 3))
    with pytest.raises(DaliFlError, match=r"bomb.npz \(uncompressed\) needs 9000.00 GB of memory"):
        load_source("npz", path)


def test_npz_larger_than_memory_is_refused(tmp_path, monkeypatch):
    import psutil

    path = save_npz(tmp_path / "d.npz")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    with pytest.raises(DaliFlError, match=r"d.npz \(uncompressed\) needs 1.20 kB of memory but only 1.00 kB is"):
        load_source("npz", path)


def test_npz_with_empty_images(tmp_path):
    path = save_npz(tmp_path / "d.npz", x_train=np.zeros((3, 0, 8, 3), np.uint8))
    with pytest.raises(DaliFlError, match=r"x_train are empty images, shaped \(3, 0, 8, 3\)"):
        load_source("npz", path)


def test_in_memory_reads_are_capped_in_bytes(monkeypatch):
    monkeypatch.setattr(sources_mod, "SOURCE_BYTES_PER_READ", 3 * 64 * 64 * 3)
    split = in_memory_split(np.zeros((10, 64, 64, 3), np.uint8), np.zeros(10, np.int64))
    assert split.max_rows == 3  # whatever the output size, a read hands the resizer at most 3 of these


def test_cifar_member_sizes_are_checked_before_reading(make_cifar, monkeypatch):
    files = make_cifar()
    archive = files.archive()
    monkeypatch.setattr(sources_mod, "MAX_CIFAR_MEMBER_BYTES", 1000)  # each test member is ~9 KB
    with pytest.raises(DaliFlError, match="far larger than a CIFAR batch"):
        load_source("cifar10", files.folder)
    with pytest.raises(DaliFlError, match="member data_batch_1 claims .* far larger than a CIFAR batch"):
        load_source("cifar10", archive)


@pytest.mark.parametrize("args, words", [
    (dict(seed=-1), ["--seed -1", ">= 0"]),
    (dict(num_train=100_000_000), ["--num-train 100000000", "at most 1000000"]),
    (dict(num_test=10 ** 12), ["--num-test 1000000000000"]),
])
def test_synthetic_sizes_and_seed_are_checked_first(args, words, monkeypatch):
    import dali_fl.data.sources as sources

    monkeypatch.setattr(sources, "synthetic_arrays", lambda *a: pytest.fail("generated before checking"))
    with pytest.raises(DaliFlError) as err:
        load_source("synthetic", **{"num_train": 10, "num_test": 5, **args})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_synthetic_source_larger_than_memory(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=10 ** 6))
    with pytest.raises(DaliFlError, match="synthetic source of 1000 images needs 3.08 MB of memory but only 1.00 MB"):
        load_source("synthetic", num_train=500, num_test=500)


# --- FIFOs and other non-regular files never block --------------------------------------------

@pytest.mark.timeout(20)
def test_fifo_in_an_image_folder_is_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "folder"
    save_png(root / "train" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    save_png(root / "test" / "cat" / "b.png", np.zeros((8, 8, 3), np.uint8))
    os.mkfifo(root / "train" / "cat" / "pipe.png")
    (root / "train" / "cat" / "dir.jpg").mkdir()
    with caplog.at_level(logging.WARNING, logger="dali_fl.data.sources"):
        source = load_source("imagefolder", root)
        images = source.splits["train"].read(0, source.splits["train"].count)
    assert source.splits["train"].count == 1 and len(images) == 1
    skipped = sorted(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert len(skipped) == 2 and "dir.jpg" in skipped[0] and "pipe.png" in skipped[1]
    assert all("not a regular file" in m for m in skipped)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["npz", "cifar10", "cifar100"])
def test_fifo_as_source_path_is_refused(tmp_path, name):
    os.mkfifo(tmp_path / "data.bin")
    with pytest.raises(DaliFlError, match="data.bin is neither a regular file nor a directory"):
        load_source(name, tmp_path / "data.bin")


@pytest.mark.timeout(20)
def test_fifo_as_cifar_member_is_refused(make_cifar):
    files = make_cifar()
    files.member("data_batch_4").unlink()
    os.mkfifo(files.member("data_batch_4"))
    with pytest.raises(DaliFlError, match="data_batch_4 is not a regular file"):
        load_source("cifar10", files.folder)


# --- a file that cannot be read is not corrupt ---------------------------------------------------

def deny_reading(monkeypatch, module, target: Path) -> None:
    """Make `target` unreadable: chmod for ordinary users, and an EACCES from `open` also for root."""
    os.chmod(target, 0)
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if Path(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)
    monkeypatch.setattr(module, "open", guarded, raising=False)


def assert_permission_error(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert f"cannot read {path} (Permission denied)" in msg and "permissions" in msg, msg
    assert "corrupt" not in msg and "re-download" not in msg and "np.savez" not in msg, msg


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_unreadable_cifar_file_is_a_permission_error(make_cifar, monkeypatch, form):
    files = make_cifar()
    target = files.archive() if form == "archive" else files.member("data_batch_2")
    deny_reading(monkeypatch, sources_mod, target)
    with pytest.raises(DaliFlError) as err:
        load_source("cifar10", target if form == "archive" else files.folder)
    assert_permission_error(err, target)


def test_unreadable_npz_is_a_permission_error(tmp_path, monkeypatch):
    path = save_npz(tmp_path / "d.npz")
    deny_reading(monkeypatch, sources_mod, path)
    with pytest.raises(DaliFlError) as err:
        load_source("npz", path)
    assert_permission_error(err, path)


def test_unreadable_image_is_a_permission_error(tmp_path, monkeypatch):
    root = tmp_path / "folder"
    save_png(root / "train" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    save_png(root / "test" / "cat" / "b.png", np.zeros((8, 8, 3), np.uint8))
    target = root / "test" / "cat" / "b.png"
    real = Image.open

    def guarded(path, *args, **kwargs):
        if Path(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(Image, "open", guarded)
    source = load_source("imagefolder", root)
    with pytest.raises(DaliFlError) as err:
        source.splits["test"].read(0, 1)
    assert_permission_error(err, target)
