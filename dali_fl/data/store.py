"""The resized store: `{split}_images.npy` + `{split}_labels.npy` + `manifest.json`, written atomically."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from dali_fl.atomic import fsync_path, recover_dir, replace_dir, temp_dir_for, what_to_do
from dali_fl.bounds import human_size
from dali_fl.errors import DaliFlError
from dali_fl.data.layout import MANIFEST, store_around
from dali_fl.data.resize import MAX_IMAGE_SIZE, METHODS, resize_batch, to_stored_dtype
from dali_fl.data.sources import MAX_CLASSES, SOURCE_PARAMS, Source, SourceSplit, unreadable

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = ("uint8", "float32")
MAX_STORE_IMAGES = 100_000_000  # per split: ImageNet-21k has 14 M; bounds what a manifest may claim
MAX_SPLITS = 16
MAX_MANIFEST_BYTES = 64 << 20  # 100,000 class names fit in a few MB
CHUNK_BYTES = 64 << 20  # resized bytes per chunk: bounds memory whatever the dataset size
LEGACY_SAMPLES = 64  # re-resized samples per split that stand in for the source hash older stores lack


REPREP = "re-run `dali-fl prep --force`"
STORE_FILE = re.compile(r"\w+_(images|labels)\.npy")  # a split's files, beside the manifest


class RowReader:
    """Gathers rows of a mapped image file after checking, through its own descriptor, that the file kept its size.

    Reading a mapped page past the end of a file cut in place kills the process with SIGBUS, without a word; the
    check makes that one line (a cut landing between the check and the copy can still kill it).
    """

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.path = images, Path(images.filename)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        weakref.finalize(self, os.close, self._fd)

    def __getitem__(self, rows) -> np.ndarray:
        if os.fstat(self._fd).st_size != self._size:
            raise DaliFlError(f"store file {self.path} changed size while it was read; {REPREP}")
        return self.images[rows]


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
        return self._load(split, "images", mmap_mode="r")

    def labels(self, split: str) -> np.ndarray:
        """The split's labels as int64."""
        return self._load(split, "labels", allow_pickle=False)

    def _load(self, split: str, key: str, **kwargs) -> np.ndarray:
        """np.load of a split's file, checked again: a file deleted or cut since open_store is one line."""
        spec = self._entry(split)[key]
        path = self.path / spec["file"]
        _check_npy(path, spec)
        try:
            return np.load(path, **kwargs)
        except (OSError, ValueError) as err:
            raise DaliFlError(f"cannot read store file {path} ({err}); {REPREP}") from None

    def row_reader(self, split: str) -> "RowReader":
        """The split's images for a loader's reads (`reader[rows]`), refusing a file cut in place since it was mapped."""
        return RowReader(self.images(split))

    def files(self) -> tuple[Path, ...]:
        """Every file the store is made of: its manifest and each split's images and labels."""
        names = [e[key]["file"] for e in self.manifest["splits"].values() for key in ("images", "labels")]
        return (self.path / MANIFEST, *(self.path / name for name in names))

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
    images_sha, source_sha = _stream_images(tmp / img_file, data, size, dtype, method, progress, f"prep {split}")
    np.save(tmp / lbl_file, data.labels.astype(np.int64), allow_pickle=False)
    fsync_path(tmp / lbl_file)
    return {"count": n, "source_sha256": source_sha,
            "images": {"file": img_file, "shape": [n, size, size, 3], "dtype": dtype, "sha256": images_sha},
            "labels": {"file": lbl_file, "shape": [n], "dtype": "int64",
                       "sha256": sha256_file(tmp / lbl_file)}}


