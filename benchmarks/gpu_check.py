"""The GPU check: environment, seed-configuration rounds, the 12 GB verdict, GPU tests, loader detail, compile.

    make gpu-check                                          # a GPU machine: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --quick --out runs/chk   # every step tiny, on the CPU when there is no GPU
    python -m benchmarks.gpu_check --part rounds --budget-s 270 --report-dir $OUT   # one call of a lent GPU

Writes the loader and round results, `gpu-tests.txt` and `summary.md` to --out (default
benchmarks/results/<gpu>-<date>/); a --part or --steps run names its pages `summary-<part>.md`, so the
calls of one check do not overwrite each other. `make test` runs --quick, so the harness works before a GPU
arrives. A GPU is lent for minutes at a time: a step that fails is recorded (its traceback in `errors.txt`,
its name in the summary) and the check goes on; with --budget-s a step is cut at the deadline and the pages
are still written; --report-dir gets summary.md, errors.txt and results.tgz after every step. The exit
status is 124 if the time ran out, else 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

# Run as a file (`python benchmarks/X.py`, from any directory), Python puts benchmarks/ first on sys.path, not the
# repository: put the repository first, so that `benchmarks` is this package whatever else is installed by that name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_loader, bench_round
from benchmarks.check_steps import Steps, TimeUp, write_pages
from benchmarks.check_summary import SEED_GPU_GIB, summary
from benchmarks.measure import ROOT, machine_info
from benchmarks.report import results_dir

log = logging.getLogger("gpu_check")
TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2"]
# The seed's configuration at ViT-B/16 224 px with random init; one local epoch and two rounds fit the budget.
SEED_ROUND = ["--model", "vit_base_patch16_224", "--model-kwargs", "", "--image-size", "224", "--num-train", "5000",
              "--num-users", "10", "--frac", "1", "--local-ep", "1", "--local-bs", "32", "--rounds", "2"]
# In the order they run: the stores, then the headline figures, then the detail.
STEPS = ("stores", "memmap", "round", "memory", "tests", "loader", "compile")
# One lent-GPU call each (benchmarks/README.md): the stores and the DataLoader rounds while DALI's parts still
# travel (neither needs DALI), the seed's DALI rounds and the 12 GB verdict, then the detail.
PARTS = {"stores": ("stores",), "memmap": ("memmap",), "rounds": ("round", "memory"),
         "detail": ("tests", "loader", "compile")}
NO_DALI = {"stores", "memmap"}  # the kinds of step that run before DALI has arrived
TESTS_MAX_S = 240.0  # the GPU test step never gets more, whatever the budget (setup.cfg allows 600 s a test)
TESTS_SHARE = 0.4  # of the budget left when the step starts; the loader detail and compile follow it


def environment(quick: bool, need_dali: bool = True) -> dict:
    """GPU, driver, torch, CUDA, DALI, timm, peft; a full check without CUDA or DALI stops with one line."""
    import peft
    import timm
    import torch

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "timm": timm.__version__,
           "peft": peft.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=_driver())
    lacking = None if quick else missing(env, need_dali)
    if lacking:
        sys.exit(f"error: the GPU check needs {lacking}; install it or run with --quick")
    return env


def missing(env: dict, need_dali: bool = True) -> Optional[str]:
    """What a full check lacks here, or None: CUDA always, DALI for every step but the stores."""
    if not env["cuda_available"]:
        return "CUDA"
    return "DALI (nvidia-dali-cuda120)" if need_dali and not env["dali"] else None


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # NVML is optional: the figures do not depend on it
        return None


def tests_limits(left_s: Optional[float]) -> tuple[float, int]:
    """(seconds for the whole GPU test step, seconds per test) from the budget left when the step starts."""
    step = TESTS_MAX_S if left_s is None else min(TESTS_MAX_S, max(30.0, TESTS_SHARE * left_s))
    return step, int(min(step, max(20.0, step / 4)))


def gpu_tests(out: Path, left_s: Optional[float] = None) -> dict:
    """`pytest -m gpu` under a hard limit per test and for the step; its output, as it comes, in gpu-tests.txt."""
    limit_s, per_test = tests_limits(left_s)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider",
           "--timeout", str(per_test), "--durations", "10"]
    path = out / "gpu-tests.txt"
    with open(path, "w") as f:
        f.write(f"# pytest {' '.join(cmd[3:])}   (the whole step stopped at {limit_s:.0f} s)\n")
        f.flush()
        # Its own session: on the limit the whole group goes, a DataLoader worker or DALI process included.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: Optional[int] = proc.wait(timeout=limit_s)
        except (subprocess.TimeoutExpired, TimeUp) as err:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(err, TimeUp):
                raise
            returncode = None
    lines = path.read_text().strip().splitlines()
    last = lines[-1].strip("= ") if lines else ""
    if returncode is None:
        return {"returncode": 124, "summary": f"killed at the step's limit of {limit_s:.0f} s (last line: {last})",
                "limit_s": limit_s, "per_test_s": per_test}
    return {"returncode": returncode, "summary": last, "limit_s": limit_s, "per_test_s": per_test}


def loader_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_loader runs: every kind on the device, then the DALI kinds with the split in GPU memory."""
    size = ["--image-size", "32", "--num-images", "200", "--clients", "2", "--samples-per-client", "50",
            "--local-ep", "1", "--repeats", "1"] if quick else []
    runs = [[*size, "--device", device, "--kinds", "dali,memmap,memmap-seed,dali-resize,memmap-resize"]]
    if device == "cuda":  # written as loader-…-data-on-gpu: the host-fed run above keeps its own files
        runs.append([*size, "--device", device, "--kinds", "dali,dali-resize", "--data-on-gpu"])
    return [[*r, "--out", str(out), "--data-dir", str(data / "loader")] for r in runs]


