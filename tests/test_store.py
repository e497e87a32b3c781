"""The store: exact resizing, atomic writes, idempotence, and every way open/verify reject damage."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2

import dali_fl.data.store as store_mod
from dali_fl.bounds import human_size
from dali_fl.data.resize import resize_batch, to_stored_dtype
from dali_fl.data.sources import Source, SourceSplit, in_memory_split, load_source
from dali_fl.data.store import FORMAT_VERSION, open_store, store_name, verify_store, write_store
from dali_fl.errors import DaliFlError

MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


def natural_images(n: int, size: int, seed: int = 0, lo: int = 0, hi: int = 255) -> np.ndarray:
    """Smooth colour fields with edges and texture, spanning [lo, hi]: closer to photos than noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 3, 4, 4)).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear",
                                            align_corners=False).numpy().transpose(0, 2, 3, 1)
    edge = (np.arange(size)[None, :, None, None] > rng.integers(0, size, (n, 1, 1, 1))) * 0.3
    texture = rng.normal(0, 0.08, (n, size, size, 3))
    values = np.clip(field + edge + texture, 0, 1)
    return (lo + values * (hi - lo)).round().astype(np.uint8)


def torchvision_pil(images: np.ndarray, size: int, method: str) -> np.ndarray:
    resize = transforms.Resize((size, size), interpolation=MODES[method])
    return np.stack([np.asarray(resize(Image.fromarray(img))) for img in images])


def torchvision_tensor(images: np.ndarray, size: int, method: str, transform=transforms) -> np.ndarray:
    resize = transform.Resize((size, size), interpolation=MODES[method], antialias=True)
    return np.stack([resize(torch.from_numpy(img).permute(2, 0, 1)).permute(1, 2, 0).numpy() for img in images])


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def array_source(train: np.ndarray, test: np.ndarray, num_classes: int = 10, name: str = "npz",
                 seed: int = 0, params: dict | None = None) -> Source:
    rng = np.random.default_rng(seed)
    splits = {s: in_memory_split(x, rng.integers(0, num_classes, len(x))) for s, x in (("train", train),
                                                                                         ("test", test))}
    return Source(name, tuple(str(c) for c in range(num_classes)), splits, params or {})


@pytest.fixture
def small_source() -> Source:
    return array_source(natural_images(9, 32, seed=1), natural_images(4, 32, seed=2))


# --- resizing matches torchvision ------------------------------------------------------------

