"""The GPU check in one command: environment, GPU tests, loader and round benchmarks, one summary page.

    make gpu-check                                          # a GPU machine: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --quick --out runs/chk   # every step tiny, on the CPU when there is no GPU

Writes the loader and round results, `gpu-tests.txt` and `summary.md` to --out (default
benchmarks/results/<gpu>-<date>/). `make test` runs --quick, so the harness works before a GPU arrives.
A GPU is lent for minutes at a time, so a step that fails is recorded (its traceback in `errors.txt`,
its name in the summary) and the check goes on to the next; the exit status is 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

# Run as a file (`python benchmarks/X.py`, from any directory), Python puts benchmarks/ first on sys.path, not the
# repository: put the repository first, so that `benchmarks` is this package whatever else is installed by that name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_loader, bench_round
from benchmarks.measure import ROOT, machine_info
from benchmarks.report import fmt, results_dir, table

TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2"]
# The seed's configuration at ViT-B/16 224 px with random init; one local epoch and two rounds fit the budget.
SEED_ROUND = ["--model", "vit_base_patch16_224", "--model-kwargs", "", "--image-size", "224", "--num-train", "5000",
              "--num-users", "10", "--frac", "1", "--local-ep", "1", "--local-bs", "32", "--rounds", "2"]


def environment(quick: bool) -> dict:
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
    if not quick and not (env["cuda_available"] and env["dali"]):
        missing = "CUDA" if not env["cuda_available"] else "DALI (nvidia-dali-cuda120)"
        sys.exit(f"error: the GPU check needs {missing}; install it or run with --quick")
    return env


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # NVML is optional: the figures do not depend on it
        return None


def gpu_tests(out: Path) -> dict:
    """`pytest -m gpu`, its output kept in gpu-tests.txt (all skipped, with reasons, without a GPU)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    (out / "gpu-tests.txt").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else ""}


def loader_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_loader runs: every kind on the device, then the DALI kinds with the split in GPU memory."""
    size = ["--image-size", "32", "--num-images", "200", "--clients", "2", "--samples-per-client", "50",
            "--local-ep", "1", "--repeats", "1"] if quick else []
    runs = [[*size, "--device", device, "--kinds", "dali,memmap,memmap-seed,dali-resize,memmap-resize"]]
    if device == "cuda":
        runs.append([*size, "--device", device, "--kinds", "dali,dali-resize", "--data-on-gpu"])
    return [[*r, "--out", str(out), "--data-dir", str(data / "loader")] for r in runs]


def round_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_round at the seed's configuration (FedLoRA and FedAvg), or tiny with --quick."""
    # memmap with 4 and 8 workers: the DataLoader's best on a 16-core GPU machine lies between them.
    gpu = device.startswith("cuda")
    kinds = "dali,dali-gpu,memmap@4,memmap@8,memmap-seed" if gpu else "dali,memmap"
    # FedLoRA also from the native 32 px store, resized on the device (with the split resident on a GPU).
    resized = ",dali-gpu-resize" if gpu else ",dali-resize"
    shape = (["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5", "--rounds", "1",
              *TINY_MODEL, "--in-process", "--no-plot"] if quick else SEED_ROUND)
    runs = [[*shape, "--alg", alg, "--kinds", kinds + (resized if alg == "fedlora" else ""), "--device", device]
            for alg in ("fedlora", "fedavg")]
    # torch.compile against eager in the same check: FedLoRA through dali, compiled (its own results folder).
    runs.append([*shape, "--alg", "fedlora", "--kinds", "dali", "--device", device, "--compile"])
    return [[*r, "--out", str(out / "compiled" if "--compile" in r else out), "--data-dir", str(data / "round")]
            for r in runs]