def round_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_round at the seed's configuration (FedLoRA and FedAvg), capped at 12 GiB, compiled; tiny with --quick."""
    gpu = device.startswith("cuda")
    kinds = "dali,dali-gpu" if gpu else "dali"
    # memmap with 4 and 8 workers: the DataLoader's best on a 16-core GPU machine lies between them.
    host_kinds = "memmap@4,memmap@8,memmap-seed" if gpu else "memmap"
    # FedLoRA also from the native 32 px store, resized on the device (with the split resident on a GPU).
    resized = "dali-gpu-resize" if gpu else "dali-resize"
    shape = (["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5", "--rounds", "1",
              *TINY_MODEL, "--in-process", "--no-plot"] if quick else SEED_ROUND)
    algs = ("fedlora", "fedavg")
    # The DataLoader kinds, which need no DALI, in runs of their own (round-…-memmap.*): a lent GPU measures them
    # while DALI's parts still travel.
    runs = [[*shape, "--alg", alg, "--kinds", host_kinds, "--label", "memmap", "--device", device] for alg in algs]
    runs += [[*shape, "--alg", alg, "--kinds", kinds + ("," + resized if alg == "fedlora" else ""), "--device", device]
             for alg in algs]
    # The 12 GB verdict, measured: both algorithms with the native split resident, torch capped at the seed's
    # card (one round: it is the memory that is asked about). Ignored on the CPU, where it only runs the path.
    runs += [[*shape, "--alg", alg, "--kinds", resized, "--device", device, "--rounds", "1",
              "--gpu-mem-gib", str(SEED_GPU_GIB)] for alg in algs]
    # torch.compile against eager in the same check: FedLoRA through dali, compiled (round-…-compile.*).
    runs.append([*shape, "--alg", "fedlora", "--kinds", "dali", "--device", device, "--compile"])
    return [[*r, "--out", str(out), "--data-dir", str(data / "round")] for r in runs]


def make_stores(runs: tuple[list[list[str]], list[list[str]]]) -> int:
    """Write (or reuse) every store the (loader, round) benchmark runs read; returns how many. Needs no DALI."""
    from benchmarks.round_settings import settings_from_args as round_settings

    loader_runs, round_runs = runs
    stores = set()
    for argv in loader_runs:
        p = bench_loader.build_parser()
        stores.update(bench_loader.prepare_stores(bench_loader.settings_from_args(p.parse_args(argv), p)).values())
    for argv in round_runs:
        p = bench_round.build_parser()
        s = round_settings(p.parse_args(argv), p)
        stores.update(bench_round.prepare_stores(s, bench_round.store_sizes(s)).values())
    log.info("gpu-check: %d stores ready", len(stores))
    return len(stores)


def round_kind(argv: list[str]) -> tuple[str, str]:
    """(kind of step, name) of one bench_round run."""
    alg = f"bench_round {argv[argv.index('--alg') + 1]}"
    if "--compile" in argv:
        return "compile", alg + " --compile"
    if "--gpu-mem-gib" in argv:
        return "memory", f"{alg} --gpu-mem-gib {argv[argv.index('--gpu-mem-gib') + 1]}"
    if "--label" in argv:
        return "memmap", f"{alg} --kinds {argv[argv.index('--kinds') + 1]}"
    return "round", alg