@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src, dst", [(32, 224), (32, 96), (64, 24), (45, 32)])
def test_resize_matches_torchvision_within_one_level(method, src, dst):
    # Photo-like content inside [16, 239]: bicubic overshoot is never clipped mid-way (see the next test).
    images = natural_images(4, src, seed=src + dst, lo=16, hi=239)
    ours = resize_batch(images, dst, method)
    assert ours.shape == (4, dst, dst, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert max_diff(ours, torchvision_tensor(images, dst, method)) <= 1
    # torchvision.transforms.v2 on uint8 tensors runs this very kernel: bit-exact
    assert max_diff(ours, torchvision_tensor(images, dst, method, transform=v2)) == 0
    pil = torchvision_pil(images, dst, method)
    if (method, dst) == ("bicubic", 224):
        # torch's uint8 kernel keeps 15-bit weights, Pillow 22-bit: at 7x bicubic a few values per
        # million land two levels apart (measured on 500 CIFAR-like images: 1.7e-6 of values).
        assert max_diff(ours, pil) <= 2 and np.mean(np.abs(ours.astype(int) - pil) > 1) < 1e-4
    else:
        assert max_diff(ours, pil) <= 1


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_full_range_content(method):
    # Saturated edges: Pillow and torch's uint8 kernel clip between their two passes, torchvision's
    # float tensor path only at the end, so for bicubic the two torchvision references differ from each
    # other by up to ~20 levels there. We follow Pillow (and transforms.v2 on uint8 tensors).
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ours = resize_batch(images, 96, method)
    assert max_diff(ours, torchvision_pil(images, 96, method)) <= 1
    assert max_diff(ours, torchvision_tensor(images, 96, method, transform=v2)) == 0
    if method == "bilinear":
        assert max_diff(ours, torchvision_tensor(images, 96, method)) <= 1


def test_resize_identity_and_bad_arguments():
    images = natural_images(2, 32)
    assert np.array_equal(resize_batch(images, 32), images)
    with pytest.raises(DaliFlError, match="unknown interpolation 'nearest'"):
        resize_batch(images, 64, "nearest")
    with pytest.raises(DaliFlError, match="uint8 images shaped"):
        resize_batch(images.astype(np.float32), 64)


def test_stored_pixels_equal_the_resize_of_the_source(tmp_path, small_source):
    path, written = write_store(small_source, tmp_path, 96, progress=False)
    assert written and path == tmp_path / "npz-96"
    s = open_store(path)
    for split in ("train", "test"):
        raw = small_source.splits[split].read(0, small_source.splits[split].count)
        assert np.array_equal(s.images(split), resize_batch(raw, 96))
        assert max_diff(s.images(split), torchvision_pil(raw, 96, "bilinear")) <= 1
        assert np.array_equal(s.labels(split), small_source.splits[split].labels)


# --- the store's files -----------------------------------------------------------------------

def test_store_layout_and_manifest(tmp_path, small_source):
    path, _ = write_store(small_source, tmp_path, 40, progress=False)
    images = np.load(path / "train_images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap) and images.shape == (9, 40, 40, 3) and images.dtype == np.uint8
    labels = np.load(path / "train_labels.npy", allow_pickle=False)
    assert labels.dtype == np.int64 and labels.shape == (9,)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["source"] == "npz"
    assert manifest["classes"] == [str(c) for c in range(10)]
    assert (manifest["image_size"], manifest["dtype"], manifest["interpolation"]) == (40, "uint8", "bilinear")
    entry = manifest["splits"]["test"]
    assert entry["count"] == 4 and entry["images"]["shape"] == [4, 40, 40, 3]
    assert entry["images"]["sha256"] == store_mod.sha256_file(path / "test_images.npy")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "test_images.npy", "test_labels.npy",
                                                    "train_images.npy", "train_labels.npy"]
    assert [p.name for p in tmp_path.iterdir()] == ["npz-40"], "no temporary directory left"


def test_float32_store_is_uint8_over_255(tmp_path, small_source):
    u8, _ = write_store(small_source, tmp_path, 48, progress=False)
    f32, _ = write_store(small_source, tmp_path, 48, dtype="float32", progress=False)
    assert f32.name == store_name("npz", 48, "float32") == "npz-48-f32"
    a, b = open_store(u8).images("train"), open_store(f32).images("train")
    assert b.dtype == np.float32 and 0.0 <= b.min() and b.max() <= 1.0
    assert np.array_equal(b, np.asarray(a).astype(np.float32) / np.float32(255))
    assert np.array_equal(b, to_stored_dtype(np.asarray(a), "float32"))
    checks, _, _ = verify_store(f32, small_source)
    assert all(c.ok for c in checks), checks


def test_sample_order_follows_the_source_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 3 * 16 * 16 * 3)  # three images per chunk
    images = natural_images(11, 16, seed=9)
    source = array_source(images, images[:2])
    path, _ = write_store(source, tmp_path, 16, progress=False)
    assert np.array_equal(open_store(path).images("train"), images)


# --- idempotence, force, atomicity -----------------------------------------------------------