def _stream_images(path: Path, data: SourceSplit, size: int, dtype: str, method: str, progress: bool,
                   desc: str) -> tuple[str, str]:
    """Resize in bounded chunks and append them after the .npy header; returns (file sha256, source sha256).

    A helper thread writes and hashes chunk i while chunk i+1 is resized, so the disk, the hashes and
    torch's resize overlap; sequential write() instead of memmap stores avoids a page fault per 4 KiB
    and turns a full disk into ENOSPC rather than SIGBUS. open_memmap writes the header.
    """
    n = data.count
    header = open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(n, size, size, 3))
    offset = header.offset
    del header
    os.truncate(path, offset)  # appending is faster than filling the sparse file open_memmap made
    chunk = _rows_per_chunk(data, size, dtype)
    source_digest = hashlib.sha256()
    with open(path, "a+b") as f, ThreadPoolExecutor(1, thread_name_prefix="dali-fl-write") as pool, \
            tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        f.seek(0)
        digest = hashlib.sha256(f.read(offset))
        pending = None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            rows = data.read(a, b)
            block = to_stored_dtype(resize_rows(rows, size, method), dtype)
            if block.shape != (b - a, size, size, 3):
                raise DaliFlError(f"the source gave images shaped {block.shape} for rows {a}..{b}; expected "
                                  f"{(b - a, size, size, 3)}")
            if pending is not None:
                pending.result()
            pending = pool.submit(_write_block, f, digest, np.ascontiguousarray(block), source_digest, rows)
            bar.update(b - a)
        if pending is not None:
            pending.result()
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), source_digest.hexdigest()


