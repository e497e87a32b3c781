"""Generic fixtures: CIFAR-format files built on the fly, and a CLI runner that checks error output."""
from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner, Result

# name -> (folder, archive, train members, test members, meta member, label key, names key)
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"], "meta",
                 b"fine_labels", b"fine_label_names"),
}


def cifar_pickle(obj: object) -> bytes:
    """Pickle like the official files: protocol 2, arrays rebuilt through numpy.core.multiarray."""
    blob = pickle.dumps(obj, protocol=2)
    # The real files were written by Python 2 with numpy 1.x; numpy 2 writes numpy._core instead.
    return blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def hwc_to_cifar_rows(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) HWC -> (n, 3072) rows: the 1024 R values, then G, then B, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def marker_image() -> np.ndarray:
    """Top-left pixel pure red, rest of the top row green, left column below it white, the rest blue."""
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :] = (0, 0, 255)
    img[0, 1:] = (0, 255, 0)
    img[1:, 0] = (255, 255, 255)
    img[0, 0] = (255, 0, 0)
    return img


@dataclass(frozen=True)
class CifarFiles:
    """A CIFAR-format dataset written by the fixture, with what a loader must return."""

    folder: Path  # the cifar-10-batches-py / cifar-100-python directory
    classes: tuple[str, ...]
    train: tuple[np.ndarray, np.ndarray]  # (HWC images, labels) in file order
    test: tuple[np.ndarray, np.ndarray]

    def member(self, name: str) -> Path:
        return self.folder / name

    def archive(self, out: Path | None = None) -> Path:
        """Pack the folder as the official .tar.gz (top-level folder inside the archive)."""
        name = CIFAR_LAYOUT["cifar10" if self.folder.name.startswith("cifar-10-") else "cifar100"][1]
        out = out or self.folder.parent / name
        with tarfile.open(out, "w:gz") as tar:
            tar.add(self.folder, arcname=self.folder.name)
        return out


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes, tag: str) -> dict:
    batch = {b"batch_label": tag.encode(), b"data": hwc_to_cifar_rows(images),
             label_key: [int(x) for x in labels],
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(x) // 5 for x in labels]
    return batch


def write_cifar(root: Path, name: str = "cifar10", per_member: int = 3, seed: int = 0) -> CifarFiles:
    """Write a small dataset in the official python-version layout; train image 0 is marker_image()."""
    folder, _, train_members, test_members, meta_member, label_key, names_key = CIFAR_LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    out = root / folder
    out.mkdir(parents=True)
    split_data = {}
    for split, members in (("train", train_members), ("test", test_members)):
        n = per_member * len(members)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n)
        if split == "train":
            images[0] = marker_image()
        for i, member in enumerate(members):
            part = slice(i * per_member, (i + 1) * per_member)
            blob = cifar_pickle(_batch(images[part], labels[part], label_key, f"{split} batch {i + 1}"))
            (out / member).write_bytes(blob)
        split_data[split] = (images, labels.astype(np.int64))
    classes = tuple(f"{name}_class_{c}" for c in range(num_classes))
    meta = {names_key: [c.encode() for c in classes], b"num_cases_per_batch": per_member, b"num_vis": 3072}
    if name == "cifar100":
        meta[b"coarse_label_names"] = [f"super_{c}".encode() for c in range(20)]
    (out / meta_member).write_bytes(cifar_pickle(meta))
    return CifarFiles(out, classes, split_data["train"], split_data["test"])


@pytest.fixture
def make_cifar(tmp_path: Path) -> Callable[..., CifarFiles]:
    """Factory: make_cifar(name="cifar10", per_member=3, root=None) writes a CIFAR-format folder."""
    def make(name: str = "cifar10", per_member: int = 3, root: Path | None = None, seed: int = 0) -> CifarFiles:
        return write_cifar(root or tmp_path / f"raw-{name}", name, per_member, seed)
    return make


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run `dali-fl ARGS...` in-process and return click's Result."""
    from dali_fl.cli import cli

    def run(*args: object) -> Result:
        return CliRunner().invoke(cli, [str(a) for a in args])
    return run


def error_lines(result: Result) -> list[str]:
    """Lines of a CLI result that carry an error message."""
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.fixture
def assert_user_error() -> Callable[..., str]:
    """Check a CLI result is a clean user error: exit 2, one `error:` line, no traceback; returns it."""
    def check(result: Result, *words: str) -> str:
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output, result.output
        lines = error_lines(result)
        assert len(lines) == 1, result.output
        assert result.output.rstrip("\n").endswith(lines[0]), "the error must be the last, single line"
        for word in words:
            assert word.lower() in lines[0].lower(), (word, lines[0])
        return lines[0]
    return check