def test_second_write_does_nothing_and_force_rebuilds(tmp_path, small_source):
    path, written = write_store(small_source, tmp_path, 32, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    again, written_again = write_store(small_source, tmp_path, 32, progress=False)
    assert (again, written, written_again) == (path, True, False)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp
    inode = path.stat().st_ino
    _, rebuilt = write_store(small_source, tmp_path, 32, force=True, progress=False)
    assert rebuilt and path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npz-32"]


def test_other_data_into_the_same_store_is_refused(tmp_path, small_source):
    # An npz or image-folder source records no parameters: another file of the same name and size was reported
    # as "a valid store already exists" and the old store went on to train.
    write_store(small_source, tmp_path, 32, progress=False)
    images = {s: small_source.splits[s].read(0, small_source.splits[s].count) for s in ("train", "test")}
    for other, words in ((array_source(images["train"], images["test"], seed=5), "train labels differ"),
                         (array_source(images["train"][:8], images["test"]), "train holds 9 images, not 8"),
                         (array_source(images["train"], images["test"], num_classes=7), "10 classes from")):
        with pytest.raises(DaliFlError, match=f"made from other data .*{words}.*--force"):
            write_store(other, tmp_path, 32, progress=False)
    renamed = tmp_path / "npz-16"
    (tmp_path / "npz-32").rename(renamed)  # a store under another size's name
    with pytest.raises(DaliFlError, match="npz at 32 px uint8, not npz at 16 px uint8"):
        write_store(small_source, tmp_path, 16, progress=False)
    renamed.rename(tmp_path / "npz-32")
    assert write_store(small_source, tmp_path, 32, progress=False) == (tmp_path / "npz-32", False)


def test_other_images_with_the_same_labels_are_refused(tmp_path, small_source):
    # Names, sizes, classes, counts and labels all matched, so another .npz's images were taken for the old ones.
    path, _ = write_store(small_source, tmp_path, 32, progress=False)
    stored = np.asarray(open_store(path).images("test")).copy()
    test = small_source.splits["test"]
    changed = test.read(0, test.count).copy()
    changed[-1, 0, 0, 0] ^= 1  # one value of one raw image
    other = Source("npz", small_source.classes, {**small_source.splits, "test": in_memory_split(changed, test.labels)})
    with pytest.raises(DaliFlError, match="made from other data .*test images differ.*--force"):
        write_store(other, tmp_path, 32, progress=False)
    assert np.array_equal(open_store(path).images("test"), stored)
    assert write_store(small_source, tmp_path, 32, progress=False) == (path, False)


def test_verify_compares_every_raw_image_by_the_recorded_hash(tmp_path, small_source):
    # One value of one raw image: re-resized samples see it only if they pick that image; the hash always does.
    path, _ = write_store(small_source, tmp_path, 32, progress=False)
    names = {c.name: c.ok for c in verify_store(path, small_source, check_samples=2)[0]}
    assert names["source sha256 train"] and names["source sha256 test"]
    test = small_source.splits["test"]
    changed = test.read(0, test.count).copy()
    changed[-1, 0, 0, 0] ^= 1
    other = Source("npz", small_source.classes, {**small_source.splits, "test": in_memory_split(changed, test.labels)})
    checks = {c.name: c for c in verify_store(path, other, check_samples=2)[0]}
    assert checks["source sha256 train"].ok and not checks["source sha256 test"].ok
    assert "raw images differ" in checks["source sha256 test"].detail


def test_a_store_without_a_source_hash_is_compared_on_samples(tmp_path, small_source):
    # Stores written before prep recorded source_sha256 stay usable: re-resized samples stand in for the hash.
    path, _ = write_store(small_source, tmp_path, 24, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        del entry["source_sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert write_store(small_source, tmp_path, 24, progress=False) == (path, False)
    train = small_source.splits["train"]
    changed = train.read(0, train.count).copy()
    changed[3] = 255 - changed[3]
    splits = {**small_source.splits, "train": in_memory_split(changed, train.labels)}
    other = Source("npz", small_source.classes, splits)
    with pytest.raises(DaliFlError, match=r"made from other data .*train images differ .*8/9 re-resized.*\[3\]"):
        write_store(other, tmp_path, 24, progress=False)


def test_source_hash_does_not_depend_on_chunking(tmp_path, small_source, monkeypatch):
    path, _ = write_store(small_source, tmp_path, 16, progress=False)
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 2 * 16 * 16 * 3)  # two images per chunk on the re-run
    assert write_store(small_source, tmp_path, 16, progress=False) == (path, False)
    assert open_store(path).manifest["splits"]["train"]["source_sha256"] == \
        store_mod.source_sha256(small_source.splits["train"], 48, "uint8")


def test_other_settings_into_the_same_store_are_refused(tmp_path):
    write_store(load_source("synthetic", num_train=6, num_test=2, seed=0), tmp_path, 32, progress=False)
    other = load_source("synthetic", num_train=6, num_test=2, seed=1)
    with pytest.raises(DaliFlError, match="other settings.*--force"):
        write_store(other, tmp_path, 32, progress=False)
    with pytest.raises(DaliFlError, match="other settings.*--force"):
        write_store(load_source("synthetic", num_train=6, num_test=2, seed=0), tmp_path, 32,
                    interpolation="bicubic", progress=False)
    _, written = write_store(other, tmp_path, 32, force=True, progress=False)
    assert written and open_store(tmp_path / "synthetic-32").manifest["source_params"]["seed"] == 1


def interrupting_source(after_rows: int) -> Source:
    images = natural_images(12, 16)
    labels = np.arange(12) % 10

    def read(a: int, b: int) -> np.ndarray:
        if b > after_rows:
            raise KeyboardInterrupt
        return images[a:b]
    return Source("npz", tuple(str(c) for c in range(10)), {"train": SourceSplit(labels, read)})


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 2 * 16 * 16 * 3)
    with pytest.raises(KeyboardInterrupt):
        write_store(interrupting_source(after_rows=6), tmp_path, 16, progress=False)
    assert list(tmp_path.iterdir()) == [], "neither the store nor its temporary directory may remain"
    with pytest.raises(DaliFlError, match="does not exist"):
        open_store(tmp_path / "npz-16")


def test_interrupted_rebuild_keeps_the_old_store(tmp_path, monkeypatch, small_source):
    path, _ = write_store(small_source, tmp_path, 16, progress=False)
    before = np.array(open_store(path).images("train"))
    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 2 * 16 * 16 * 3)
    with pytest.raises(KeyboardInterrupt):
        write_store(interrupting_source(after_rows=6), tmp_path, 16, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npz-16"]
    assert np.array_equal(open_store(path).images("train"), before)


def test_stale_temp_dirs_of_dead_processes_are_cleaned(tmp_path, small_source):
    dead = tmp_path / ".npz-16.tmp-999999999"  # above any pid_max
    (dead / "junk").mkdir(parents=True)
    old = tmp_path / ".npz-16.old-999999998"
    old.mkdir()
    alive = tmp_path / f".npz-16.tmp-{os.getppid()}"  # a running process may still be writing
    alive.mkdir()
    write_store(small_source, tmp_path, 16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["npz-16", alive.name])


# --- bad arguments and unwritable places --------------------------------------------------------

@pytest.mark.parametrize("size", [0, -3, 100000])
def test_image_size_out_of_range(tmp_path, small_source, size):
    with pytest.raises(DaliFlError, match=f"--image-size {size} is out of range"):
        write_store(small_source, tmp_path, size, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_dtype_and_interpolation_checked(tmp_path, small_source):
    with pytest.raises(DaliFlError, match="--dtype float16"):
        write_store(small_source, tmp_path, 16, dtype="float16", progress=False)
    with pytest.raises(DaliFlError, match="interpolation 'lanczos'"):
        write_store(small_source, tmp_path, 16, interpolation="lanczos", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_regular_file(tmp_path, small_source):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DaliFlError, match="cannot write.*--out"):
        write_store(small_source, blocker / "stores", 16, progress=False)


def test_not_enough_disk_space_is_refused_before_writing(tmp_path, small_source, monkeypatch):
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, free=1000))
    with pytest.raises(DaliFlError, match="needs .* free.*--out"):
        write_store(small_source, tmp_path, 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_write_failure_midway_is_a_user_error(tmp_path, small_source, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store_mod.np, "save", full)
    with pytest.raises(DaliFlError, match="No space left on device.*--out"):
        write_store(small_source, tmp_path, 16, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_non_store_at_the_store_path(tmp_path, small_source):
    (tmp_path / "npz-16").write_text("not a directory")
    with pytest.raises(DaliFlError, match="npz-16.*not a store"):
        write_store(small_source, tmp_path, 16, progress=False)


# --- open_store and verify_store on damaged stores ---------------------------------------------

@pytest.fixture
def good_store(tmp_path, small_source) -> Path:
    path, _ = write_store(small_source, tmp_path / "stores", 24, progress=False)
    return path


def rewrite_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_open_store_reads_back(good_store, small_source):
    s = open_store(str(good_store))
    assert (s.image_size, s.num_classes, s.dtype, s.splits) == (24, 10, "uint8", ("train", "test"))
    with pytest.raises(DaliFlError, match="no split 'valid'"):
        s.images("valid")


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["train_images.npy", "truncated"]),
    ("pad", ["train_images.npy", "truncated or padded"]),
    ("header", ["train_images.npy", "corrupt"]),
    ("shape", ["train_images.npy", "manifest says"]),
    ("missing", ["test_labels.npy", "missing"]),
    ("no_manifest", ["no manifest.json"]),
    ("bad_json", ["manifest.json", "unreadable"]),
    ("newer", ["format version 99", "upgrade dali-fl"]),
    ("newer_other_keys", ["format version 2", "upgrade dali-fl"]),
    ("split_entry", ["manifest.json", "splits.train", "not an object"]),
])
def test_open_store_rejects_damage(good_store, damage, words):
    images = good_store / "train_images.npy"
    if damage == "truncate":
        os.truncate(images, images.stat().st_size - 100)
    elif damage == "pad":
        with open(images, "ab") as f:
            f.write(b"\0")
    elif damage == "header":
        with open(images, "r+b") as f:
            f.write(b"\x00NOTNUMPY")
    elif damage == "shape":
        np.save(images, np.zeros((9, 24, 24, 4), np.uint8))
    elif damage == "missing":
        (good_store / "test_labels.npy").unlink()
    elif damage == "no_manifest":
        (good_store / "manifest.json").unlink()
    elif damage == "bad_json":
        (good_store / "manifest.json").write_text('{"format_version": 1, "sour')
    elif damage == "newer":
        rewrite_manifest(good_store, lambda m: m.update(format_version=99))
    elif damage == "newer_other_keys":
        (good_store / "manifest.json").write_text(json.dumps({"format_version": 2, "layout": "sharded"}))
    elif damage == "split_entry":
        rewrite_manifest(good_store, lambda m: m["splits"].update(train=["not", "a", "dict"]))
    with pytest.raises(DaliFlError) as err:
        open_store(good_store)
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    checks, _, _ = verify_store(good_store)
    assert not checks[0].ok and checks[0].detail == msg


