"""One atomic-write policy for stores and checkpoints: crashes between renames, full disks, leftovers."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_fl.atomic import recover_dir, replace_dir, what_to_do
from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import open_store, write_store
from dali_fl.engine.rundir import load_checkpoint, save_checkpoint
from dali_fl.errors import DaliFlError


def _die_on_rename_into(monkeypatch, final: Path) -> None:
    """Make the rename that publishes `final` fail as a kill would: after the old copy moved away."""
    real = Path.rename

    def rename(self, target):
        if Path(target) == final and ".tmp-" in self.name:
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_replace_dir_swaps_whole_directories(tmp_path):
    final = tmp_path / "d"
    for content in ("old", "new"):
        tmp = tmp_path / f".d.tmp-{content}"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        replace_dir(tmp, final)
    assert (final / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_forced_prep_killed_between_its_renames_recovers_the_old_store(tmp_path, monkeypatch):
    source = load_synthetic(20, 10, seed=0)
    path, _ = write_store(source, tmp_path, 8, progress=False)
    before = np.array(open_store(path).images("train"))
    _die_on_rename_into(monkeypatch, path)
    with pytest.raises(KeyboardInterrupt):
        write_store(source, tmp_path, 8, force=True, progress=False)
    monkeypatch.undo()
    assert not path.exists() and any(".old-" in p.name for p in tmp_path.iterdir())
    # The next prep finds the complete copy instead of rebuilding from scratch, and cleans up.
    again, written = write_store(source, tmp_path, 8, progress=False)
    assert again == path and not written
    assert np.array_equal(open_store(path).images("train"), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_opening_a_store_also_recovers_it(tmp_path, monkeypatch):
    path, _ = write_store(load_synthetic(20, 10, seed=0), tmp_path, 8, progress=False)
    _die_on_rename_into(monkeypatch, path)
    with pytest.raises(KeyboardInterrupt):
        write_store(load_synthetic(20, 10, seed=0), tmp_path, 8, force=True, progress=False)
    monkeypatch.undo()
    assert open_store(path).image_size == 8


def test_leftover_old_copies_are_removed_but_debris_is_never_restored(tmp_path):
    final = tmp_path / "store"
    debris = tmp_path / ".store.old-999999999"  # a dead writer's half-deleted copy: no manifest
    debris.mkdir()
    assert recover_dir(final, lambda p: (p / "manifest.json").exists()) is False
    assert not final.exists() and not debris.exists()


def test_a_copy_whose_writer_id_was_reused_is_restored_but_a_live_writers_is_left(tmp_path):
    # A pid alone named the writer: after a container restart another process holds the crashed writer's small pid,
    # and the whole old copy was taken for one still being written: the store stayed missing.
    other = os.getppid()  # a live process that is not this one
    final = tmp_path / "store"
    reused = tmp_path / f".store.old-{other}.1"  # that pid, but a start time it does not have
    (reused / "manifest.json").parent.mkdir()
    (reused / "manifest.json").write_text("{}")
    live = tmp_path / f".store.tmp-{other}.{Path(f'/proc/{other}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
    live.mkdir()
    assert recover_dir(final, lambda p: (p / "manifest.json").exists()) is True
    assert (final / "manifest.json").exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["store", live.name])


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_a_checkpoint_killed_between_its_renames_keeps_the_last_round(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, _state(1.0), {}, seed=0, settings_sha256="0" * 64)
    _die_on_rename_into(monkeypatch, tmp_path / "checkpoint")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, _state(2.0), {}, seed=0, settings_sha256="0" * 64)
    monkeypatch.undo()
    round_, state, _ = load_checkpoint(tmp_path)
    assert round_ == 1 and torch.equal(state["w"], _state(1.0)["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("failure", ["enospc", "safetensors"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure):
    from safetensors import SafetensorError

    save_checkpoint(tmp_path, 1, _state(1.0), {}, seed=0, settings_sha256="0" * 64)

    def full(*args, **kwargs):
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    if failure == "enospc":  # the write of the serialized file
        monkeypatch.setattr(Path, "write_bytes", full)
    else:  # the serialization, which save_checkpoint imports when it runs
        monkeypatch.setattr("safetensors.torch.save", full)
    with pytest.raises(DaliFlError, match="cannot write the checkpoint of round 2") as err:
        save_checkpoint(tmp_path, 2, _state(2.0), {}, seed=0, settings_sha256="0" * 64)
    assert "--resume" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert load_checkpoint(tmp_path)[0] == 1


@pytest.mark.parametrize("code,fix", [(errno.ENOSPC, "free some space or other"),
                                      (errno.EDQUOT, "free some space or other"),
                                      (errno.EACCES, "check that you may write there or other"),
                                      (errno.EROFS, "check that you may write there or other"), (errno.EIO, "other")])
def test_a_failed_write_names_the_fix_its_cause_calls_for(code, fix):
    assert what_to_do(OSError(code, os.strerror(code)), other="other") == fix