class Steps:
    """Runs the check's steps one after another, timing each and recording failures instead of stopping."""

    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []  # rows: (name, seconds, "ok" or the error's last line)

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or None when it raised (SystemExit included: the benchmarks exit on bad settings)."""
        t0 = time.perf_counter()
        try:
            result, status = fn(*args), "ok"
        except (Exception, SystemExit) as err:  # the next step still deserves its minutes
            result, status = None, f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            with open(self.out / "errors.txt", "a") as f:
                f.write(f"## {name}\n{traceback.format_exc()}\n")
        self.rows.append((name, time.perf_counter() - t0, status))
        print(f"gpu-check: {name}: {status} ({self.rows[-1][1]:.0f} s)", file=sys.stderr, flush=True)
        return result

    def mark_failed(self, why: str) -> None:
        """The last step ran to its end but its outcome is a failure (e.g. a GPU test failed)."""
        name, secs, _ = self.rows[-1]
        self.rows[-1] = (name, secs, f"failed: {why}")

    @property
    def failures(self) -> int:
        return sum(status != "ok" for *_, status in self.rows)

    def markdown(self) -> list[str]:
        rows = [[name, fmt(secs, ".0f"), status] for name, secs, status in self.rows]
        return ["## Steps", "", *table(["step", "s", "status"], rows), ""]


SEED_GPU_MIB = 12 * 1024  # the seed ran on a 12 GB card: a resident native split must fit one (issue 12)


def round_table(doc: dict) -> list[str]:
    """One bench_round document as a heading and a row per loader kind."""
    s = doc["settings"]
    compiled = ", torch.compile" if s.get("compile") else ""
    cols = ["kind", "round s", "bound s", "data stall", "busy cores", "CPU core-s / 1k img", "GPU util %",
            "peak RSS MiB", "torch peak GPU MiB", "device used MiB", "TFLOP/s", "MFU"]
    rows = [[r["kind"], fmt(r["round_time_s"]), fmt(r["bound_round_time_s"]), fmt(100 * r["data_stall"], ".1f"),
             fmt(r["busy_cores"]), fmt(r["cpu_core_s_per_1k_images"]), fmt(r.get("gpu_util_pct"), ".0f"),
             fmt(r["peak_rss_mib"], ".0f"), fmt(r.get("peak_gpu_mem_mib"), ".0f"),
             fmt(r.get("peak_gpu_used_mib"), ".0f"), fmt(r.get("achieved_tflops"), ".3f"), fmt(r.get("mfu"), ".1%")]
            for r in doc["results"]]
    lines = [f"## {s['alg']}, {s['model']} at {s['image_size']} px on {doc['machine']['device']}{compiled}", "",
             *table(cols, rows), ""]
    for r in doc["results"]:
        used = r.get("peak_gpu_used_mib")
        if r["kind"] == "dali-gpu-resize" and used is not None:
            verdict = "fits" if used < SEED_GPU_MIB else "does not fit"
            lines += [f"dali-gpu-resize (native store resident, resized on the GPU) peaked at {used:.0f} MiB of "
                      f"device memory (NVML, CUDA context and DALI included): it {verdict} the seed's 12 GB card.", ""]
    return lines


def summary(env: dict, tests: Optional[dict], rounds: list[dict], steps: Optional[Steps] = None) -> str:
    """One page: the environment, the steps, the GPU tests, and per round benchmark a row per loader kind."""
    tested = (f"{tests['summary']} (exit {tests['returncode']}); see gpu-tests.txt" if tests else "did not run")
    lines = ["# GPU check", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), "",
             *(steps.markdown() if steps else []), f"GPU tests (`pytest -m gpu`): {tested}.", ""]
    for doc in filter(None, rounds):
        lines += round_table(doc)
    lines += ["TFLOP/s: model training FLOPs per image (torch's FlopCounterMode on one step) x images / compute "
              "time of the median round; MFU against the device's dense bf16 peak (benchmarks/flops.py). Device "
              "used: NVML's peak for the whole GPU; torch peak: what torch's allocator held.", ""]
    return "\n".join(lines)


STEPS = ("tests", "round", "loader", "compile")  # in the order they run


def plan(out: Path, data: Path, device: str, quick: bool, wanted: set[str]) -> list[tuple[str, str, Callable, Any]]:
    """The check's steps as (kind, name, function, argument), in STEPS order, keeping the kinds asked for."""
    steps = [("tests", "pytest -m gpu", gpu_tests, out)]
    steps += [("loader", "bench_loader " + " ".join(r[r.index("--kinds"):r.index("--out")]), bench_loader.main, r)
              for r in loader_args(out, data, device, quick)]
    for r in round_args(out, data, "cuda:0" if device == "cuda" else "cpu", quick):
        kind = "compile" if "--compile" in r else "round"
        steps.append((kind, f"bench_round {r[r.index('--alg') + 1]}{' --compile' if kind == 'compile' else ''}",
                      bench_round.main, r))
    # The headline figures (the rounds) before the loader detail and torch.compile: if the lent GPU's
    # minutes run out, what is lost is the least of it. sorted() is stable: each kind keeps its order.
    return sorted((s for s in steps if s[0] in wanted), key=lambda s: STEPS.index(s[0]))


def main(argv: Optional[list[str]] = None) -> Path:
    """Run every step; returns the folder written (exits 1 after writing it if a step failed)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every step tiny, on the CPU when there is no GPU")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<gpu>-<date>/)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "gpu-check", help="where the stores are made")
    p.add_argument("--steps", default=",".join(STEPS),
                   help=f"comma-separated kinds of step to run, of {','.join(STEPS)} (default: all)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    wanted = set(args.steps.split(","))
    if not wanted <= set(STEPS):
        p.error(f"--steps {args.steps}: choose from {','.join(STEPS)}")
    env = environment(args.quick)
    device = "cuda" if env["cuda_available"] else "cpu"
    out = args.out or results_dir(machine_info(device))
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    steps, tests, rounds = Steps(out), None, []
    for kind, name, fn, arg in plan(out, args.data_dir, device, args.quick, wanted):
        result = steps.run(name, fn, arg)
        if kind == "tests":
            tests = result
            if tests and tests["returncode"] != 0:
                steps.mark_failed(tests["summary"])
        elif kind in ("round", "compile"):
            rounds.append(result)
        # After every step: a check cut short by its time limit still leaves a summary of what ran.
        (out / "summary.md").write_text(summary(env, tests, rounds, steps))
    print(f"wrote {out}/summary.md")
    if steps.failures:
        sys.exit(f"error: {steps.failures} step(s) failed; see {out}/summary.md (tracebacks in errors.txt)")
    return out


if __name__ == "__main__":
    main()