def plan(out: Path, data: Path, device: str, quick: bool, wanted: set[str]) -> list[tuple[str, str, Callable, Any]]:
    """The check's steps as (kind, name, function, argument), in STEPS order, keeping the kinds asked for."""
    loaders = loader_args(out, data, device, quick)
    rounds = round_args(out, data, "cuda:0" if device == "cuda" else "cpu", quick)
    steps = [("stores", "stores", make_stores, (loaders, rounds)),
             ("tests", "pytest -m gpu", gpu_tests, out)]
    steps += [("loader", "bench_loader " + " ".join(r[r.index("--kinds"):r.index("--out")]), bench_loader.main, r)
              for r in loaders]
    steps += [(*round_kind(r), bench_round.main, r) for r in rounds]
    # The headline figures (the rounds) before the tests, the loader detail and torch.compile: if the lent
    # GPU's minutes run out, what is lost is the least of it. sorted() is stable: each kind keeps its order.
    # The stores come first: made in a call of their own, they spare the rounds' call the minute they take.
    return sorted((s for s in steps if s[0] in wanted), key=lambda s: STEPS.index(s[0]))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every step tiny, on the CPU when there is no GPU")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<gpu>-<date>/)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "gpu-check", help="where the stores are made")
    p.add_argument("--part", choices=sorted(PARTS),
                   help="one lent-GPU call's share: " + "; ".join(f"{k} = {','.join(v)}" for k, v in PARTS.items()))
    p.add_argument("--steps", help=f"comma-separated kinds of step to run, of {','.join(STEPS)} (default: all)")
    p.add_argument("--budget-s", type=float, help="seconds this check may take from its process's start: a step "
                   "that would start with less than 20 s left is not run, the one running at the deadline is cut, "
                   "and the pages are written")
    p.add_argument("--report-dir", type=Path,
                   help="also keep summary.md, errors.txt and results.tgz here after every step (a lent GPU's $OUT)")
    return p


def chosen_steps(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[set[str], str]:
    """The kinds of step to run and the label of this run's pages ('' for the whole check, '-<part>' for a part)."""
    if args.steps and args.part:
        p.error("--steps and --part: give one of them")
    if args.part:
        return set(PARTS[args.part]), f"-{args.part}"
    wanted = set((args.steps or ",".join(STEPS)).split(","))
    if not wanted <= set(STEPS):
        p.error(f"--steps {args.steps}: choose from {','.join(STEPS)}")
    return wanted, "" if wanted == set(STEPS) else "-" + "-".join(k for k in STEPS if k in wanted)


def process_start() -> float:
    """When this process started (epoch seconds): from the command line, --budget-s counts imports and CUDA too."""
    import psutil

    return psutil.Process().create_time()


def run_plan(steps: Steps, env: dict, todo: list, report_dir: Optional[Path]) -> None:
    """Every step in turn; after each, the summary and the error log are written again."""
    tests, rounds = None, []
    for kind, name, fn, arg in todo:
        args = (arg, steps.left()) if kind == "tests" else (arg,)  # the test step's limits follow the budget
        result = steps.run(name, fn, *args)
        if kind == "tests":
            tests = result
            if tests and tests["returncode"] != 0:
                steps.mark_failed(tests["summary"])
        elif kind in ("memmap", "round", "memory", "compile"):
            rounds.append(result)
        # After every step: a check cut short still leaves a summary of what ran, where it comes back.
        write_pages(steps, summary(env, tests, rounds, steps), report_dir)


def main(argv: Optional[list[str]] = None, started: Optional[float] = None) -> Path:
    """Run the steps asked for; returns the folder written (exits 124 out of time, 1 if a step failed).

    --budget-s counts from `started` (epoch seconds; default: now).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    wanted, label = chosen_steps(args, p)
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s {args.budget_s:g}: no time left to run anything")
    env = environment(args.quick, need_dali=not wanted <= NO_DALI)
    device = "cuda" if env["cuda_available"] else "cpu"
    out = args.out or results_dir(machine_info(device))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"environment{label}.json").write_text(json.dumps(env, indent=2))
    spent = time.time() - (started if started is not None else time.time())
    steps = Steps(out, label, None if args.budget_s is None else args.budget_s - spent)
    steps.arm()
    try:
        run_plan(steps, env, plan(out, args.data_dir, device, args.quick, wanted), args.report_dir)
    finally:
        steps.disarm()
    page = out / f"summary{label}.md"
    print(f"wrote {page}")
    if steps.timed_out:
        limit = "SIGTERM" if args.budget_s is None else f"the time budget of {args.budget_s:g} s"
        print(f"error: out of time ({limit}): steps cut or not run; see {page}", file=sys.stderr)
        sys.exit(124)
    if steps.failures:
        sys.exit(f"error: {steps.failures} step(s) failed; see {page} (tracebacks in errors{label}.txt)")
    return out


if __name__ == "__main__":
    main(started=process_start())
