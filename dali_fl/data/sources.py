"""Raw image sources for `prep`: CIFAR-10/100, an image folder, an .npz file, and synthetic data."""
from __future__ import annotations

import errno
import io
import logging
import pickle
import shutil
import socket
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from dali_fl.bounds import check_int64, human_size
from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "cifar100", "imagefolder", "npz", "synthetic")
FOLDER_ROWS_PER_READ = 64  # a 12 MP photo decodes to 36 MB, so 64 of them stay near 2 GB
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a label far above this is a bug, not a class
MAX_SYNTHETIC_IMAGES = 1_000_000  # per split, generated in memory: 3 GB of 32x32 RGB
MAX_CIFAR_MEMBER_BYTES = 1 << 30  # the largest official member (cifar-100 train) is 155 MB
SOURCE_BYTES_PER_READ = 64 << 20  # raw pixels handed to the resizer at once, whatever the output size
SOURCE_PARAMS = ("num_train", "num_test", "seed")  # what a store's manifest may keep to regenerate its source


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
        if not 1 <= len(self.classes) <= MAX_CLASSES:
            raise DaliFlError(f"{self.name} has {len(self.classes)} classes; a source needs 1..{MAX_CLASSES}")
        if not set(self.params) <= set(SOURCE_PARAMS):  # the store's manifest keeps them; opening checks them
            raise DaliFlError(f"{self.name} params {sorted(self.params)} are not among {', '.join(SOURCE_PARAMS)}")
        for split, data in self.splits.items():
            bad = data.labels[(data.labels < 0) | (data.labels >= len(self.classes))]
            if bad.size:
                raise DaliFlError(f"{self.name} {split} labels out of range: {int(bad[0])} is not in "
                                  f"[0, {len(self.classes)}) for its {len(self.classes)} classes; fix the labels")


def unreadable(path: Path, err: OSError) -> DaliFlError:
    """The error for a file the OS will not let us read: not corrupt, so say what to check instead."""
    why = err.strerror or _one_line(err)
    if err.errno in (errno.EACCES, errno.EPERM):
        hint = "check its permissions (it must be readable by this user)"
    else:
        hint = "check that it is a readable regular file on a working disk"
    return DaliFlError(f"cannot read {path} ({why}); {hint}")


def check_memory(nbytes: int, what: str, how: str) -> None:
    """Refuse an allocation the machine cannot hold, before making it, instead of swapping or dying."""
    import psutil  # local: only sources that allocate in bulk need it

    available = psutil.virtual_memory().available
    if nbytes > available:
        raise DaliFlError(f"{what} needs {human_size(nbytes)} of memory but only {human_size(available)} "
                          f"is available; {how}")


def check_layout(images: tuple[tuple[int, ...], np.dtype], labels: tuple[tuple[int, ...], np.dtype],
                 names: tuple[str, str] = ("images", "labels")) -> None:
    """Check (shape, dtype) of images and labels, from arrays or from .npy headers before loading."""
    (x_shape, x_dtype), (y_shape, y_dtype) = images, labels
    x, y = names
    if len(x_shape) != 4 or x_shape[-1] != 3:
        hint = "; single-channel (grey) images need 3 RGB channels" if len(x_shape) == 3 or x_shape[-1:] == (1,) \
            else ""
        raise DaliFlError(f"{x} must be shaped (N, H, W, 3), got {tuple(x_shape)}{hint}")
    if x_dtype != np.uint8:
        raise DaliFlError(f"{x} must be uint8 (0..255), got {x_dtype}")
    if min(x_shape[1:3]) < 1:
        raise DaliFlError(f"{x} are empty images, shaped {tuple(x_shape)}; each needs at least 1x1 pixels")
    if len(y_shape) != 1 or y_shape[0] != x_shape[0] or not np.issubdtype(y_dtype, np.integer):
        raise DaliFlError(f"{y} must be {x_shape[0]} integers, got {y_dtype} {tuple(y_shape)}")


