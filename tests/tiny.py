"""The tiny federation the tests train: a one-block ViT on a 16 px synthetic store, seconds on a CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dali_fl.config import TrainConfig
from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import write_store

TINY: dict[str, Any] = dict(model="vit_tiny_patch16_224", model_kwargs="patch_size=4,depth=1,embed_dim=32,num_heads=2",
                            pretrained=False, num_users=4, frac=0.5, partition="iid", device="cpu", loader="memmap",
                            num_workers=0)


def tiny_store(root: Path, num_train: int = 200, num_test: int = 50) -> Path:
    """A seeded synthetic store at 16 px."""
    path, _ = write_store(load_synthetic(num_train, num_test, seed=0), root, 16, progress=False)
    return path


def _tiny(options: dict[str, Any]) -> dict[str, Any]:
    """TINY with `options` on top; without its num_workers when another loader, which refuses it, is chosen."""
    memmap = options.get("loader", "memmap") == "memmap"
    return {**{k: v for k, v in TINY.items() if memmap or k != "num_workers"}, **options}


def tiny_config(store: Path, **options: Any) -> TrainConfig:
    """The tiny run's config, with `options` (flat names) on top; no augmentation, so tests compare exactly."""
    return TrainConfig.from_options(_tiny({"augment": False, "store": store, **options}))


def loader_args(kind: str) -> list[str]:
    """`--loader KIND`, with no DataLoader worker processes where the kind has them (memmap)."""
    return ["--loader", kind, *(["--num-workers", "0"] if kind == "memmap" else [])]


def tiny_args(**options: Any) -> list[str]:
    """The tiny run as `dali-fl train` flags, with `options` on top (True/False: a flag or its --no- form)."""
    words = ["--quiet"]
    for key, value in _tiny(options).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return words


def kill_at_client(monkeypatch, n: int) -> None:
    """Make the n-th client trained from now on die as a kill would (KeyboardInterrupt), mid-round."""
    import dali_fl.engine.federation as fed

    real, calls = fed.local_train, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fed, "local_train", dying)
