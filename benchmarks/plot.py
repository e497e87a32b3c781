"""Plot a bench_round JSON: round time split per loader kind (with the compute-only bound) and CPU busy cores.

    python -m benchmarks.plot benchmarks/results/<machine>-<date>/round-fedavg-224px.json [--out PNG]
A scaling JSON (`bench_round --scaling`) gets host memory and per-client overhead per client count instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

PARTS = (("data_wait_s", "data wait", "#e4572e"), ("compute_s", "compute", "#4c72b0"),
         ("aggregate_s", "aggregation", "#55a868"), ("other_s", "other (state copies)", "#bbbbbb"))


def _subtitle(doc: dict) -> str:
    s, m = doc["settings"], doc["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores, no GPU"
    return (f"{s['alg']} · {s['model']} ({s['model_kwargs'] or '-'}) · batch {s['local_bs']} · "
            f"local_ep {s['local_ep']} · {where}")


def plot_rounds(doc: dict, fig: Any) -> None:
    """Left: stacked round time per kind with the bound marked; right: busy CPU cores."""
    rows = measured(doc["results"])
    kinds = [r["kind"] for r in rows]
    x = range(len(rows))
    ax_t, ax_c = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    bottom = [0.0] * len(rows)
    for key, label, color in PARTS:
        vals = [max(r[key], 0.0) for r in rows]
        ax_t.bar(x, vals, 0.6, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_t.hlines([r["bound_round_time_s"] for r in rows], [i - 0.36 for i in x], [i + 0.36 for i in x],
                colors="black", lw=2, zorder=3, label="compute-only bound (one cached batch)")
    for i, r in enumerate(rows):
        ax_t.annotate(f"{r['round_time_s']:.1f} s\nstall {100 * r['data_stall']:.0f}%", (i, bottom[i]),
                      ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_t.set(ylabel="seconds per round (median)", title="Round time",
             ylim=(0, 1.25 * max(bottom + [r["bound_round_time_s"] for r in rows])))
    ax_t.legend(fontsize=8, loc="upper left")
    w = 0.38
    ax_c.bar([i - w / 2 for i in x], [r["busy_cores"] for r in rows], w, color="#8172b2", label="measured")
    ax_c.bar([i + w / 2 for i in x], [r["bound_busy_cores"] for r in rows], w, color="#cccccc",
             label="compute-only bound")
    for i, r in enumerate(rows):
        ax_c.annotate(f"{r['busy_cores']:.2f}\n{r['cpu_core_s_per_1k_images']:.1f} core-s\n/ 1k img",
                      (i - w / 2, r["busy_cores"]), ha="center", va="bottom", fontsize=7)
    ax_c.axhline(doc["machine"]["cores"], ls="--", lw=1, color="black")
    ax_c.text(len(rows) - 0.5, doc["machine"]["cores"], f"{doc['machine']['cores']} cores", ha="right",
              va="bottom", fontsize=8)
    ax_c.set(ylabel="busy cores = CPU core-s / wall s", title="CPU use (whole process tree)",
             ylim=(0, 1.2 * max([doc["machine"]["cores"]] + [r["busy_cores"] for r in rows])))
    ax_c.legend(fontsize=8, loc="upper left")
    for ax in (ax_t, ax_c):
        ax.set_xticks(list(x), kinds, fontsize=9)
        ax.grid(axis="y", alpha=0.3)


def plot_scaling(doc: dict, fig: Any) -> None:
    """Left: peak PSS split anonymous / store pages / other files; right: per-client overhead vs the bound."""
    rows = doc["results"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    key = lambda r: (f"{r['num_users']:,} clients\n{r['image_size']} px, "  # noqa: E731
                     f"{r['images_per_round'] / max(r['clients_per_round'], 1):.0f} img/client")
    labels = list(dict.fromkeys(key(r) for r in rows))
    ax_m, ax_s = fig.subplots(1, 2)
    w = 0.8 / len(kinds)
    hatches = ("", "//", "xx", "..")
    for j, kind in enumerate(kinds):
        mine = {key(r): r for r in rows if r["kind"] == kind}
        have = [k for k in labels if k in mine]
        xs = [labels.index(k) + (j - (len(kinds) - 1) / 2) * w for k in have]
        parts = [("peak_pss_anon_mib", "anonymous", "#4c72b0"), ("peak_pss_store_mib", "store pages", "#dd8452"),
                 (None, "other files (libraries)", "#bbbbbb")]
        bottom = [0.0] * len(have)
        for field, label, color in parts:
            vals = [mine[k][field] if field else mine[k]["peak_pss_mib"] - mine[k]["peak_pss_anon_mib"]
                    - mine[k]["peak_pss_store_mib"] for k in have]
            vals = [max(v, 0.0) for v in vals]
            ax_m.bar(xs, vals, w * 0.95, bottom=bottom, color=color, hatch=hatches[j % 4], edgecolor="white",
                     label=f"{kind}: {label}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, k in zip(xs, have):
            ax_m.annotate(kind, (x, bottom[have.index(k)]), ha="center", va="bottom", fontsize=7)
        ax_s.bar(xs, [mine[k]["client_switch_ms"] or 0 for k in have], w * 0.95, hatch=hatches[j % 4],
                 edgecolor="white", label=kind)
        ax_s.hlines([mine[k]["bound_client_switch_ms"] or 0 for k in have], [x - w / 2 for x in xs],
                    [x + w / 2 for x in xs], colors="black", lw=2, zorder=3,
                    label="compute-only bound" if j == 0 else None)
    ax_m.set(ylabel="MiB, PSS summed over the process tree", title="Peak host memory (PSS)")
    ax_s.set(ylabel="ms (median)", title="Per-client overhead: last batch -> next client's first batch")
    for ax in (ax_m, ax_s):
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)


def measured(rows: list[dict]) -> list[dict]:
    """The rows that have figures: a kind out of memory under --gpu-mem-gib has none."""
    return [r for r in rows if "round_time_s" in r]


def plot(doc: dict, out: Path) -> Path:
    """Write the figure of a bench_round result document to `out`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5), layout="constrained")
    (plot_scaling if doc.get("mode") == "scaling" else plot_rounds)(doc, fig)
    fig.suptitle(f"bench_round {doc['date']}: {_subtitle(doc)}", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    """Redraw the figure of one result file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="a round-*.json written by `python -m benchmarks.bench_round`")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text())
        doc["results"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {args.json} is not a bench_round result ({err})") from None
    print(plot(doc, args.out or args.json.with_suffix(".png")))


if __name__ == "__main__":
    main()
