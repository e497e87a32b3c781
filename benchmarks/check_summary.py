"""The GPU check's summary page: environment, steps, GPU tests, a table per round benchmark, the 12 GB verdict."""
from __future__ import annotations

from typing import Optional

from benchmarks.check_steps import Steps
from benchmarks.report import fmt, table

SEED_GPU_GIB = 12  # the seed ran on a 12 GB card; the capped run measures whether a configuration fits one
ROUND_COLS = ("kind", "round s", "bound s", "data stall", "busy cores", "CPU core-s / 1k img", "GPU util %",
              "peak RSS MiB", "torch peak GPU MiB", "device used MiB", "TFLOP/s", "MFU")


def round_cells(r: dict) -> list[str]:
    """One kind's row; a kind that ran out of memory under the cap says so."""
    if r.get("out_of_memory"):
        return [r["kind"], f"out of memory under the {r['gpu_mem_cap_gib']:g} GiB cap", *[""] * (len(ROUND_COLS) - 2)]
    return [r["kind"], fmt(r["round_time_s"]), fmt(r["bound_round_time_s"]), fmt(100 * r["data_stall"], ".1f"),
            fmt(r["busy_cores"]), fmt(r["cpu_core_s_per_1k_images"]), fmt(r.get("gpu_util_pct"), ".0f"),
            fmt(r["peak_rss_mib"], ".0f"), fmt(r.get("peak_gpu_mem_mib"), ".0f"),
            fmt(r.get("peak_gpu_used_mib"), ".0f"), fmt(r.get("achieved_tflops"), ".3f"), fmt(r.get("mfu"), ".1%")]


def memory_verdict(r: dict) -> str:
    """Whether one kind fits the seed's card: torch's peak under the cap plus what ran outside torch."""
    cap = r["gpu_mem_cap_gib"]
    how = (f"with torch's allocator capped at {cap:g} GiB (set_per_process_memory_fraction "
           f"{r['gpu_mem_fraction']:.3f} of the {r['gpu_total_mib'] / 1024:.1f} GiB card)")
    if not r["fits_gpu_mem_cap"]:
        return (f"{r['kind']} ran out of memory {how}: it does not fit a {cap:g} GiB card. "
                f"torch held {fmt(r.get('peak_gpu_mem_mib'), '.0f')} MiB when it failed ({r['out_of_memory']}).")
    torch_peak = (f"torch peaked at {fmt(r.get('peak_gpu_mem_mib'), '.0f')} MiB allocated, "
                  f"{fmt(r.get('peak_gpu_reserved_mib'), '.0f')} MiB reserved")
    used, reserved, allocated = r.get("peak_gpu_used_mib"), r.get("peak_gpu_reserved_mib"), r.get("peak_gpu_mem_mib")
    if used is None or reserved is None or allocated is None:
        return (f"{r['kind']} ran {how}; {torch_peak}. What ran outside torch (the CUDA context, DALI's pools) was "
                f"not measured, so whether it fits a {cap:g} GiB card is open.")
    # The cap covers torch alone; on the seed's card the CUDA context and DALI's pools share the same memory.
    outside = max(0.0, used - reserved)
    fits = allocated + outside <= cap * 1024
    return (f"{r['kind']} ran {how}; {torch_peak}. About {outside:.0f} MiB ran outside torch (NVML's device-used "
            f"peak {used:.0f} MiB less torch's reserved), which the cap does not cover: torch's peak plus that is "
            f"{allocated + outside:.0f} MiB, so it {'fits' if fits else 'does not fit'} a {cap:g} GiB card.")


def round_table(doc: dict) -> list[str]:
    """One bench_round document as a heading, a row per loader kind, and the capped run's verdicts."""
    s = doc["settings"]
    compiled = ", torch.compile" if s.get("compile") else ""
    capped = ""
    if s.get("gpu_mem_gib") is not None:
        on_gpu = doc["machine"]["device"].startswith("cuda")
        capped = f", torch capped at {s['gpu_mem_gib']:g} GiB" if on_gpu else ", --gpu-mem-gib ignored on the CPU"
    lines = [f"## {s['alg']}, {s['model']} at {s['image_size']} px on {doc['machine']['device']}{compiled}{capped}",
             "", *table(ROUND_COLS, map(round_cells, doc["results"])), ""]
    for r in doc["results"]:
        if "fits_gpu_mem_cap" in r:
            lines += [memory_verdict(r), ""]
        elif r["kind"] == "dali-gpu-resize" and r.get("peak_gpu_used_mib") is not None:
            lines += [f"dali-gpu-resize (native store resident, resized on the GPU): NVML's device-used peak "
                      f"{r['peak_gpu_used_mib']:.0f} MiB (whole GPU, torch's cache and DALI's pools included: "
                      f"context only; the {SEED_GPU_GIB} GB verdict comes from the capped run).", ""]
    return lines


def summary(env: dict, tests: Optional[dict], rounds: list[dict], steps: Optional[Steps] = None) -> str:
    """One page: the environment, the steps, the GPU tests, and per round benchmark a row per loader kind."""
    tested = "did not run"
    if tests:
        limits = (f", at most {tests['per_test_s']} s a test and {tests['limit_s']:.0f} s in all"
                  if "limit_s" in tests else "")
        tested = f"{tests['summary']} (exit {tests['returncode']}{limits}); see gpu-tests.txt"
    lines = ["# GPU check", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), "",
             *(steps.markdown() if steps else []), f"GPU tests (`pytest -m gpu`): {tested}.", ""]
    for doc in filter(None, rounds):
        lines += round_table(doc)
    lines += ["TFLOP/s: model training FLOPs per image (torch's FlopCounterMode on one step) x images / compute "
              "time of the median round; MFU against the device's dense bf16 peak (benchmarks/flops.py). Device "
              "used: NVML's peak for the whole GPU; torch peak: what torch's allocator held.", ""]
    return "\n".join(lines)
