"""`dali-fl train`: run a FedAvg or FedLoRA federation (the seed's flag spellings work too)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import click

from dali_fl import algorithms
from dali_fl.cli import NamedPath, explicit_options
from dali_fl.config import (
    ALGORITHMS,
    AMP_MODES,
    OPTIMIZERS,
    PARTITION_METHODS,
    PRESETS,
    TrainConfig,
    load_config,
    merge_options,
    option_defaults,
)
from dali_fl.data.sources import SOURCES
from dali_fl.data.store import open_store, store_name
from dali_fl.engine.clock import ClockConfig
from dali_fl.engine.device import resolve_device
from dali_fl.errors import DaliFlError
from dali_fl.loaders import LOADER_KINDS

DATASET_ALIASES = {"cifar": "cifar10"}
RESUMABLE = {"rounds", "gpu", "device", "quiet", "resume", "verbose", "nproc"}
o = click.option


def _either(names: list[str]) -> str:
    """"a, b or c" (one name: itself)."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def declared_options(fields: list) -> list:
    """Click options made from `option(...)` dataclass fields (a trailing _ is dropped: async_ is --async)."""
    opts = []
    for f in fields:
        name = f.name
        flag, meta = "--" + name.rstrip("_").replace("_", "-"), f.metadata
        kw = dict(default=f.default, show_default=f.default != "", help=meta["help"])  # no `[default: ""]`
        if isinstance(f.default, bool):
            opts.append(o(f"{flag}/--no-{flag[2:]}", name, **kw))
        elif isinstance(f.default, tuple):
            opts.append(o(flag, name, type=type(f.default[0]), nargs=len(f.default), **kw))
        elif meta["choices"]:
            opts.append(o(flag, name, type=click.Choice(meta["choices"]), **kw))
        else:
            opts.append(o(flag, name, type=meta.get("type") or type(f.default), **kw))
    return opts


def algorithm_options() -> list:
    """Click options made from every algorithm's Params fields: the declarations in dali_fl/algorithms/."""
    return declared_options([f for _, f in algorithms.option_fields().values()])


