"""A run's lifecycle: build the federation, start or resume its directory, loop, summarize."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from dali_fl import algorithms
from dali_fl.atomic import atomic_write_text
from dali_fl.config import TrainConfig
from dali_fl.data.partition import Partition, load_partition, make_partition, save_partition
from dali_fl.engine.device import amp_dtype, explain_oom, resolve_device
from dali_fl.engine.federation import RESTART_HINT, Federation, RoundHooks, run_round
from dali_fl.engine.rundir import (
    LOCK,
    STARTING,
    MetricsLog,
    RunLock,
    algorithm_files,
    check_fresh,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from dali_fl.engine.trust import check_resume, record_identity, settings_sha256
from dali_fl.errors import DaliFlError
from dali_fl.loaders import input_size, loader_class, make_loader
from dali_fl.loaders.normalize import from_model
from dali_fl.model.build import build_model, expected_image_size, load_state_, trainable_state

log = logging.getLogger(__name__)


def build_federation(cfg: TrainConfig, run_dir: Path, saved_partition: Optional[Path] = None) -> Federation:
    """Open the store, partition it (or load and check the saved partition), build model and loaders."""
    device = resolve_device(None, cfg.data.device)
    if cfg.data.data_on_gpu and device.type != "cuda":
        raise DaliFlError("--data-on-gpu needs a CUDA device (--gpu N)")
    kind = loader_class(cfg.data.loader)
    store = kind.open_store(cfg.data.store)
    size = _input_size(cfg, store)
    model = build_model(cfg.model, store.num_classes, size, cfg.fed.seed).to(device)
    _check_patches(model, size)
    if cfg.data.compile:
        model.compile()  # in place, once per run: every client reuses the compiled graphs
    partition = _partition(cfg, store, saved_partition)
    amp = amp_dtype(cfg.data.amp, device)
    common = dict(device=device, norm=from_model(model), data_on_gpu=cfg.data.data_on_gpu,
                  out_dtype=torch.float16 if amp == torch.float16 else torch.float32,
                  workers=kind.workers_for(cfg.data.num_workers), image_size=size)
    train_loader = make_loader(cfg.data.loader, store, "train", batch_size=cfg.local.local_bs,
                               augment=cfg.data.augment, **common)
    eval_loader = make_loader(cfg.data.loader, store, "test", batch_size=cfg.data.eval_bs, augment=False, **common)
    return Federation(cfg, run_dir, store, device, model, partition, train_loader, eval_loader,
                      len(store.labels("test")), amp, loader_args=common)


def _input_size(cfg: TrainConfig, store) -> int:
    """The model's input side: --resize-to when set (checked against pretrained weights here), else the store's."""
    size = input_size(store, cfg.data.resize_to)
    want = expected_image_size(cfg.model) if cfg.data.resize_to is not None else None
    if want is not None and want != size:
        raise DaliFlError(f"--resize-to {size} but pretrained {cfg.model.name} expects {want}px; pass --resize-to "
                          f"{want} (or train with --no-pretrained)")
    return size


def _check_patches(model: torch.nn.Module, size: int) -> None:
    """Refuse images smaller than one patch: timm builds such a ViT, which then fails on its first batch."""
    for m in model.modules():
        grid, patch = getattr(m, "grid_size", None), getattr(m, "patch_size", None)
        if grid is not None and patch is not None and min(grid) < 1:
            raise DaliFlError(f"{size}px images are smaller than the model's {tuple(patch)} patch; pass a larger "
                              "--resize-to (or prep a larger store, or a smaller patch_size)")


def _partition(cfg: TrainConfig, store, saved: Optional[Path]) -> Partition:
    """The run's partition: made from the seed alone (so every process makes the same one) or loaded."""
    fed, labels = cfg.fed, store.labels("train")
    if saved is None:
        return make_partition(labels, fed.num_users, fed.partition, seed=fed.seed, alpha=fed.alpha,
                              shards_per_client=fed.shards, min_size=fed.min_size, num_classes=store.num_classes)
    partition = load_partition(saved, num_samples=len(labels))
    if partition.num_clients != fed.num_users:
        raise DaliFlError(f"partition file {saved} holds {partition.num_clients} clients but the run has "
                          f"{fed.num_users}; it was not written by this run")
    return partition