def failed(checks) -> list[str]:
    return [c.name for c in checks if not c.ok]


def test_verify_good_store(good_store, small_source):
    checks, counts, classes = verify_store(good_store, small_source, check_samples=50)
    assert failed(checks) == []
    assert classes == [str(c) for c in range(10)]
    assert counts["train"].sum() == 9 and np.array_equal(
        counts["train"], np.bincount(small_source.splits["train"].labels, minlength=10))
    assert any(c.name == "samples train" and "9/9" in c.detail for c in checks)


def test_verify_catches_a_flipped_byte(good_store):
    images = good_store / "test_images.npy"
    with open(images, "r+b") as f:
        f.seek(images.stat().st_size - 500)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    assert open_store(good_store)  # headers and lengths still fine: only the hash can tell
    assert failed(verify_store(good_store)[0]) == ["sha256 test_images.npy"]


def write_label(path: Path, split: str, value: int, update_hash: bool) -> None:
    labels = np.load(path / f"{split}_labels.npy")
    labels[0] = value
    np.save(path / f"{split}_labels.npy", labels)
    if update_hash:
        digest = store_mod.sha256_file(path / f"{split}_labels.npy")
        rewrite_manifest(path, lambda m: m["splits"][split]["labels"].update(sha256=digest))


@pytest.mark.parametrize("update_hash", [True, False])
@pytest.mark.parametrize("value", [10, -1])
def test_verify_catches_a_label_outside_the_classes(good_store, update_hash, value):
    write_label(good_store, "train", value, update_hash)
    expected = ["labels train"] if update_hash else ["sha256 train_labels.npy", "labels train"]
    assert failed(verify_store(good_store)[0]) == expected


def test_verify_sample_check_catches_pixels_changed_with_the_hash(good_store, small_source):
    s = open_store(good_store)
    images = np.load(good_store / "train_images.npy", mmap_mode="r+")
    images[:] = 255 - images
    images.flush()
    del images
    digest = store_mod.sha256_file(good_store / "train_images.npy")
    rewrite_manifest(good_store, lambda m: m["splits"]["train"]["images"].update(sha256=digest))
    assert s.image_size == 24
    assert failed(verify_store(good_store, small_source, check_samples=4)[0]) == ["samples train"]


def test_verify_flags_constant_or_out_of_range_values(tmp_path):
    flat = np.full((3, 8, 8, 3), 7, np.uint8)
    path, _ = write_store(array_source(flat, flat), tmp_path, 8, progress=False)
    assert failed(verify_store(path)[0]) == ["value range train", "value range test"]


def test_reads_respect_a_sources_row_cap(tmp_path):
    """Image folders cap rows per read so large decoded photos cannot exhaust memory."""
    from dali_fl.data.sources import Source, SourceSplit

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    reads = []

    def read(a, b):
        reads.append(b - a)
        return images[a:b]

    split = SourceSplit(np.arange(10) % 2, read, max_rows=3)
    path, _ = write_store(Source("npz", ("a", "b"), {"train": split, "test": split}), tmp_path, 8, progress=False)
    assert max(reads) <= 3 and sum(reads) == 20
    np.testing.assert_array_equal(np.load(path / "train_images.npy"), images)


@pytest.mark.parametrize("n,shown", [(150_680_000_000, "150.68 GB"), (312_000, "312.00 kB"), (5, "5 bytes")])
def test_sizes_in_messages_keep_a_digit_before_the_point(n, shown):
    assert human_size(n) == shown  # "needs 0.00 GB but has 0.00 GB free" said nothing