def train_options(f):
    """All train options; defaults come from the config dataclasses, the seed's underscore spellings are aliases."""
    d = option_defaults()
    opts = [
        o("--store", type=NamedPath(path_type=Path),
          help="Store made by `dali-fl prep` (or use --dataset); config.json keeps its absolute path."),
        o("--dataset", help="Seed style: find the store prep made for this source (cifar = cifar10) in --data-dir."),
        o("--image-size", "--image_size", type=int, help="With --dataset: which store; with --store: a check."),
        o("--data-dir", type=click.Path(path_type=Path), default=Path("data"), show_default=True,
          help="Where --dataset looks for stores."),
        o("--use-offline-data", "--use_offline_data", is_flag=True, help="Accepted for the seed's scripts; no effect."),
        o("--alg", type=click.Choice(ALGORITHMS), default=d["alg"], show_default=True,
          help="fedavg: all weights trained and averaged; fedlora: LoRA adapters + head only."),
        o("--out", type=NamedPath(path_type=Path),
          help="Run directory (default runs/<what ran>-<time>, e.g. runs/fedlora-fedex-fedadam-20261202-101500)."),
        o("--rounds", "--epochs", type=int, default=d["rounds"], show_default=True,
          help="Federated rounds (seed: --epochs)."),
        o("--num-users", "--num_users", type=int, default=d["num_users"], show_default=True, help="Simulated clients."),
        o("--frac", type=float, default=d["frac"], show_default=True,
          help="Fraction of clients sampled each round; never fewer than one client."),
        o("--partition", type=click.Choice(PARTITION_METHODS), default=d["partition"], show_default=True,
          help="How the train split is divided among clients."),
        o("--alpha", type=float, default=d["alpha"], show_default=True,
          help="Dirichlet concentration (smaller = more skew)."),
        o("--min-size", type=int, default=d["min_size"], show_default=True,
          help="Dirichlet: fewest samples per client."),
        o("--shards", type=int, default=d["shards"], show_default=True, help="Shards per client (--partition shards)."),
        o("--seed", type=int, default=d["seed"], show_default=True, help="Seeds partition, sampling, init and order."),
        o("--local-ep", "--local_ep", type=int, default=d["local_ep"], show_default=True,
          help="Local epochs per client."),
        o("--local-bs", "--local_bs", type=int, default=d["local_bs"], show_default=True, help="Local batch size."),
        o("--lr", type=float, default=d["lr"], show_default=True, help="Local learning rate."),
        o("--optimizer", type=click.Choice(OPTIMIZERS), default=d["optimizer"], show_default=True,
          help="Fresh per client each round."),
        o("--momentum", type=float, default=d["momentum"], show_default=True, help="SGD momentum."),
        o("--weight-decay", "--weight_decay", type=float, default=d["weight_decay"], show_default=True,
          help="Weight decay."),
        *algorithm_options(),  # each algorithm declares its own, next to its code
        *declared_options(list(dataclasses.fields(ClockConfig))),  # the simulated clock's (engine/clock.py)
        o("--model", default=d["model"], show_default=True,
          help="timm model name; `vit` means ViT-B/16 (vit_base_patch16_224)."),
        o("--model-variant", "--model_variant", type=click.Choice(["pretrained", "scratch"]),
          help="Seed style: pretrained = --pretrained, scratch = --no-pretrained."),
        o("--model-kwargs", default=d["model_kwargs"],
          help="Extra timm.create_model kwargs, e.g. patch_size=4,depth=4."),
        o("--pretrained/--no-pretrained", default=d["pretrained"], show_default=True,
          help="Start from pretrained weights (hub, HF cache, or --weights)."),
        o("--weights", type=click.Path(path_type=Path), default=d["weights"],
          help="Local .safetensors/.pth/.npz checkpoint."),
        o("--lora-r", type=int, default=d["lora_r"], show_default=True, help="LoRA rank."),
        o("--lora-alpha", type=int, default=d["lora_alpha"], show_default=True, help="LoRA alpha (scale = alpha / r)."),
        o("--lora-targets", default=d["lora_targets"], show_default=True,
          help="Comma-separated module names or regexes to adapt."),
        o("--lora-ranks", default=d["lora_ranks"],
          help="Per-client LoRA ranks: 2,4,8 (cycled over clients) or uniform:2,4,8,16 (drawn from --seed); "
               f"overrides --lora-r. Mixed ranks need --lora-agg {_either(algorithms.mixed_rank_aggregations())}."),
        o("--lora-agg", type=click.Choice(algorithms.lora_agg_choices()), default=d["lora_agg"], show_default=True,
          help=algorithms.lora_agg_help()),
        o("--loader", type=click.Choice(LOADER_KINDS), default=d["loader"], show_default=True,
          help="dali: GPU pipeline (CPU ops without GPU); memmap: DataLoader; memmap-seed: the old pipeline."),
        o("--data-on-gpu", is_flag=True, default=d["data_on_gpu"],
          help="Copy the whole split to GPU memory once (dali, GPU only)."),
        o("--augment/--no-augment", default=d["augment"], show_default=True, help="Random flip + 4-px padded crop."),
        o("--resize-to", type=int, default=d["resize_to"],
          help="Resize each batch to N x N on the training device before crop/flip (dali, memmap); the model "
               "takes N px. Default: the store's size."),
        o("--gpu", type=int, help="Train on cuda:N."),
        o("--device", help="cpu, cuda or cuda:N (default: cuda:0 if present, else cpu)."),
        o("--amp", type=click.Choice(AMP_MODES), default=d["amp"], show_default=True,
          help="Mixed precision; auto = bf16 on GPU, off on CPU."),
        o("--compile/--no-compile", default=d["compile"], show_default=True,
          help="torch.compile the model once per run (the first round pays the compile time)."),
        o("--num-workers", type=int, default=d["num_workers"], show_default=True,
          help="DataLoader worker processes (--loader memmap only; the others refuse it)."),
        o("--eval-every", type=int, default=d["eval_every"], show_default=True,
          help="Evaluate every N rounds (and at the end)."),
        o("--eval-bs", type=int, default=d["eval_bs"], show_default=True, help="Evaluation batch size."),
        o("--preset", type=click.Choice(sorted(PRESETS)), help="Named configuration; explicit flags override it."),
        o("--resume", type=click.Path(path_type=Path), help="Continue RUN_DIR from its last finished round."),
        o("--quiet", is_flag=True, help="No progress bars."),
        o("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
          help="Processes on this machine, one per GPU (gloo on CPU without GPUs); launches torchrun."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


CLI_ONLY = ("store", "dataset", "image_size", "data_dir", "use_offline_data", "out", "gpu", "device", "preset",
            "resume", "quiet", "nproc")


def merged_options(ctx: click.Context, p: dict) -> dict:
    """The run's options: config defaults, then the preset, then the flags given (config.merge_options)."""
    explicit = {k: v for k, v in p.items() if k in explicit_options(ctx)}
    if {"data_dir", "store"} <= set(explicit):  # --data-dir only finds --dataset's store
        raise DaliFlError("--data-dir is where --dataset's store is looked for, and --store names the store; drop "
                          "--data-dir")
    merged = {**p, **merge_options(explicit, p["preset"])}
    if {"model_variant", "pretrained"} <= set(explicit) and (p["model_variant"] == "pretrained") != p["pretrained"]:
        raise DaliFlError(f"--model-variant {p['model_variant']} and --{'' if p['pretrained'] else 'no-'}pretrained "
                          "disagree (the seed's spelling and dali-fl's of one choice); give one of them")
    return merged


def _resolve_store(p: dict) -> str:
    """--store, or the store prep made for --dataset at --image-size in --data-dir."""
    if p["store"] is None and p["dataset"] is None:
        raise DaliFlError("give --store STORE (made by `dali-fl prep`) or --dataset NAME --image-size N")
    if p["store"] is None:
        source = DATASET_ALIASES.get(p["dataset"], p["dataset"])
        size = p["image_size"] or 224
        path = p["data_dir"] / store_name(source, size)
        if not path.exists() and source not in SOURCES:
            raise DaliFlError(f"no {source} store at {size}px in {p['data_dir']}, and prep knows no source "
                              f"{source!r}; --dataset names one of {_either(list(SOURCES))} (a folder of class "
                              "subfolders: prep --source imagefolder, then --dataset imagefolder)")
        if not path.exists():
            path_flag = "" if source == "synthetic" else " --source-path PATH"  # synthetic is generated
            raise DaliFlError(f"no {source} store at {size}px in {p['data_dir']}; make it with `dali-fl prep "
                              f"--source {source}{path_flag} --image-size {size} --out {p['data_dir']}`")
        return str(path.absolute())
    store = open_store(p["store"])
    dataset = DATASET_ALIASES.get(p["dataset"], p["dataset"])
    if dataset is not None and dataset != store.manifest["source"]:  # the store decides: say when they disagree
        raise DaliFlError(f"--dataset {p['dataset']} but {p['store']} holds {store.manifest['source']} images; drop "
                          "--dataset (--store names the data) or give the store of that dataset")
    size = p["image_size"]
    if size is not None and size not in (store.image_size, p["resize_to"]):
        from_preset = p["preset"] is not None and PRESETS[p["preset"]].get("image_size") == size
        asked = f"--preset {p['preset']} trains at {size}px" if from_preset else f"--image-size {size}"
        resize = p["resize_to"]  # a second size the user gave: say which flag trains at that one
        made = f" and --resize-to makes them {resize}px" if resize else ""
        ways = [f"resize them on the device with --resize-to {size}",
                f"use a {size}px store (`dali-fl prep --image-size {size}`)",
                *([f"give --image-size {resize}{f' to train at {resize}px' if from_preset else ''}"] if resize else [])]
        raise DaliFlError(f"{asked} but {p['store']} holds {store.image_size}px images{made}; {_either(ways)}")
    return str(Path(p["store"]).absolute())  # so --resume works from any working directory


def cli_config(p: dict, device: str) -> TrainConfig:
    """The resolved TrainConfig of a new run."""
    flat = {k: v for k, v in p.items() if k not in CLI_ONLY}
    trace = str(Path(p["trace"]).absolute()) if p.get("trace") else ""  # so --resume finds it from anywhere
    weights = str(Path(p["weights"]).absolute()) if p.get("weights") else None  # likewise
    return TrainConfig.from_options({**flat, "store": _resolve_store(p), "device": device, "trace": trace,
                                     "weights": weights})


def _resumed_config(ctx: click.Context, p: dict) -> TrainConfig:
    """The saved config of --resume RUN_DIR, with only rounds and device allowed to change."""
    fixed = sorted(explicit_options(ctx) - RESUMABLE)
    if fixed:
        raise DaliFlError(f"--resume keeps the run's settings; drop --{fixed[0].replace('_', '-')} "
                          "(only --rounds, --gpu/--device, --nproc and --quiet may change)")
    from dali_fl.engine.trust import check_config_file

    check_config_file(p["resume"])  # kind, nesting and field types, before the config is built from it
    cfg = load_config(p["resume"])
    changes: dict = {}
    if "rounds" in explicit_options(ctx):
        changes["fed"] = {"rounds": p["rounds"]}
    if p["gpu"] is not None or p["device"] is not None:
        changes["data"] = {"device": str(resolve_device(p["gpu"], p["device"]))}
    return cfg.replace(**changes)


@click.command()
@train_options
@click.pass_context
def train(ctx: click.Context, **p) -> None:
    """Run a federated FedAvg or FedLoRA simulation on a timm ViT.

    \b
    Examples:
      dali-fl train --store data/cifar10-224 --alg fedlora --gpu 0 --out runs/lora
      dali-fl train --preset fedlora-vit-b16 --store data/cifar10-224 --gpu 2
      dali-fl train --resume runs/lora --rounds 200
    The seed's command works with its first words changed:
      dali-fl train --alg fedlora --model vit --model_variant pretrained --dataset cifar
        --image_size 224 --use_offline_data --epochs 150 --num_users 100 --frac 0.1
        --local_ep 5 --local_bs 32 --lr 0.0003 --gpu 2
    """
    from dali_fl.engine.run import train as run_federation

    if p["nproc"] > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(ctx, merged_options(ctx, p))  # the preset may set --alg, which names the run
    hooks, device = _join_world(p)
    if p["resume"] is not None:
        cfg, run_dir, resume = _resumed_config(ctx, p), p["resume"], True
        if hooks is not None:
            cfg = cfg.replace(data={"device": str(device)})
    else:
        p = merged_options(ctx, p)
        device = device or resolve_device(p["gpu"], p["device"])  # fail fast, before any heavy work
        cfg, resume = cli_config(p, str(device)), False
        run_dir = p["out"] or _default_run_dir(cfg)
        if hooks is not None:
            from dali_fl.engine.distributed import broadcast_str

            run_dir = Path(broadcast_str(str(run_dir)))
    try:
        summary = run_federation(cfg, run_dir, resume=resume, progress=not p["quiet"], hooks=hooks)
    except KeyboardInterrupt:
        raise _interrupted(run_dir) from None
    finally:
        if hooks is not None:
            from dali_fl.engine.distributed import leave_world

            leave_world()
    if hooks is None or hooks.is_writer:
        click.echo(summary_line(summary, run_dir))
    if hooks is not None:
        _end_rank()


def _end_rank() -> NoReturn:
    """End a finished torchrun rank without the interpreter's teardown, where gloo's C++ threads now and then abort
    it ("terminate called without an active exception", with no Python frame left), and torchrun then calls the
    finished run failed. Every file is written and closed by now."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def summary_line(summary: dict, run_dir: object, engine: str = "") -> str:
    """The one line a finished run prints: rounds, final and best accuracy, where it is."""
    def shown(acc: object) -> str:
        return "n/a" if acc is None else f"{acc:.4f}"

    rounds = summary.get("rounds")
    return (f"{rounds} round{'' if rounds == 1 else 's'}{engine}, final test accuracy "
            f"{shown(summary.get('final_test_acc'))}, best {shown(summary.get('best_test_acc'))}: {run_dir}")


def _default_run_dir(cfg: TrainConfig) -> Path:
    """runs/<what ran>-<time> (e.g. fedlora-fedex-fedadam-...), for runs started without --out."""
    return Path("runs") / f"{algorithms.run_label(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def _join_world(p: dict):
    """Under torchrun: join the process group; returns (hooks, this rank's device) or (None, None)."""
    from dali_fl.engine.distributed import hooks_for_world, init_process_group

    hooks = hooks_for_world()
    if hooks is None:
        return None, None
    if p["gpu"] is not None:
        raise DaliFlError("--gpu picks one GPU; with several processes each takes cuda:LOCAL_RANK "
                          "(choose GPUs with CUDA_VISIBLE_DEVICES)")
    return hooks, init_process_group(cpu=p["device"] == "cpu")


def _argv(ctx: click.Context) -> list[str]:
    """The explicit options of this invocation as command-line words (to relaunch under torchrun)."""
    words: list[str] = []
    explicit = explicit_options(ctx)
    for param in ctx.command.params:
        if param.name not in explicit or param.name == "nproc":
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            names = param.opts if value else param.secondary_opts
            words += names[:1]
        elif isinstance(value, tuple):  # nargs=2 (--server-betas)
            words += [param.opts[0], *map(str, value)]
        else:
            words += [param.opts[0], str(value)]
    return words


def _checked_before_launch(ctx: click.Context, p: dict) -> TrainConfig:
    """The config K processes would run, with every refusal said here in one line, before torchrun starts."""
    if p["gpu"] is not None:
        raise DaliFlError("--gpu picks one GPU; with several processes each takes cuda:LOCAL_RANK "
                          "(choose GPUs with CUDA_VISIBLE_DEVICES)")
    _check_nproc(p["nproc"], p["device"])
    # Every rank resolves its own device; the checks do not depend on it.
    cfg = _resumed_config(ctx, p) if p["resume"] is not None else cli_config(p, "cpu")
    algorithms.refuse_one_process(cfg, "several processes cannot share it", "run without --nproc")
    return cfg


def _check_nproc(nproc: int, device: Optional[str]) -> None:
    """One process a GPU (NCCL) or a CPU core (gloo): torchrun started any count, and 10^20 ran out of memory."""
    import torch

    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    have, what = (torch.cuda.device_count(), "GPUs") if cuda else (os.cpu_count() or 1, "CPU cores")
    if nproc > have:
        raise DaliFlError(f"--nproc {nproc} is more than the {have} {what} here; each process takes one, so use at "
                          f"most {have}")


def _launch(ctx: click.Context, p: dict) -> None:
    """`--nproc K`: run the same command as K processes through torchrun, on this machine."""
    cfg = _checked_before_launch(ctx, p)
    args = _argv(ctx)
    run_dir = p["resume"] or p["out"] or _default_run_dir(cfg)
    if p["resume"] is None and p["out"] is None:
        args += ["--out", str(run_dir)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p['nproc']}",
           "-m", "dali_fl", "train", *args]
    rc = _wait_for_torchrun(subprocess.Popen(cmd), run_dir, p["nproc"])
    if rc != 0:
        started = (Path(run_dir) / "config.json").is_file()  # else there is no run to continue
        raise DaliFlError(f"the {p['nproc']}-process run failed (exit {rc}); torchrun's report above names the "
                          "failed rank" + (f"; continue with `dali-fl train --resume {run_dir} --nproc {p['nproc']}`"
                                           if started else ""))


def _interrupted(run_dir: Path, more: str = "") -> KeyboardInterrupt:
    """The interrupt to end with: how to continue once the run exists (config.json written), plain before."""
    if (Path(run_dir) / "config.json").is_file():  # the run started: its last finished round is kept
        return KeyboardInterrupt(f"interrupted; continue with `dali-fl train --resume {run_dir}{more}`")
    return KeyboardInterrupt()


def _wait_for_torchrun(proc: subprocess.Popen, run_dir: Path, nproc: int) -> int:
    """torchrun's exit status; on Ctrl-C, let it stop its ranks (it got the same SIGINT) rather than kill it."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=60)  # a killed torchrun would leave its ranks running
        except (KeyboardInterrupt, subprocess.TimeoutExpired):  # a second Ctrl-C, or a hung shutdown
            proc.kill()
            proc.wait()
        raise _interrupted(run_dir, f" --nproc {nproc}") from None


COMMANDS = [train]