def _rows_per_chunk(data: SourceSplit, size: int, dtype: str) -> int:
    """Rows read and resized at once: CHUNK_BYTES of output, and no more than the source allows per read."""
    chunk = max(1, CHUNK_BYTES // (size * size * 3 * np.dtype(dtype).itemsize))
    return min(chunk, data.max_rows or chunk)


def _write_block(f, digest, block: np.ndarray, source_digest, rows) -> None:
    """Append one C-contiguous block to the file and its hash; add the raw rows it came from to the source's."""
    f.write(block.data)
    digest.update(block.data)
    _hash_rows(source_digest, rows)


def _hash_rows(digest, rows) -> None:
    """Add raw source images to `digest`, each as its shape then its bytes, so that chunking leaves the hash alone."""
    for image in rows:
        digest.update(np.asarray(image.shape, np.int64).tobytes())
        digest.update(np.ascontiguousarray(image).data)


def source_sha256(data: SourceSplit, size: int, dtype: str) -> str:
    """The sha256 of a split's raw images (before resize) as prep records it, read in prep's chunks."""
    digest, chunk = hashlib.sha256(), _rows_per_chunk(data, size, dtype)
    for a in range(0, data.count, chunk):
        _hash_rows(digest, data.read(a, min(data.count, a + chunk)))
    return digest.hexdigest()


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


def check_outside_stores(path: Path, flag: str) -> None:
    """Refuse an output in a store: `prep --force` replaces a store whole, and the output with it."""
    store = store_around(path)
    if store is not None:
        where = "is a store" if store == Path(path).absolute() else f"is inside the store {store}"
        raise DaliFlError(f"{flag} {path} {where}, which `dali-fl prep --force` replaces whole; choose a path "
                          "outside it")


def check_replaceable(final: Path) -> None:
    """`--force` replaces only a store (its manifest marks it) or an empty directory: never a directory of the user's,
    nor what the user put in a store."""
    if final.is_symlink():
        raise DaliFlError(f"{final} is a symlink; prep --force replaces only a store directory it made, so remove "
                          "the link or choose another --out")
    if not final.is_dir():
        return
    names = sorted(os.listdir(final))
    if not _is_whole(final) and names:
        raise DaliFlError(f"{final} is not a store (no {MANIFEST}) and not empty; prep --force replaces only a store "
                          "it made, so move that directory away or choose another --out")
    foreign = [n for n in names if n != MANIFEST and not STORE_FILE.fullmatch(n)]
    if foreign:
        raise DaliFlError(f"{final} holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}"
                          ", which prep did not write and --force would delete with the store; move it out first")


def _labels_sha256(labels: np.ndarray) -> str:
    """The sha256 of the labels file _write_split would write, computed in memory."""
    buf = io.BytesIO()
    np.save(buf, labels.astype(np.int64), allow_pickle=False)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _other_data(manifest: dict, source: Source, image_size: int, dtype: str) -> str:
    """What an existing store's manifest says that `source` does not (no image is read yet), or ''."""
    if (manifest["source"], manifest["image_size"], manifest["dtype"]) != (source.name, image_size, dtype):
        return (f"{manifest['source']} at {manifest['image_size']} px {manifest['dtype']}, not {source.name} at "
                f"{image_size} px {dtype}")
    made, asked = manifest["classes"], list(source.classes)
    if made != asked:
        return f"{len(made)} classes from {made[:3]}, not {len(asked)} from {asked[:3]}"
    for split, data in source.splits.items():
        entry = manifest["splits"].get(split)
        if entry is None or entry["count"] != data.count:
            return f"{split} holds {None if entry is None else entry['count']} images, not {data.count}"
        if entry["labels"]["sha256"] != _labels_sha256(data.labels):
            return f"{split} labels differ"
    return ""


def _other_images(store: Store, source: Source) -> str:
    """Which split's raw images differ from those the store was made from, or ''; reads the whole source.

    A store made before prep recorded `source_sha256` is compared on LEGACY_SAMPLES re-resized samples per split
    instead: different data is caught unless it differs only in images the samples miss.
    """
    for split, data in source.splits.items():
        recorded = store.manifest["splits"][split].get("source_sha256")
        if recorded is None:
            check = _check_samples(store, source, split, LEGACY_SAMPLES, seed=0)
            if not check.ok:
                return f"{split} images differ ({check.detail})"
        elif recorded != source_sha256(data, store.image_size, store.dtype):
            return f"{split} images differ (sha256 of the raw source images)"
    return ""


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
    if force or (final.is_dir() and not _is_whole(final)):  # a directory of the user's: --force would not help
        check_replaceable(final)
    if final.exists() and not force:
        existing = open_store(final).manifest  # raises with a clear message when damaged
        made = (existing.get("source_params", {}), existing.get("interpolation"))
        asked = (source.params, interpolation)
        if made != asked:
            raise DaliFlError(f"{final} was made with other settings {made}, not {asked}; "
                              "pass --force to rebuild it or choose another --out")
        differs = _other_data(existing, source, image_size, dtype) or _other_images(open_store(final), source)
        if differs:
            raise DaliFlError(f"{final} was made from other data ({differs}); pass --force to rebuild it or choose "
                              "another --out")
        return final, False
    tmp = _make_tmp(final)
    try:
        check_store_fits(final.parent, sum(d.count for d in source.splits.values()), image_size, dtype)
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
                          f"{what_to_do(err, 'choose another --out')}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def check_store_fits(out_dir: Path, count: int, image_size: int, dtype: str) -> None:
    """Refuse up front when a store of `count` images cannot fit, rather than after minutes of work."""
    need = count * image_size * image_size * 3 * np.dtype(dtype).itemsize
    where = Path(out_dir)
    while not where.exists() and where != where.parent:  # OUT may not exist yet: measure what will hold it
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # unmeasurable here; writing reports a full disk in one line anyway
    if need > free:
        raise DaliFlError(f"the store needs {human_size(need)} but {out_dir} has {human_size(free)} free; "
                          "free some space, use a smaller --image-size or choose another --out")


# --- opening and verifying ---------------------------------------------------------------
# Every value read from a manifest or a file header is checked (type, range, agreement with the
# others) before it sizes anything: a damaged store must fail here, in one line, not in training.

def _store_dir(path: Path) -> None:
    """Check that `path` is a store directory, restoring one that a killed `prep --force` left aside."""
    if not path.exists():
        recover_dir(path, _is_whole)  # a `prep --force` killed between its renames left the old store whole
    if path.exists() and not path.is_dir():
        raise DaliFlError(f"store {path} is a file, not a store directory; pass the directory `dali-fl prep` "
                          "printed (e.g. data/cifar10-224)")
    if not path.is_dir():
        raise DaliFlError(f"store {path} does not exist; create it with `dali-fl prep` "
                          "(e.g. dali-fl prep --source cifar10 --source-path DIR --image-size 224)")


def _plain_file(path: Path) -> int:
    """Size of a store file after checking it is a regular file of its own, not a link or a FIFO."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DaliFlError(f"store file {path} is missing; {REPREP}") from None
    except OSError as err:
        raise unreadable(path, err) from None
    if stat.S_ISLNK(st.st_mode):  # a store must not read (or let verify hash) files outside itself
        raise DaliFlError(f"store file {path} is a symlink; a store holds its own plain files, "
                          f"{REPREP}")
    if not stat.S_ISREG(st.st_mode):
        raise DaliFlError(f"store file {path} is not a regular file (a directory, FIFO, socket or device); "
                          f"{REPREP}")
    return st.st_size


def _load_manifest_json(path: Path) -> object:
    """The parsed manifest.json of a store directory, read only if it is a plain file of sane size."""
    file = path / MANIFEST
    if not file.exists() and not file.is_symlink():
        raise DaliFlError(f"{path} is not a store (no {MANIFEST}); {REPREP}")
    size = _plain_file(file)
    if size > MAX_MANIFEST_BYTES:
        raise DaliFlError(f"{file} is {size / 1e6:.0f} MB, not a manifest; {REPREP}")
    try:
        with open(file, "rb") as f:
            text = f.read()
    except OSError as err:
        raise unreadable(file, err) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise DaliFlError(f"{file} is unreadable or incomplete ({type(err).__name__}: {err}); "
                          f"{REPREP}") from None


def _invalid(path: Path, field: str, value: object, want: str) -> DaliFlError:
    """One-line error for a manifest field that has the wrong type, range or relation to the others."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return DaliFlError(f"{path}/{MANIFEST} is invalid: {field} is {shown}, {want}; {REPREP}")


def _int_field(path: Path, field: str, value: object, lo: int, hi: int) -> int:
    """A manifest integer within [lo, hi]; JSON floats (1e30), strings and booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _invalid(path, field, value, f"not an integer in {lo}..{hi}")
    return value


def _check_top_fields(path: Path, m: object) -> None:
    """Version first (a newer format may differ in everything else), then the store-wide fields."""
    if not isinstance(m, dict):
        raise _invalid(path, "the manifest", m, "not a JSON object")
    version = _int_field(path, "format_version", m.get("format_version"), 1, 1 << 31)
    if version > FORMAT_VERSION:
        raise DaliFlError(f"store {path} has format version {version}, newer than this dali-fl "
                          f"understands ({FORMAT_VERSION}); upgrade dali-fl, or rebuild it with "
                          "`dali-fl prep --force`")
    if not isinstance(m.get("source"), str):
        raise _invalid(path, "source", m.get("source"), "not a source name")
    classes = m.get("classes")
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES \
            or not all(isinstance(c, str) for c in classes):
        raise _invalid(path, "classes", classes, f"not a list of 1..{MAX_CLASSES} class names")
    _int_field(path, "image_size", m.get("image_size"), 1, MAX_IMAGE_SIZE)
    if m.get("dtype") not in DTYPES:
        raise _invalid(path, "dtype", m.get("dtype"), f"not one of {', '.join(DTYPES)}")
    if m.get("interpolation", METHODS[0]) not in METHODS:
        raise _invalid(path, "interpolation", m.get("interpolation"), f"not one of {', '.join(METHODS)}")
    params = m.get("source_params", {})
    if not isinstance(params, dict) or not set(params) <= set(SOURCE_PARAMS):
        raise _invalid(path, "source_params", params, f"not an object with only {', '.join(SOURCE_PARAMS)}")
    for key, value in params.items():
        _int_field(path, f"source_params.{key}", value, 0, (1 << 63) - 1)


def _check_array_spec(path: Path, field: str, spec: object, shape: list[int], dtype: str) -> str:
    """One array's manifest entry: a plain file name in the store, the shape and dtype implied, a sha256."""
    if not isinstance(spec, dict):
        raise _invalid(path, field, spec, "not an object with file, shape, dtype and sha256")
    name = spec.get("file")
    if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or os.path.basename(name) != name \
            or "\\" in name or "\0" in name:  # absolute, `..` or nested: it must name a file inside the store
        raise _invalid(path, f"{field}.file", name, "not the name of a file inside the store")
    if spec.get("shape") != shape:
        got = spec.get("shape")
        grey = field.endswith("images") and isinstance(got, list) and (len(got) == 3 or got[3:] == [1])
        hint = "; single-channel (grey) images are not supported, a store holds RGB" if grey else ""
        raise _invalid(path, f"{field}.shape", spec.get("shape"), f"but count and image_size make it {shape}{hint}")
    if spec.get("dtype") != dtype:
        raise _invalid(path, f"{field}.dtype", spec.get("dtype"), f"not {dtype}")
    if not _is_sha256(spec.get("sha256")):
        raise _invalid(path, f"{field}.sha256", spec.get("sha256"), "not a sha256 hex digest")
    return name


def _is_sha256(digest: object) -> bool:
    """Whether `digest` is a lowercase sha256 hex digest."""
    return isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _check_splits(path: Path, m: dict) -> None:
    """Each split: a count in range, and image and label entries that agree with it and with image_size."""
    splits = m.get("splits")
    if not isinstance(splits, dict) or not 1 <= len(splits) <= MAX_SPLITS:
        raise _invalid(path, "splits", splits, f"not an object of 1..{MAX_SPLITS} splits")
    size, files = m["image_size"], []
    for split, entry in splits.items():
        if not isinstance(entry, dict):
            raise _invalid(path, f"splits.{split}", entry, "not an object with count, images and labels")
        n = _int_field(path, f"splits.{split}.count", entry.get("count"), 1, MAX_STORE_IMAGES)
        files.append(_check_array_spec(path, f"splits.{split}.images", entry.get("images"),
                                       [n, size, size, 3], m["dtype"]))
        files.append(_check_array_spec(path, f"splits.{split}.labels", entry.get("labels"), [n], "int64"))
        if "source_sha256" in entry and not _is_sha256(entry["source_sha256"]):  # absent in older stores
            raise _invalid(path, f"splits.{split}.source_sha256", entry["source_sha256"], "not a sha256 hex digest")
    shared = sorted({f for f in files if files.count(f) > 1})
    if shared:
        raise _invalid(path, "splits", shared, "file names used by more than one array")


def _read_manifest(path: Path) -> dict:
    """The store's manifest after every field in it has been checked."""
    _store_dir(path)
    manifest = _load_manifest_json(path)
    _check_top_fields(path, manifest)
    _check_splits(path, manifest)
    return manifest


def _npy_header(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of a store file, read from its .npy header."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            major, _ = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            return shape, fortran, dtype, f.tell()
    except OSError as err:  # the disk or the permissions failed: the bytes themselves may be fine
        raise unreadable(path, err) from None
    except ValueError as err:
        raise DaliFlError(f"store file {path} is corrupt ({err}); {REPREP}") from None


def _check_npy(path: Path, spec: dict) -> None:
    """Check an .npy file's header and length against the manifest without reading its data."""
    size = _plain_file(path)
    shape, fortran, dtype, offset = _npy_header(path)
    if list(shape) != list(spec["shape"]) or str(dtype) != spec["dtype"]:
        grey = len(spec["shape"]) == 4 and (len(shape) == 3 or shape[3:] == (1,))
        raise DaliFlError(f"store file {path} holds {dtype} {shape}, but the manifest says "
                          f"{spec['dtype']} {tuple(spec['shape'])}"
                          + ("; it holds single-channel images, a store holds RGB" if grey else "")
                          + f"; {REPREP}")
    if fortran:
        raise DaliFlError(f"store file {path} is in Fortran (column-major) order, not C order; "
                          f"{REPREP}")
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise DaliFlError(f"store file {path} is truncated or padded ({size} bytes, "
                          f"expected {expected}); {REPREP}")


def _check_labels(store: Store, split: str) -> None:
    """Every label a class index: an out-of-range one would fail training only after a whole round."""
    file = store.path / store.manifest["splits"][split]["labels"]["file"]
    labels = np.load(file, mmap_mode="r")
    lo, hi, n = int(labels.min()), int(labels.max()), store.num_classes
    if lo < 0 or hi >= n:
        raise DaliFlError(f"store file {file} holds label {lo if lo < 0 else hi}, outside 0..{n - 1} for the "
                          f"{n} classes in {MANIFEST}; {REPREP}")


def _open(path: Path | str, check_labels: bool) -> Store:
    """Open after checking manifest, file kinds, headers, lengths and (optionally) label range."""
    path = Path(path)
    manifest = _read_manifest(path)
    for entry in manifest["splits"].values():
        for key in ("images", "labels"):
            _check_npy(path / entry[key]["file"], entry[key])
    store = Store(path, manifest)
    if check_labels:
        for split in store.splits:
            _check_labels(store, split)
    return store


def open_store(path: Path | str) -> Store:
    """Open a store after checking its manifest, files, headers, lengths and labels (not hashes)."""
    return _open(path, check_labels=True)


def check_sample_count(k: int) -> None:
    """Reject a negative --check-samples before any work."""
    if k < 0:
        raise DaliFlError(f"--check-samples {k} is negative; pass 0 to skip the sample check, or more")


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
    check_sample_count(check_samples)
    try:
        store = _open(path, check_labels=False)  # labels out of range are a check of their own below
    except DaliFlError as err:
        return [Check("manifest and files", False, str(err))], {}, []
    m = store.manifest
    checks = [Check("manifest and files", True, f"format {m['format_version']}, {m['source']}, "
                    f"{m['image_size']}px {m['dtype']}, shapes and lengths match")]
    counts = {}
    if source is not None:  # an edited manifest renamed or added classes that the source does not have
        same = list(source.classes) == list(m["classes"])
        checks.append(Check("classes", same, f"{len(m['classes'])}, as in the source" if same else
                            f"{m['classes'][:3]}... ({len(m['classes'])}) differ from the source's "
                            f"{list(source.classes)[:3]}... ({len(source.classes)})"))
    for split, entry in m["splits"].items():
        images = store.images(split)
        try:
            images_sha, lo, hi = _scan_images(path / entry["images"]["file"], images)
            labels_sha = sha256_file(path / entry["labels"]["file"])
        except OSError as err:  # the disk or the permissions, not the content: say so rather than "differs"
            raise unreadable(Path(err.filename or path), err) from None
        for key, digest in (("images", images_sha), ("labels", labels_sha)):
            checks.append(Check(f"sha256 {entry[key]['file']}", digest == entry[key]["sha256"],
                                digest[:16] if digest == entry[key]["sha256"] else "differs from manifest"))
        labels = store.labels(split)
        bad = int(((labels < 0) | (labels >= store.num_classes)).sum())
        checks.append(Check(f"labels {split}", bad == 0, f"{bad} outside [0, {store.num_classes})"))
        counts[split] = np.bincount(labels[(labels >= 0) & (labels < store.num_classes)],
                                    minlength=store.num_classes)
        checks.append(_value_range(f"value range {split}", len(images), lo, hi, store.dtype))
        if source is not None:
            if check_samples:
                checks.append(_check_samples(store, source, split, check_samples, seed))
            if "source_sha256" in entry and split in source.splits:  # every raw image, where prep recorded them
                same = source_sha256(source.splits[split], store.image_size, store.dtype) == entry["source_sha256"]
                checks.append(Check(f"source sha256 {split}", same, entry["source_sha256"][:16] if same else
                                    "the source's raw images differ from those the store was made from"))
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
