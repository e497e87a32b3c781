"""Raw image sources for `prep`: CIFAR-10/100, an image folder, an .npz file, and synthetic data."""
from __future__ import annotations

import io
import logging
import pickle
import socket
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "imagefolder", "npz", "synthetic")
FOLDER_ROWS_PER_READ = 64  # a 12 MP photo decodes to 36 MB, so 64 of them stay near 2 GB
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class SourceSplit:
    """One split of a source: labels in memory, images read in row ranges on demand."""

    labels: np.ndarray
    read: Callable[[int, int], np.ndarray]  # rows [start, stop) as uint8 (n, H, W, 3)
    max_rows: Optional[int] = None  # cap on rows per read: decoded photos can be far larger than the output

    @property
    def count(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Source:
    """A named source with its class names and its splits."""

    name: str
    classes: tuple[str, ...]
    splits: dict[str, SourceSplit]
    params: dict = field(default_factory=dict)  # what regenerates it (synthetic seed and sizes)

    def __post_init__(self) -> None:
        for split, data in self.splits.items():
            bad = data.labels[(data.labels < 0) | (data.labels >= len(self.classes))]
            if bad.size:
                raise DaliFlError(f"{self.name} {split} labels out of range: {int(bad[0])} is not in "
                                  f"[0, {len(self.classes)}) for its {len(self.classes)} classes; fix the labels")


def in_memory_split(images: np.ndarray, labels: np.ndarray,
                    names: tuple[str, str] = ("images", "labels")) -> SourceSplit:
    """Wrap arrays already in memory as a split, after checking their layout."""
    x, y = names
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DaliFlError(f"{x} must be shaped (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise DaliFlError(f"{x} must be uint8 (0..255), got {images.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DaliFlError(f"{y} must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}")
    return SourceSplit(labels=labels.astype(np.int64), read=lambda a, b: images[a:b])


# --- CIFAR ---------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names=b"label_names", labels=b"labels"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"],
                     meta="meta", names=b"fine_label_names", labels=b"fine_labels"),
}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers and numpy arrays, nothing executable."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(blob: bytes, what: str) -> dict:
    """Load one CIFAR pickle safely; any oddity is a user error naming the file."""
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:  # truncated, not a pickle, or a forbidden global
        raise DaliFlError(f"{what} is not a readable CIFAR batch ({_one_line(err)}); "
                          "re-download the dataset") from None
    if not isinstance(obj, dict):
        raise DaliFlError(f"{what} is not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return obj


def _cifar_rows_to_hwc(data: np.ndarray) -> np.ndarray:
    """CIFAR rows are channel-planar (R plane, G plane, B plane of 32x32): make them HWC."""
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_batch(obj: dict, label_key: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch and return its (HWC images, labels)."""
    data, labels = obj.get(b"data"), obj.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DaliFlError(f"{what} has no uint8 'data' array of 3072-value rows; not a CIFAR batch, "
                          "re-download the dataset")
    try:
        labels = np.asarray(labels)
        ok = labels.ndim == 1 and len(labels) == data.shape[0] and np.issubdtype(labels.dtype, np.integer)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DaliFlError(f"{what} has {data.shape[0]} images but not {data.shape[0]} integer "
                          f"{label_key.decode()}; not a CIFAR batch, re-download the dataset")
    return _cifar_rows_to_hwc(data), labels.astype(np.int64)


def _read_cifar_folder(path: Path, spec: dict) -> dict[str, bytes]:
    """Read every CIFAR member from the dataset folder or its parent."""
    root = path / spec["folder"] if (path / spec["folder"]).is_dir() else path
    if not (root / spec["meta"]).is_file():
        raise DaliFlError(f"{path} is not a CIFAR layout (no {spec['folder']}/{spec['meta']}); "
                          f"pass the {spec['folder']} directory or {spec['archive']}")
    blobs = {}
    for member in [spec["meta"], *spec["train"], *spec["test"]]:
        if not (root / member).is_file():
            raise DaliFlError(f"{root} is not a complete CIFAR layout: it has no {member}; "
                              "re-download the dataset")
        blobs[member] = (root / member).read_bytes()
    return blobs


def _read_cifar_archive(path: Path, spec: dict) -> dict[str, bytes]:
    """Read every CIFAR member from the official .tar.gz (or any tar holding the same files)."""
    wanted = [spec["meta"], *spec["train"], *spec["test"]]
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [m for m in wanted if m not in members]
            if missing:
                raise DaliFlError(f"{path} is not a CIFAR archive: it has no {missing[0]}; "
                                  f"pass the {spec['folder']} directory or {spec['archive']}")
            return {m: tar.extractfile(members[m]).read() for m in wanted}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DaliFlError(f"{path} is not a readable CIFAR archive, truncated or corrupt ({_one_line(err)}); "
                          f"re-download it, or pass the {spec['folder']} directory") from None


def _one_line(err: BaseException) -> str:
    """An exception as `Type: first line of its message`, for one-line errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _download_cifar(name: str, root: Path) -> Path:
    """Fetch CIFAR through torchvision; offline this fails fast with a how-to."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DaliFlError(f"cannot create the download folder {root} ({err.strerror}); "
                          "choose another --out") from None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        cls(str(root), train=True, download=True)
    except Exception as err:  # urllib, socket and torchvision's own errors alike
        raise DaliFlError(f"could not download {name} ({_one_line(err)}); without internet, fetch "
                          f"{_CIFAR[name]['archive']} elsewhere and pass --source-path PATH/TO/"
                          f"{_CIFAR[name]['archive']}") from None
    finally:
        socket.setdefaulttimeout(old)
    return root


def load_cifar(name: str, path: Optional[Path], download: bool, download_root: Path) -> Source:
    """Load CIFAR-10 or CIFAR-100 from the official python-version directory or archive."""
    spec = _CIFAR[name]
    if path is None:
        if not download:
            raise DaliFlError(f"{name} needs --source-path (a {spec['folder']} directory or "
                              f"{spec['archive']}), or --download on a machine with internet")
        path = _download_cifar(name, download_root)
    blobs = _read_cifar_folder(path, spec) if path.is_dir() else _read_cifar_archive(path, spec)
    meta = _unpickle(blobs[spec["meta"]], f"{spec['meta']} in {path}")
    names = meta.get(spec["names"])
    names = names if isinstance(names, list) else []
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    if not classes:
        raise DaliFlError(f"{spec['meta']} in {path} has no class names; not a CIFAR layout, "
                          "re-download the dataset")
    splits = {}
    for split in ("train", "test"):
        parts = [_cifar_batch(_unpickle(blobs[m], f"{m} in {path}"), spec["labels"], f"{m} in {path}")
                 for m in spec[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = in_memory_split(images, labels)
    return Source(name, classes, splits)


# --- image folder, npz, synthetic ----------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 RGB (grey, palette and alpha images are converted)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways to fail
        raise DaliFlError(f"cannot read image {path} ({_one_line(err)}); replace or remove it") from None


def _folder_split(root: Path, classes: tuple[str, ...]) -> SourceSplit:
    """A split of an image folder: files sorted per class, read when their rows are asked for."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            files.append(f)
            labels.append(label)

    def read(a: int, b: int):
        images = [_read_image(f) for f in files[a:b]]
        same = len({im.shape for im in images}) == 1
        return np.stack(images) if same else images  # mixed sizes are resized one by one
    return SourceSplit(np.asarray(labels, dtype=np.int64), read, max_rows=FOLDER_ROWS_PER_READ)


def load_imagefolder(path: Path) -> Source:
    """Load ROOT/{train,test}/CLASS/*.png|jpg with classes in sorted order."""
    if not (path / "train").is_dir() or not (path / "test").is_dir():  # also when path is a file
        raise DaliFlError(f"{path} is not an image folder: expected {path}/train/CLASS/*.png and "
                          f"{path}/test/CLASS/*.png")
    classes = tuple(sorted(d.name for d in (path / "train").iterdir() if d.is_dir()))
    unknown = sorted({d.name for d in (path / "test").iterdir() if d.is_dir()} - set(classes))
    if not classes or unknown:
        raise DaliFlError(f"{path}: train has classes {list(classes)}; test has classes not in train: {unknown}")
    splits = {s: _folder_split(path / s, classes) for s in ("train", "test")}
    for s, split in splits.items():
        if split.count == 0:
            raise DaliFlError(f"{path}/{s} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return Source("imagefolder", classes, splits)


def load_npz(path: Path) -> Source:
    """Load an .npz with x_train, y_train, x_test, y_test (uint8 NHWC images, integer labels)."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    how = "save one with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
    try:
        with open(path, "rb") as f:  # our handle: np.load leaks its own when the zip is corrupt
            magic = f.read(6)
            if magic == b"\x93NUMPY":
                raise DaliFlError(f"{path} holds a single .npy array, not an .npz archive; {how}")
            if not magic.startswith(b"PK"):  # np.load would take any other bytes for a pickle
                raise DaliFlError(f"{path} is not an .npz (zip) archive; {how}")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                missing = [k for k in keys if k not in data.files]
                arrays = {k: data[k] for k in keys if k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DaliFlError(f"{path} is not a readable .npz file ({_one_line(err)}); {how}") from None
    if missing:
        raise DaliFlError(f"{path} lacks {', '.join(missing)}; an npz source needs x_train, y_train, "
                          "x_test, y_test")
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) == 0:
            raise DaliFlError(f"{path}: x_{split} holds no images; both splits need at least one")
    splits = {s: in_memory_split(arrays[f"x_{s}"], arrays[f"y_{s}"], (f"{path.name}: x_{s}", f"y_{s}"))
              for s in ("train", "test")}
    num_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    return Source("npz", tuple(str(i) for i in range(num_classes)), splits)


def synthetic_arrays(num: int, seed: int, split: str, num_classes: int = 10,
                     size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Learnable CIFAR-like data: a smooth colour pattern per class, plus shift and noise."""
    templates = np.stack([
        np.random.default_rng([seed, 1000 + c]).uniform(0, 255, (1, 4, 4, 3)).astype(np.uint8)
        for c in range(num_classes)])[:, 0]
    from dali_fl.resize import resize_batch  # local: keeps torch out of plain source imports

    templates = resize_batch(templates, size).astype(np.float32)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, num).astype(np.int64)
    brightness = rng.uniform(-25, 25, (num, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 30, (num, size, size, 3)).astype(np.float32)
    images = np.clip(templates[labels] + brightness + noise, 0, 255).round().astype(np.uint8)
    return images, labels


def load_synthetic(num_train: int, num_test: int, seed: int) -> Source:
    """The embedded default: seeded, learnable, CIFAR-sized (32x32, 10 classes)."""
    if num_train < 1 or num_test < 1:
        raise DaliFlError("--num-train and --num-test must be at least 1")
    splits = {s: in_memory_split(*synthetic_arrays(n, seed, s))
              for s, n in (("train", num_train), ("test", num_test))}
    params = {"num_train": num_train, "num_test": num_test, "seed": seed}
    return Source("synthetic", tuple(f"class{c}" for c in range(10)), splits, params)


def load_source(name: str, path: Optional[Path] = None, *, download: bool = False,
                download_root: Path = Path("data/downloads"), num_train: int = 5000,
                num_test: int = 1000, seed: int = 0) -> Source:
    """Open a source by name; a missing or malformed source is a DaliFlError."""
    if name not in SOURCES:
        raise DaliFlError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if path is not None and not path.exists():
        raise DaliFlError(f"source path {path} does not exist; pass an existing file or directory "
                          "as --source-path")
    if name in _CIFAR:
        return load_cifar(name, path, download, download_root)
    if name == "synthetic":
        return load_synthetic(num_train, num_test, seed)
    if path is None:
        what = "ROOT with train/CLASS/*.png and test/CLASS/*.png" if name == "imagefolder" else \
            "an .npz with x_train, y_train, x_test, y_test"
        raise DaliFlError(f"source {name} needs --source-path ({what})")
    return load_imagefolder(path) if name == "imagefolder" else load_npz(path)