def checkpoint_tensors(fx: Federation) -> tuple[dict, dict]:
    """(global trainable state with the server optimizer's moments, base weights an aggregation changed) as now."""
    params = dict(fx.model.named_parameters())
    base = {p.base: params[p.base] for p in fx.pairs} if fx.uses_products else {}
    return {**trainable_state(fx.model), **fx.server_state()}, base


def check_finite(tensors: dict[str, torch.Tensor], round_: int) -> None:
    """Refuse to save a round whose aggregated weights hold NaN or inf."""
    bad = next((name for name, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise DaliFlError(f"round {round_} left non-finite weights (NaN/inf in {bad}), so it was not saved; "
                          f"{RESTART_HINT}")


def resume_state(fx: Federation, run_dir: Path) -> int:
    """Load the last finished round's tensors (and the server optimizer's) into the model; returns the next round."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        return 1
    round_, saved, base = ckpt
    state = {k: v for k, v in saved.items() if "::" not in k}  # the model's own tensors carry no prefix
    missing = sorted(set(trainable_state(fx.model)) - set(state))
    if missing:
        raise DaliFlError(f"{run_dir / 'checkpoint'} lacks {missing[0]}; it does not belong to this run")
    load_state_(fx.model, {**state, **base})
    for a in fx.algs:
        a.load_state_tensors(saved, round_)  # each takes the tensors under its own prefix
    fx.timeline.load_state_tensors(saved, round_)  # the simulated clock: model versions clients in flight need
    return round_ + 1


def prepare(cfg: TrainConfig, run_dir: Path, resume: bool, write: bool = True) -> tuple[Federation, int]:
    """Build the run's objects; a new run writes partition then config, a resumed one reloads them."""
    if write and not resume:
        check_fresh(run_dir)
        for leftover in algorithm_files(pending=True):
            (run_dir / leftover).unlink(missing_ok=True)  # left by a run that never finished starting
    if resume:
        check_resume(cfg, run_dir)  # every run file checked before anything is built or written
    fx = build_federation(cfg, run_dir, run_dir / "partition.json" if resume else None)
    try:
        start = resume_state(fx, run_dir) if resume else 1
        if start > cfg.fed.rounds + 1:
            raise DaliFlError(f"{run_dir} already finished round {start - 1}; --rounds {cfg.fed.rounds} would go "
                              f"back; give --rounds {start - 1} or more")
        if write:
            if not resume:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_partition(fx.partition, fx.store.labels("train"), run_dir / "partition.json")
                if fx.ranks is not None:  # derived from the seed, written for the reader
                    atomic_write_text(run_dir / "client_ranks.json", json.dumps(fx.ranks.tolist()))
            record_identity(cfg, run_dir, fresh=not resume)  # what a resume checks the partition and store by
            # Written last: a directory with config.json is a run that --resume can continue.
            atomic_write_text(run_dir / "config.json", cfg.to_json())
    except BaseException:
        fx.close()
        raise
    return fx, start


def train(cfg: TrainConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
          hooks: Optional[RoundHooks] = None) -> dict:
    """Run (or continue) a federation to `cfg.fed.rounds` rounds, holding the run directory; returns the summary."""
    hooks = hooks or RoundHooks()
    if type(hooks) is not RoundHooks:
        algorithms.refuse_one_process(cfg, "several processes cannot share it", "run without --nproc")
    run_dir = Path(run_dir)
    created = first_missing(run_dir) if hooks.is_writer and not resume else None
    with RunLock(run_dir) if hooks.is_writer else contextlib.nullcontext():
        try:
            fx, start = prepare(cfg, run_dir, resume, write=hooks.is_writer)
        except BaseException:
            if hooks.is_writer and not resume and not (run_dir / "config.json").exists():
                remove_start(run_dir, created)  # nothing of this run exists yet: leave nothing of it
            raise
        return run_rounds(cfg, fx, run_dir, start, progress and hooks.is_writer, hooks)


def first_missing(run_dir: Path) -> Optional[Path]:
    """The outermost directory of `run_dir` that does not exist yet (the run makes it), or None."""
    missing = None
    for d in (run_dir, *run_dir.absolute().parents):
        if d.exists() or d.is_symlink():
            return missing
        missing = d
    return missing


def remove_start(run_dir: Path, created: Optional[Path]) -> None:
    """Remove what a run that never wrote its config.json left: the directories it made, or (in the user's) its
    files."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for name in (*STARTING, *algorithm_files(pending=True)):
        if name != LOCK:  # held until the lock is released; a new run takes it
            with contextlib.suppress(OSError):  # e.g. a directory of that name: the error raised first matters
                (run_dir / name).unlink(missing_ok=True)


def run_rounds(cfg: TrainConfig, fx: Federation, run_dir: Path, start: int, progress: bool, hooks: RoundHooks,
               play: Optional[Callable[[Federation, int], dict]] = None) -> dict:
    """Rounds `start`..`cfg.fed.rounds`: train, evaluate, log and checkpoint each; then the summary.

    `play(fx, round)` replaces dali-fl's own round (the Flower server plays it over the network).
    """
    metrics = MetricsLog(run_dir, start) if hooks.is_writer else None
    if metrics is not None and start <= cfg.fed.rounds:  # until the last round, the run is not finished
        (run_dir / "summary.json").unlink(missing_ok=True)
    bar = tqdm(range(start, cfg.fed.rounds + 1), desc="rounds", unit="round", disable=not progress)
    final, settings = None, settings_sha256(cfg)  # the checkpoint says which run wrote it
    try:
        with explain_oom(fx.device):
            final = evaluate_stop(cfg, fx, run_dir, start, hooks)
            for r in bar:
                row = play(fx, r) if play else run_round(fx, r, progress, hooks)
                if r % cfg.data.eval_every == 0 or r == cfg.fed.rounds:
                    t0 = time.perf_counter()
                    row["test_acc"], row["test_loss"] = hooks.evaluate(fx)
                    for a in fx.algs:
                        row.update(a.evaluate())
                    row["eval_s"] = time.perf_counter() - t0
                    bar.set_postfix(acc=f"{row['test_acc']:.3f}")
                state, base = checkpoint_tensors(fx)
                check_finite({**state, **base}, r)
                if metrics is not None:
                    metrics.log(row)
                    save_checkpoint(run_dir, r, state, base, seed=cfg.fed.seed, settings_sha256=settings)
                    for a in fx.algs:
                        a.commit()  # after the checkpoint that holds the round's rows
                log.info("round %d: %s", r, row)
    finally:
        fx.close()
        if metrics is not None:
            metrics.close()
    return write_summary(run_dir, metrics.rows, algorithms.summary_keys(cfg), final) if metrics is not None else {}


def evaluate_stop(cfg: TrainConfig, fx: Federation, run_dir: Path, start: int, hooks: RoundHooks) -> Optional[float]:
    """The final model's test accuracy when a resume's --rounds is the rounds done and the last was not evaluated
    (--eval-every): the summary would call an earlier round's accuracy final. That round's row stays as logged."""
    if start <= cfg.fed.rounds or start == 1:
        return None
    rows = read_metrics(run_dir)  # every process reads it, so that all of them evaluate, or none
    if not rows or rows[-1].get("test_acc") is not None:
        return None
    acc, _ = hooks.evaluate(fx)
    log.info("round %d was not evaluated when it ran; the final model's test accuracy is %.4f", rows[-1]["round"],
             acc)
    return acc


def write_summary(run_dir: Path, rows: list[dict], keys: tuple[str, ...] = (), final: Optional[float] = None) -> dict:
    """summary.json: final and best accuracy, rounds done, total time, and the last row's `keys`; `final` is the
    last round's accuracy where its row has none."""
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None] + ([final] if final is not None else [])
    summary = {"final_test_acc": accs[-1] if accs else None, "best_test_acc": max(accs) if accs else None,
               "rounds": rows[-1]["round"] if rows else 0,
               "total_time_s": sum(r["round_time_s"] + r.get("eval_s", 0.0) for r in rows)}
    summary.update({k: rows[-1][k] for k in keys if rows and k in rows[-1]})  # e.g. ε after the last round
    # Clients without samples may arrive, but they train nothing: a round counts by its samples.
    empty = sum(1 for r in rows if r.get("clients_sampled") and not r.get("num_samples"))
    if rows and empty == len(rows):  # a finished run that never trained reads like a bad model otherwise
        log.warning("no round trained on any sample: the simulated clock dropped (--deadline, --over-select) or "
                    "found offline (--trace) every sampled client with samples, so only DP's noise, if any, moved "
                    "the model the run started with")
    elif empty:
        log.info("%d of %d rounds trained on no sample (clients dropped, offline or empty)", empty, len(rows))
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary
