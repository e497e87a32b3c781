"""The resized store: `{split}_images.npy` + `{split}_labels.npy` + `manifest.json`, written atomically."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from dali_fl.atomic import fsync_path, recover_dir, replace_dir, temp_dir_for
from dali_fl.errors import DaliFlError
from dali_fl.resize import METHODS, resize_batch, to_stored_dtype
from dali_fl.sources import Source, SourceSplit

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("uint8", "float32")
MAX_IMAGE_SIZE = 4096
CHUNK_BYTES = 64 << 20  # resized bytes per chunk: bounds memory whatever the dataset size


def store_name(source: str, image_size: int, dtype: str = "uint8") -> str:
    """Directory name of a store: `<source>-<N>` or `<source>-<N>-f32`."""
    return f"{source}-{image_size}" + ("-f32" if dtype == "float32" else "")


@dataclass(frozen=True)
class Store:
    """An opened, checked store; arrays are memory-mapped, never loaded whole."""

    path: Path
    manifest: dict

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    def images(self, split: str) -> np.ndarray:
        """The split's images as a read-only memmap shaped (N, H, W, 3)."""
        return np.load(self.path / self._entry(split)["images"]["file"], mmap_mode="r")

    def labels(self, split: str) -> np.ndarray:
        """The split's labels as int64."""
        return np.load(self.path / self._entry(split)["labels"]["file"], allow_pickle=False)

    def _entry(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise DaliFlError(f"store {self.path} has no split {split!r} (it has {', '.join(self.splits)})")
        return self.manifest["splits"][split]


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------

def _write_split(tmp: Path, split: str, data: SourceSplit, size: int, dtype: str,
                 method: str, progress: bool) -> dict:
    """Write one split's images and labels; returns its manifest entry."""
    n = data.count
    img_file, lbl_file = f"{split}_images.npy", f"{split}_labels.npy"
    images_sha = _stream_images(tmp / img_file, data, size, dtype, method, progress, f"prep {split}")
    np.save(tmp / lbl_file, data.labels.astype(np.int64), allow_pickle=False)
    fsync_path(tmp / lbl_file)
    return {"count": n,
            "images": {"file": img_file, "shape": [n, size, size, 3], "dtype": dtype, "sha256": images_sha},
            "labels": {"file": lbl_file, "shape": [n], "dtype": "int64",
                       "sha256": sha256_file(tmp / lbl_file)}}


def _stream_images(path: Path, data: SourceSplit, size: int, dtype: str, method: str, progress: bool,
                   desc: str) -> str:
    """Resize in bounded chunks and append them after the .npy header; returns the file's sha256.

    A helper thread writes and hashes chunk i while chunk i+1 is resized, so the disk, the hash and
    torch's resize overlap; sequential write() instead of memmap stores avoids a page fault per 4 KiB
    and turns a full disk into ENOSPC rather than SIGBUS. open_memmap writes the header.
    """
    n = data.count
    header = open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, size, size, 3))
    offset = header.offset
    del header
    os.truncate(path, offset)  # appending is faster than filling the sparse file open_memmap made
    chunk = max(1, CHUNK_BYTES // (size * size * 3 * np.dtype(dtype).itemsize))
    chunk = min(chunk, data.max_rows or chunk)
    with open(path, "a+b") as f, ThreadPoolExecutor(1, thread_name_prefix="dali-fl-write") as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        f.seek(0)
        digest = hashlib.sha256(f.read(offset))
        pending = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            block = to_stored_dtype(resize_rows(data.read(a, b), size, method), dtype)
            if block.shape != (b - a, size, size, 3):
                raise DaliFlError(f"the source gave images shaped {block.shape} for rows {a}..{b}; expected "
                                  f"{(b - a, size, size, 3)}")
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_block, f, digest, np.ascontiguousarray(block))
            bar.update(b - a)
        if pending is not None:
            pending.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def _write_block(f, digest, block: np.ndarray) -> None:
    """Append one C-contiguous block to the file and to the running hash."""
    f.write(block.data)
    digest.update(block.data)


def resize_rows(rows, size: int, method: str) -> np.ndarray:
    """Resize a batch read from a source; a list (mixed sizes) is resized image by image."""
    if isinstance(rows, list):
        return np.concatenate([resize_batch(r[None], size, method) for r in rows])
    return resize_batch(rows, size, method)


def check_prep_args(image_size: int, dtype: str, interpolation: str = "bilinear") -> None:
    """Reject a store size, dtype or resize method before any work is done."""
    if interpolation not in METHODS:
        raise DaliFlError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(METHODS)}")
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DaliFlError(f"--image-size {image_size} is out of range; use 1..{MAX_IMAGE_SIZE} (224 for ViT-B/16)")
    if dtype not in DTYPES:
        raise DaliFlError(f"--dtype {dtype} is not supported; use uint8 (or float32 for benchmarks)")


