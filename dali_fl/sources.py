"""Raw image sources for `prep`: CIFAR-10/100, an image folder, an .npz file, and synthetic data."""
from __future__ import annotations

import io
import logging
import pickle
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "imagefolder", "npz", "synthetic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class SourceSplit:
    """One split of a source: labels in memory, images read in row ranges on demand."""

    labels: np.ndarray
    read: Callable[[int, int], np.ndarray]  # rows [start, stop) as uint8 (n, H, W, 3)

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


def in_memory_split(images: np.ndarray, labels: np.ndarray) -> SourceSplit:
    """Wrap arrays already in memory as a split, after checking their layout."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DaliFlError(f"images must be shaped (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise DaliFlError(f"images must be uint8, got {images.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DaliFlError(f"labels must be {images.shape[0]} integers, got {labels.dtype} {labels.shape}")
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
        raise DaliFlError(f"{what} is not a readable CIFAR batch ({type(err).__name__}: {err}); "
                          "re-download the dataset") from None
    if not isinstance(obj, dict):
        raise DaliFlError(f"{what} is not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return obj


def _cifar_rows_to_hwc(data: np.ndarray) -> np.ndarray:
    """CIFAR rows are channel-planar (R plane, G plane, B plane of 32x32): make them HWC."""
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_batch(obj: dict, label_key: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = obj.get(b"data"), obj.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DaliFlError(f"{what} has no uint8 'data' array of 3072-value rows; not a CIFAR batch")
    if labels is None or len(labels) != data.shape[0]:
        raise DaliFlError(f"{what} has {data.shape[0]} images but its labels do not match")
    return _cifar_rows_to_hwc(data), np.asarray(labels, dtype=np.int64)


def _cifar_reader(path: Path, spec: dict) -> Callable[[str], bytes]:
    """Return a function that reads a named member from a CIFAR directory or .tar.gz."""
    if path.is_dir():
        root = path / spec["folder"] if (path / spec["folder"]).is_dir() else path
        if not (root / spec["meta"]).is_file():
            raise DaliFlError(f"{path} is not a CIFAR layout (no {spec['folder']}/{spec['meta']}); "
                              f"pass the {spec['folder']} directory or {spec['archive']}")
        return lambda member: (root / member).read_bytes()
    try:
        tar = tarfile.open(path, "r:*")
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DaliFlError(f"{path} is not a readable CIFAR archive ({err}); "
                          f"pass the {spec['folder']} directory or {spec['archive']}") from None

    def read(member: str) -> bytes:
        if member not in members:
            raise DaliFlError(f"{path} is not a CIFAR archive: it has no {member}")
        try:
            return tar.extractfile(members[member]).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DaliFlError(f"{path} is truncated or corrupt at {member} ({err})") from None
    return read


def _download_cifar(name: str, root: Path) -> Path:
    """Fetch CIFAR through torchvision; offline this fails fast with a how-to."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        cls(str(root), train=True, download=True)
    except Exception as err:
        raise DaliFlError(f"could not download {name} ({type(err).__name__}); without internet, copy "
                          f"{_CIFAR[name]['archive']} here and pass --source-path FILE") from None
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
    read = _cifar_reader(path, spec)
    meta = _unpickle(read(spec["meta"]), f"{spec['meta']}")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec["names"], []))
    if not classes:
        raise DaliFlError(f"{spec['meta']} in {path} has no class names; not a CIFAR layout")
    splits = {}
    for split in ("train", "test"):
        parts = [_cifar_batch(_unpickle(read(m), m), spec["labels"], m) for m in spec[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = in_memory_split(images, labels)
    return Source(name, classes, splits)


# --- image folder, npz, synthetic ----------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DaliFlError(f"cannot read image {path} ({err})") from None


def _folder_split(root: Path, classes: tuple[str, ...]) -> SourceSplit:
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            files.append(f)
            labels.append(label)

    def read(a: int, b: int):
        images = [_read_image(f) for f in files[a:b]]
        same = len({im.shape for im in images}) == 1
        return np.stack(images) if same else images  # mixed sizes are resized one by one
    return SourceSplit(np.asarray(labels, dtype=np.int64), read)


def load_imagefolder(path: Path) -> Source:
    """Load ROOT/{train,test}/CLASS/*.png|jpg with classes in sorted order."""
    if not (path / "train").is_dir() or not (path / "test").is_dir():
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
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as err:
        raise DaliFlError(f"{path} lacks array {err}; an npz source needs x_train, y_train, x_test, y_test") from None
    except (OSError, ValueError) as err:
        raise DaliFlError(f"{path} is not a readable .npz file ({err})") from None
    num_classes = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
    splits = {s: in_memory_split(arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")}
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
        raise DaliFlError(f"source path {path} does not exist")
    if name in _CIFAR:
        return load_cifar(name, path, download, download_root)
    if name == "synthetic":
        return load_synthetic(num_train, num_test, seed)
    if path is None:
        raise DaliFlError(f"source {name} needs --source-path")
    return load_imagefolder(path) if name == "imagefolder" else load_npz(path)