def in_memory_split(images: np.ndarray, labels: np.ndarray,
                    names: tuple[str, str] = ("images", "labels")) -> SourceSplit:
    """Wrap arrays already in memory as a split, after checking their layout and label range."""
    labels = np.asarray(labels)
    check_layout((images.shape, images.dtype), (labels.shape, labels.dtype), names)
    # Checked before the int64 cast: a uint64 label above 2**63 would wrap to a negative one.
    if labels.size and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise DaliFlError(f"{names[1]} holds label {int(bad)}, out of range: labels must be class indices "
                          f"0..{MAX_CLASSES - 1} (0..C-1 for C classes); fix the labels")
    row_bytes = int(np.prod(images.shape[1:]))
    return SourceSplit(labels=labels.astype(np.int64), read=lambda a, b: images[a:b],
                       max_rows=max(1, SOURCE_BYTES_PER_READ // row_bytes))


def _regular_file(path: Path, how: str) -> int:
    """Size of `path` after checking it is a regular file; a FIFO or device would block or never end."""
    try:
        st = path.stat()
    except OSError as err:
        raise unreadable(path, err) from None
    if not stat.S_ISREG(st.st_mode):
        raise DaliFlError(f"{path} is not a regular file (it is a directory, FIFO, socket or device); {how}")
    return st.st_size


def _read_file(path: Path, limit: int, what: str, how: str) -> bytes:
    """Read a whole regular file of at most `limit` bytes; unreadable is not corrupt."""
    size = _regular_file(path, how)
    if size > limit:
        raise DaliFlError(f"{path} is {size / 1e9:.2f} GB, far larger than {what}; {how}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise unreadable(path, err) from None


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
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise DaliFlError(f"{what} has {data.shape[0]} images but not {data.shape[0]} integer "
                          f"{label_key.decode()}; not a CIFAR batch, re-download the dataset")
    return _cifar_rows_to_hwc(data), labels  # in_memory_split range-checks them before the int64 cast


def _read_cifar_folder(path: Path, spec: dict) -> dict[str, bytes]:
    """Read every CIFAR member from the dataset folder or its parent."""
    root = path / spec["folder"] if (path / spec["folder"]).is_dir() else path
    if not (root / spec["meta"]).exists():
        raise DaliFlError(f"{path} is not a CIFAR layout (no {spec['folder']}/{spec['meta']}); "
                          f"pass the {spec['folder']} directory or {spec['archive']}")
    blobs = {}
    for member in [spec["meta"], *spec["train"], *spec["test"]]:
        if not (root / member).exists() and not (root / member).is_symlink():
            raise DaliFlError(f"{root} is not a complete CIFAR layout: it has no {member}; "
                              "re-download the dataset")
        blobs[member] = _read_file(root / member, MAX_CIFAR_MEMBER_BYTES, "a CIFAR batch",
                                   "re-download the dataset")
    return blobs


def _read_cifar_archive(path: Path, spec: dict) -> dict[str, bytes]:
    """Read every CIFAR member from the official .tar.gz (or any tar holding the same files)."""
    _regular_file(path, f"pass the {spec['folder']} directory or {spec['archive']}")
    try:
        f = open(path, "rb")  # our own handle, so that a permission error is not taken for corruption
    except OSError as err:
        raise unreadable(path, err) from None
    try:
        with f, tarfile.open(fileobj=f, mode="r:*") as tar:
            return _cifar_members(tar, path, spec)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        if isinstance(err, OSError) and err.errno is not None:  # the OS failed to read, the bytes may be fine
            raise unreadable(path, err) from None
        raise DaliFlError(f"{path} is not a readable CIFAR archive, truncated or corrupt ({_one_line(err)}); "
                          f"re-download it, or pass the {spec['folder']} directory") from None


def _cifar_members(tar: tarfile.TarFile, path: Path, spec: dict) -> dict[str, bytes]:
    """The wanted members of an open CIFAR tar, each size-checked before it is decompressed."""
    wanted = [spec["meta"], *spec["train"], *spec["test"]]
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
    missing = [m for m in wanted if m not in members]
    if missing:
        raise DaliFlError(f"{path} is not a CIFAR archive: it has no {missing[0]}; "
                          f"pass the {spec['folder']} directory or {spec['archive']}")
    big = [m for m in wanted if members[m].size > MAX_CIFAR_MEMBER_BYTES]
    if big:  # a gzip bomb declares its size up front: refuse it before inflating it
        raise DaliFlError(f"{path}: member {big[0]} claims {members[big[0]].size / 1e9:.2f} GB, far larger than "
                          "a CIFAR batch; re-download the dataset")
    return {m: tar.extractfile(members[m]).read() for m in wanted}


def _one_line(err: BaseException) -> str:
    """An exception as `Type: first line of its message`, for one-line errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _download_cifar(name: str, root: Path) -> Path:
    """Fetch CIFAR through torchvision; offline this fails fast with a how-to."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)  # the first folder we create
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
        if made is not None:  # what this call created holds only the failed download: leave nothing behind
            shutil.rmtree(made, ignore_errors=True)
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
    """One image file as uint8 RGB (grey, 16-bit grey, palette and alpha images are converted)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode == "I" or img.mode.startswith("I;16"):
                return _wide_grey_to_rgb(np.asarray(img), path)
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways to fail
        if isinstance(err, OSError) and err.errno is not None:  # the OS refused, the image may be fine
            raise unreadable(path, err) from None
        raise DaliFlError(f"cannot read image {path} ({_one_line(err)}); replace or remove it") from None


def _wide_grey_to_rgb(values: np.ndarray, path: Path) -> np.ndarray:
    """16-bit grey pixels (PIL mode I;16 or I) as uint8 RGB: the high byte, as Pillow reads 16-bit RGB PNGs.

    PIL's convert("RGB") clips these modes at 255 instead of scaling them, which turned almost every pixel white.
    """
    if values.size and (int(values.min()) < 0 or int(values.max()) > 0xFFFF):
        raise DaliFlError(f"cannot read image {path}: its integer pixels span {int(values.min())}..{int(values.max())}, "
                          "outside 16-bit 0..65535; save it as 8- or 16-bit PNG or JPEG")
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _image_files(folder: Path) -> list[Path]:
    """The class folder's image files, sorted; anything but a regular file is skipped with a warning, and so are
    files of other kinds (a .webp or .tif image left out changed the data without a word)."""
    files, others = [], []
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            others += [] if f.name.startswith(".") else [f.name]
        elif f.is_file():  # follows symlinks; a FIFO would block the decoder forever, a directory fail it
            files.append(f)
        else:
            log.warning("skipping %s: not a regular file (a directory, FIFO, socket, device or broken link)", f)
    if others:
        log.warning("skipping %d entries of %s that are not %s images (e.g. %s)", len(others), folder,
                    "/".join(IMAGE_SUFFIXES), others[0])
    return files


def _folder_split(root: Path, classes: tuple[str, ...]) -> SourceSplit:
    """A split of an image folder: files sorted per class, read when their rows are asked for."""
    files, labels = [], []
    for label, cls in enumerate(classes):
        if (root / cls).is_dir():
            found = _image_files(root / cls)
            files += found
            labels += [label] * len(found)

    def read(a: int, b: int):
        images = [_read_image(f) for f in files[a:b]]
        same = len({im.shape for im in images}) == 1
        return np.stack(images) if same else images  # mixed sizes are resized one by one
    return SourceSplit(np.asarray(labels, dtype=np.int64), read, max_rows=FOLDER_ROWS_PER_READ)


def _hidden(folder: Path) -> bool:
    """A hidden folder (.ipynb_checkpoints, .git) is no class: it would shift every label after it."""
    if folder.name.startswith("."):
        log.warning("skipping %s: a hidden folder is not a class", folder)
        return True
    return False


def load_imagefolder(path: Path) -> Source:
    """Load ROOT/{train,test}/CLASS/*.png|jpg with classes in sorted order."""
    if not (path / "train").is_dir() or not (path / "test").is_dir():  # also when path is a file
        raise DaliFlError(f"{path} is not an image folder: expected {path}/train/CLASS/*.png and "
                          f"{path}/test/CLASS/*.png")
    classes, unknown = (tuple(sorted(d.name for d in (path / s).iterdir() if d.is_dir() and not _hidden(d)))
                        for s in ("train", "test"))
    unknown = sorted(set(unknown) - set(classes))
    if not classes or unknown:
        raise DaliFlError(f"{path}: train has classes {list(classes)}; test has classes not in train: {unknown}")
    if len(classes) > MAX_CLASSES:
        raise DaliFlError(f"{path}/train has {len(classes)} class folders; at most {MAX_CLASSES} are supported")
    splits = {s: _folder_split(path / s, classes) for s in ("train", "test")}
    empty = np.flatnonzero(np.bincount(splits["train"].labels, minlength=len(classes)) == 0)
    if empty.size:  # its label would exist with no image to learn it from, and the head would have an output for it
        raise DaliFlError(f"{path / 'train' / classes[empty[0]]} holds no {'/'.join(IMAGE_SUFFIXES)} images; convert "
                          "its images to one of these or move the folder out")
    for s, split in splits.items():
        if split.count == 0:
            raise DaliFlError(f"{path}/{s} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return Source("imagefolder", classes, splits)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_HOW = "save one with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"


def _npz_header(data, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an open .npz, from its .npy header: nothing is inflated."""
    fmt = np.lib.format
    name = f"{key}.npy" if f"{key}.npy" in data.zip.namelist() else key
    with data.zip.open(name) as member:
        major, _ = fmt.read_magic(member)
        read = {1: fmt.read_array_header_1_0, 2: fmt.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f"{key} uses .npy format version {major}, which needs unicode field names")
        shape, _, dtype = read(member)
    return shape, dtype


def _check_npz_headers(path: Path, headers: dict) -> None:
    """Layout and memory need of the arrays, before any of them is loaded."""
    for key, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise DaliFlError(f"{path} is not a readable .npz file ({key} holds Python objects, which would "
                              f"need pickle); {_NPZ_HOW}")
    for s in ("train", "test"):
        check_layout(headers[f"x_{s}"], headers[f"y_{s}"], (f"{path.name}: x_{s}", f"{path.name}: y_{s}"))
    # Shapes come from the file: a small compressed archive can declare terabytes.
    need = sum(int(np.prod(shape, dtype=object)) * dtype.itemsize for shape, dtype in headers.values())
    check_memory(need, f"{path} (uncompressed)", "use a smaller dataset or a machine with more memory")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of an .npz source, each checked from its header before it is loaded."""
    _regular_file(path, f"pass an .npz file; {_NPZ_HOW}")
    try:
        f = open(path, "rb")  # our handle: np.load leaks its own when the zip is corrupt
    except OSError as err:
        raise unreadable(path, err) from None
    try:
        with f:
            magic = f.read(6)
            if magic == b"\x93NUMPY":
                raise DaliFlError(f"{path} holds a single .npy array, not an .npz archive; {_NPZ_HOW}")
            if not magic.startswith(b"PK"):  # np.load would take any other bytes for a pickle
                raise DaliFlError(f"{path} is not an .npz (zip) archive; {_NPZ_HOW}")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                missing = [k for k in _NPZ_KEYS if k not in data.files]
                if missing:
                    raise DaliFlError(f"{path} lacks {', '.join(missing)}; an npz source needs x_train, "
                                      "y_train, x_test, y_test")
                _check_npz_headers(path, {k: _npz_header(data, k) for k in _NPZ_KEYS})
                return {k: data[k] for k in _NPZ_KEYS}
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as err:  # RuntimeError: an encrypted member; NotImplementedError: an odd compression
        if isinstance(err, OSError) and err.errno is not None:
            raise unreadable(path, err) from None
        raise DaliFlError(f"{path} is not a readable .npz file ({_one_line(err)}); {_NPZ_HOW}") from None


def load_npz(path: Path) -> Source:
    """Load an .npz with x_train, y_train, x_test, y_test (uint8 NHWC images, integer labels)."""
    arrays = _read_npz(path)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) == 0:
            raise DaliFlError(f"{path}: x_{split} holds no images; both splits need at least one")
    # in_memory_split bounds every label by MAX_CLASSES, so the class list below stays small.
    splits = {s: in_memory_split(arrays[f"x_{s}"], arrays[f"y_{s}"], (f"{path.name}: x_{s}", f"{path.name}: y_{s}"))
              for s in ("train", "test")}
    num_classes = int(max(splits["train"].labels.max(), splits["test"].labels.max())) + 1
    return Source("npz", tuple(str(i) for i in range(num_classes)), splits)


_SYNTHETIC_BYTES_PER_IMAGE = 32 * 32 * 3 + 8 + 4  # uint8 pixels, int64 label, float32 brightness


def synthetic_arrays(num: int, seed: int, split: str, num_classes: int = 10,
                     size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Learnable CIFAR-like data: a smooth colour pattern per class, plus shift and noise."""
    templates = np.stack([
        np.random.default_rng([seed, 1000 + c]).uniform(0, 255, (1, 4, 4, 3)).astype(np.uint8)
        for c in range(num_classes)])[:, 0]
    from dali_fl.data.resize import resize_batch  # local: keeps torch out of plain source imports

    templates = resize_batch(templates, size).astype(np.float32)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, num).astype(np.int64)
    brightness = rng.uniform(-25, 25, (num, 1, 1, 1)).astype(np.float32)
    images = np.empty((num, size, size, 3), np.uint8)
    # The noise is drawn block by block: the same stream as one draw, without its float copies of everything.
    step = max(1, SOURCE_BYTES_PER_READ // (size * size * 3 * 8))
    for a in range(0, num, step):
        b = min(num, a + step)
        noise = rng.normal(0, 30, (b - a, size, size, 3)).astype(np.float32)
        images[a:b] = np.clip(templates[labels[a:b]] + brightness[a:b] + noise, 0, 255).round().astype(np.uint8)
    return images, labels


def check_synthetic_args(num_train: int, num_test: int, seed: int) -> None:
    """Reject synthetic sizes and seeds before anything is generated."""
    for option, n in (("--num-train", num_train), ("--num-test", num_test)):
        if not 1 <= n <= MAX_SYNTHETIC_IMAGES:
            raise DaliFlError(f"{option} {n} is out of range: the synthetic source makes at least 1 and at most "
                              f"{MAX_SYNTHETIC_IMAGES} images per split, in memory; use a real --source for more")
    if seed < 0:
        raise DaliFlError(f"--seed {seed} is negative; seeds must be >= 0")
    check_int64("--seed", seed)  # the manifest records it, and every reader checks it as a 64-bit integer


def load_synthetic(num_train: int, num_test: int, seed: int) -> Source:
    """The embedded default: seeded, learnable, CIFAR-sized (32x32, 10 classes)."""
    check_synthetic_args(num_train, num_test, seed)
    check_memory((num_train + num_test) * _SYNTHETIC_BYTES_PER_IMAGE,
                 f"the synthetic source of {num_train + num_test} images", "use a smaller --num-train")
    splits = {s: in_memory_split(*synthetic_arrays(n, seed, s))
              for s, n in (("train", num_train), ("test", num_test))}
    params = dict(zip(SOURCE_PARAMS, (num_train, num_test, seed)))
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
    if path is not None and not (path.is_dir() or path.is_file()):  # opening a FIFO blocks forever
        raise DaliFlError(f"source path {path} is neither a regular file nor a directory (a FIFO, socket or "
                          "device?); pass the dataset's file or directory as --source-path")
    if name in _CIFAR:
        return load_cifar(name, path, download, download_root)
    if name == "synthetic":
        return load_synthetic(num_train, num_test, seed)
    if path is None:
        what = "ROOT with train/CLASS/*.png and test/CLASS/*.png" if name == "imagefolder" else \
            "an .npz with x_train, y_train, x_test, y_test"
        raise DaliFlError(f"source {name} needs --source-path ({what})")
    return load_imagefolder(path) if name == "imagefolder" else load_npz(path)