def _is_whole(store_dir: Path) -> bool:
    """A store directory is complete once its manifest, written last, is there."""
    return (store_dir / MANIFEST).is_file()


def _make_tmp(final: Path) -> Path:
    """Create the temporary sibling directory, clearing (or recovering) what interrupted runs left."""
    try:
        return temp_dir_for(final, _is_whole)
    except OSError as err:
        raise DaliFlError(f"cannot write to {final.parent} ({err.strerror}); choose another --out") from None


def write_store(source: Source, out_dir: Path, image_size: int, *, dtype: str = "uint8",
                interpolation: str = "bilinear", force: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Write (or find) the store for `source`; returns (path, whether it was written now)."""
    check_prep_args(image_size, dtype, interpolation)
    final = Path(out_dir) / store_name(source.name, image_size, dtype)
    if final.parent.is_dir():
        recover_dir(final, _is_whole)
    if (final.exists() or final.is_symlink()) and not final.is_dir():
        raise DaliFlError(f"{final} exists but is not a store directory; remove it or choose another --out")
    if final.exists() and not force:
        existing = open_store(final).manifest  # raises with a clear message when damaged
        made = (existing.get("source_params", {}), existing.get("interpolation"))
        asked = (source.params, interpolation)
        if made != asked:
            raise DaliFlError(f"{final} was made with other settings {made}, not {asked}; "
                              "pass --force to rebuild it or choose another --out")
        return final, False
    tmp = _make_tmp(final)
    try:
        _check_free_space(tmp, source, image_size, dtype)
        splits = {s: _write_split(tmp, s, d, image_size, dtype, interpolation, progress)
                  for s, d in source.splits.items()}
        manifest = {"format_version": FORMAT_VERSION, "source": source.name,
                    "classes": list(source.classes), "image_size": image_size, "dtype": dtype,
                    "interpolation": interpolation, "source_params": source.params, "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DaliFlError(f"cannot write the store in {final.parent} ({err.strerror or err}); "
                          "free some space or choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def _check_free_space(tmp: Path, source: Source, image_size: int, dtype: str) -> None:
    """Refuse up front when the store cannot fit, rather than after minutes of resizing."""
    need = sum(d.count for d in source.splits.values()) * image_size * image_size * 3 * np.dtype(dtype).itemsize
    free = shutil.disk_usage(tmp).free
    if need > free:
        raise DaliFlError(f"the store needs {need / 1e9:.2f} GB but {tmp.parent} has {free / 1e9:.2f} GB free; "
                          "free some space, use a smaller --image-size or choose another --out")


# --- opening and verifying ---------------------------------------------------------------

def _read_manifest(path: Path) -> dict:
    if not path.exists():
        recover_dir(path, _is_whole)  # a `prep --force` killed between its renames left the old store whole
    if path.exists() and not path.is_dir():
        raise DaliFlError(f"store {path} is a file, not a store directory; pass the directory `dali-fl prep` "
                          "printed (e.g. data/cifar10-224)")
    if not path.is_dir():
        raise DaliFlError(f"store {path} does not exist; create it with `dali-fl prep` "
                          "(e.g. dali-fl prep --source cifar10 --source-path DIR --image-size 224)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        version = int(manifest["format_version"])
        if version > FORMAT_VERSION:  # checked first: a newer format may lay out everything else differently
            raise DaliFlError(f"store {path} has format version {version}, newer than this dali-fl "
                              f"understands ({FORMAT_VERSION}); upgrade dali-fl, or rebuild it with "
                              "`dali-fl prep --force`")
        for key in ("source", "classes", "image_size", "dtype", "splits"):
            manifest[key]
        for entry in manifest["splits"].values():
            for key in ("images", "labels"):
                entry[key]["file"], entry[key]["shape"], entry[key]["dtype"], entry[key]["sha256"]
    except FileNotFoundError:
        raise DaliFlError(f"{path} is not a store (no {MANIFEST}); re-run `dali-fl prep --force`") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise DaliFlError(f"{path}/{MANIFEST} is unreadable or incomplete ({type(err).__name__}: {err}); "
                          "re-run `dali-fl prep --force`") from None
    return manifest


def _check_npy(path: Path, spec: dict) -> None:
    """Check an .npy file's header and length against the manifest without reading its data."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DaliFlError(f"store file {path} is missing; re-run `dali-fl prep --force`") from None
    except (ValueError, OSError) as err:
        raise DaliFlError(f"store file {path} is corrupt ({err}); re-run `dali-fl prep --force`") from None
    if list(shape) != list(spec["shape"]) or str(dtype) != spec["dtype"] or fortran:
        raise DaliFlError(f"store file {path} holds {dtype} {shape}, but the manifest says "
                          f"{spec['dtype']} {tuple(spec['shape'])}; re-run `dali-fl prep --force`")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise DaliFlError(f"store file {path} is truncated or padded ({path.stat().st_size} bytes, "
                          f"expected {expected}); re-run `dali-fl prep --force`")


def open_store(path: Path | str) -> Store:
    """Open a store after checking its manifest, file headers and file lengths (not hashes)."""
    path = Path(path)
    manifest = _read_manifest(path)
    for entry in manifest["splits"].values():
        for key in ("images", "labels"):
            _check_npy(path / entry[key]["file"], entry[key])
    return Store(path, manifest)


@dataclass(frozen=True)
class Check:
    """One line of a verify report."""

    name: str
    ok: bool
    detail: str


def _scan_images(path: Path, images: np.memmap) -> tuple[str, float, float]:
    """sha256 of an images file plus its min and max, in one pass over the data."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(images.offset))  # the .npy header
    lo, hi = np.inf, -np.inf
    step = max(1, CHUNK_BYTES // max(1, images[0].nbytes)) if len(images) else 1
    for a in range(0, len(images), step):
        block = images[a:a + step]
        digest.update(block)
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return digest.hexdigest(), lo, hi


def _value_range(name: str, count: int, lo: float, hi: float, dtype: str) -> Check:
    """Values within the dtype's range; constant images mean nothing was written."""
    if count == 0:
        return Check(name, False, "no images")
    limit = 1.0 if dtype == "float32" else 255.0
    ok = 0.0 <= lo <= hi <= limit and hi > lo and np.isfinite(hi)
    return Check(name, ok, f"[{lo:g}, {hi:g}] within [0, {limit:g}]" + ("" if hi > lo else ": constant images"))


def verify_store(path: Path | str, source: Optional[Source] = None, check_samples: int = 16,
                 seed: int = 0) -> tuple[list[Check], dict[str, np.ndarray], list[str]]:
    """Run every check; returns (checks, class counts per split, class names)."""
    path = Path(path)
    try:
        store = open_store(path)
    except DaliFlError as err:
        return [Check("manifest and files", False, str(err))], {}, []
    m = store.manifest
    checks = [Check("manifest and files", True, f"format {m['format_version']}, {m['source']}, "
                    f"{m['image_size']}px {m['dtype']}, shapes and lengths match")]
    counts = {}
    for split, entry in m["splits"].items():
        images = store.images(split)
        images_sha, lo, hi = _scan_images(path / entry["images"]["file"], images)
        for key, digest in (("images", images_sha), ("labels", sha256_file(path / entry["labels"]["file"]))):
            checks.append(Check(f"sha256 {entry[key]['file']}", digest == entry[key]["sha256"],
                                digest[:16] if digest == entry[key]["sha256"] else "differs from manifest"))
        labels = store.labels(split)
        bad = int(((labels < 0) | (labels >= store.num_classes)).sum())
        checks.append(Check(f"labels {split}", bad == 0, f"{bad} outside [0, {store.num_classes})"))
        counts[split] = np.bincount(labels[(labels >= 0) & (labels < store.num_classes)],
                                    minlength=store.num_classes)
        checks.append(_value_range(f"value range {split}", len(images), lo, hi, store.dtype))
        if source is not None:
            checks.append(_check_samples(store, source, split, check_samples, seed))
    return checks, counts, list(m["classes"])


def _check_samples(store: Store, source: Source, split: str, k: int, seed: int) -> Check:
    """Re-resize k random samples from the source and compare them exactly."""
    data = source.splits.get(split)
    images = store.images(split)
    if data is None or data.count != len(images):
        return Check(f"samples {split}", False, f"source has {0 if data is None else data.count} "
                     f"images, store has {len(images)}")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(images), size=min(k, len(images)), replace=False))
    labels = store.labels(split)
    method = store.manifest.get("interpolation", "bilinear")
    bad = [int(i) for i in picks
           if not np.array_equal(to_stored_dtype(resize_rows(data.read(i, i + 1), store.image_size, method),
                                                 store.dtype)[0], images[i])
           or int(data.labels[i]) != int(labels[i])]
    return Check(f"samples {split}", not bad, f"{len(picks) - len(bad)}/{len(picks)} re-resized samples equal"
                 + (f"; differ at {bad[:5]}" if bad else ""))
