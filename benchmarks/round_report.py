"""The round benchmark's markdown: its command, machine and settings, then one table per mode."""
from __future__ import annotations

from benchmarks.report import fmt, table

ROUND_COLUMNS = ("loader", "round (s)", "data wait", "compute", "aggregate", "bound (s)", "data stall", "images/s",
                 "CPU core-s / round", "busy cores", "core-s / 1k img", "loader core-s / 1k img", "GPU util %",
                 "peak RSS / PSS (MiB)", "store pages PSS (MiB)", "peak GPU (MiB)", "client switch (ms)")
SCALING_COLUMNS = ("loader", "clients", "image px", "images / client", "round (s)", "bound (s)", "peak RSS (MiB)",
                   "peak PSS (MiB)", "of which anonymous", "of which store pages", "anonymous before build",
                   "client switch (ms)", "bound switch (ms)", "build (s)")


def round_row(r: dict) -> list[str]:
    """One kind's row of the round table (a kind out of memory under --gpu-mem-gib says so)."""
    if r.get("out_of_memory"):
        return [r["kind"], f"out of memory under the {r['gpu_mem_cap_gib']:g} GiB cap",
                *[""] * (len(ROUND_COLUMNS) - 2)]
    return [r["kind"], f"{r['round_time_s']:.2f}", f"{r['data_wait_s']:.2f}", f"{r['compute_s']:.2f}",
            f"{r['aggregate_s']:.3f}", f"{r['bound_round_time_s']:.2f}", f"{100 * r['data_stall']:.1f}%",
            f"{r['images_per_s']:.1f}", f"{r['cpu_core_s']:.1f}", f"{r['busy_cores']:.2f}",
            f"{r['cpu_core_s_per_1k_images']:.1f}", fmt(r["loader_core_s_per_1k_images"], ".1f"),
            fmt(r["gpu_util_pct"], ".0f"), f"{r['peak_rss_mib']:.0f} / {r['peak_pss_mib']:.0f}",
            f"{r['peak_pss_store_mib']:.0f}", fmt(r["peak_gpu_mem_mib"], ".0f"), fmt(r["client_switch_ms"], ".1f")]


def scaling_row(r: dict) -> list[str]:
    """One point's row of the scaling table."""
    return [r["kind"], f"{r['num_users']:,}", f"{r['image_size']}",
            f"{r['images_per_round'] / max(r['clients_per_round'], 1):.0f}", f"{r['round_time_s']:.2f}",
            f"{r['bound_round_time_s']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['peak_pss_mib']:.0f}",
            f"{r['peak_pss_anon_mib']:.0f}", f"{r['peak_pss_store_mib']:.0f}", f"{r['base_pss_anon_mib']:.0f}",
            fmt(r["client_switch_ms"], ".1f"), fmt(r["bound_client_switch_ms"], ".1f"), f"{r['build_s']:.1f}"]


def markdown(doc: dict) -> str:
    """A round or scaling result document as markdown."""
    s, m = doc["settings"], doc["machine"]
    where = (f"Machine `{m['id']}`: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM, "
             f"GPU {m['gpu'] or 'none'}; device `{m['device']}`, torch {m['torch']} ({m['torch_threads']} "
             f"threads), DALI {m['dali']}.")
    what = (f"{s['alg']} on `{s['model']}` ({s['model_kwargs'] or 'no kwargs'}), "
            f"{'pretrained' if s['pretrained'] else 'random init'}, synthetic store of {s['num_train']:,} images, "
            f"local_ep {s['local_ep']}, batch {s['local_bs']}, augment {'on' if s['augment'] else 'off'}, "
            f"amp {s['amp']}; one warm-up round, then {s['rounds']} rounds, each paired with the same round on one "
            "cached device batch (the compute-only bound). A row is the median round by round time (the lower "
            "middle one of an even count) beside the median bound round; loader core-s is n/a where the round "
            "used less CPU than its bound, which is noise.")
    if s["scaling"]:
        rows = table(SCALING_COLUMNS, map(scaling_row, doc["results"]))
    else:
        what += (f" {s['num_users']} clients, frac {s['frac']}, {s['partition']} partition, "
                 f"{s['image_size']} px, memmap workers {s['workers']}.")
        if any("-resize" in k for k in s["kinds"]):
            what += f" `-resize` kinds read the {s.get('native_size', 32)} px store and resize on the device."
        rows = table(ROUND_COLUMNS, map(round_row, doc["results"]))
        if s.get("gpu_mem_gib") is not None:
            what += (f" torch's CUDA allocator capped at {s['gpu_mem_gib']:g} GiB (set_per_process_memory_fraction;"
                     " DALI's pools and the CUDA context are outside it; ignored on the CPU).")
    return "\n".join([f"`{doc['command']}`", "", where, "", what, "", *rows]) + "\n"
