"""Turn a suite result into a table, JSON, Markdown and a bar chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PEERS = ("naive", "dataloader", "openvino dataloader")  # the rows ratios are taken against
HEADER = ["", "images/s", "vs naive", "vs dataloader", "vs openvino dataloader", "of limit", "peak RSS MB",
          "settings"]


def _rows(result: dict) -> list[list[str]]:
    by = {r["name"]: r for r in result["rows"]}
    peers = [by[name]["images_per_s"] if name in by else 0.0 for name in PEERS]
    table = []
    for r in result["rows"]:
        rate = r["images_per_s"]
        # Ratios only between whole jobs (a baseline or wanwu), not stages measured alone.
        job = r["name"].startswith("wanwu") or r["name"] in PEERS
        ratios = [f"{rate / peer:.{1 if i == 0 else 2}f}x" if peer and job else "" for i, peer in enumerate(peers)]
        of_limit = r.get("of_limit")
        table.append([
            r["name"], f"{rate:.1f}", *ratios, f"{of_limit:.0%}" if of_limit else "",
            f"{r['peak_rss_mb']:.0f}", r.get("settings", ""),
        ])
    return table


def machine_line(m: dict) -> str:
    """The machine in one line: CPU, family/model numbers, ISA features, cores, memory, library versions."""
    isa = m.get("isa") or {"AMX": m.get("amx_bf16"), "AVX512-BF16": m.get("avx512_bf16")}  # older results
    numbers = f" (family {m['cpu_family']}, model {m['cpu_model']})" if m.get("cpu_family") is not None else ""
    return (
        f"Machine: {m['cpu']}{numbers}, {m['cores']} cores, {m['memory_gb']} GB; "
        + ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in isa.items()) + "; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    )


def markdown(result: dict) -> str:
    lines = [
        machine_line(result["machine"]),
        "",
        f"Corpus: {result['config']['images']} JPEGs; median of {result['config']['repeats']} runs after a warm-up.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    by = {r["name"]: r for r in result["rows"]}
    limits = [f"{r['name']} {r['limit_images_per_s']:.1f} images/s (reached {r['of_limit']:.0%})"
              for r in result["rows"] if r.get("limit_images_per_s")]
    lines += ["", "Limits (decode of the row's own input and inference, sharing the cores): " + "; ".join(limits) + "."]
    if result["config"]["repeats"] > 1:  # the noise a row's "of limit" may exceed 100% by
        spread = max((r.get("spread", 0.0) for r in result["rows"]), default=0.0)
        lines.append(f"Largest spread between rounds ((fastest - slowest) / median, any row): {spread:.0%}.")
    lines.append(f"First record after {by['wanwu'].get('first_record_s', float('nan')):.2f} s (model cached).")
    if "wanwu cache warm" in by and "wanwu 50% repeats" in by:
        base, warm = by["wanwu"], by["wanwu cache warm"]
        plain, cached = by["wanwu 50% repeats"], by["wanwu 50% repeats cached"]
        counts = cached.get("cache", {})
        lines.append(f"Result cache: a rerun with the cache warm {warm['images_per_s']:.1f} images/s against "
                     f"{base['images_per_s']:.1f} without ({warm['images_per_s'] / base['images_per_s']:.1f}x); "
                     f"a corpus of 50% repeats {cached['images_per_s']:.1f} with a cache starting empty against "
                     f"{plain['images_per_s']:.1f} without ({cached['images_per_s'] / plain['images_per_s']:.2f}x; "
                     f"{counts.get('hits', 0)} hits, {counts.get('misses', 0)} misses per run).")
    lines += _precision_table(by)
    mem = result.get("memory_by_job_size_mb") or {}
    if mem:
        lines.append("Peak RSS by job size: " + ", ".join(f"{n} images {mb:.0f} MB" for n, mb in mem.items()) + ".")
    return "\n".join(lines) + "\n"


def _precision_table(by: dict[str, dict]) -> list[str]:
    """The precision rows side by side: images/s alone and end to end, and agreement with fp32."""
    precisions = [r["precision"] for name, r in by.items() if name.startswith("inference only ") and "precision" in r]
    if not precisions:
        return []
    lines = ["", "Precisions on OpenVINO (top-1 agreement with fp32 on this corpus, measured apart from the timing):",
             "", "| precision | inference only images/s | wanwu run images/s | top-1 agreement | recomputed in fp32 |",
             "|---|---|---|---|---|"]
    for p in precisions:
        alone, job = by[f"inference only {p}"], by[f"wanwu {p}"]
        recomputed = f"{alone['rechecked']:.1%}" if "+" in p else ""
        lines.append(f"| {p} | {alone['images_per_s']:.1f} | {job['images_per_s']:.1f} | "
                     f"{alone['top1_agreement']:.1%} | {recomputed} |")
    return lines


def text_table(result: dict) -> str:
    rows = [HEADER] + _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    last = len(HEADER) - 1  # names and settings read left to right; numbers line up on the right
    lines = ("  ".join(c.rjust(w) if 0 < i < last else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def chart(result: dict, path: Path) -> bool:
    """Draw a bar chart of images/s; False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no chart drawn")
        return False
    names = [r["name"] for r in result["rows"]]
    rates = [r["images_per_s"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.barh(names[::-1], rates[::-1], color=["#4c72b0" if n.startswith("wanwu") else "#999999" for n in names[::-1]])
    ax.bar_label(bars, fmt="%.0f")
    label = "limit of its own stages"
    for y, row in enumerate(result["rows"][::-1]):  # each wanwu row's limit, across its bar
        if row.get("limit_images_per_s"):
            ax.plot([row["limit_images_per_s"]] * 2, [y - 0.45, y + 0.45], color="#c44e52", linestyle="--",
                    label=label)
            label = "_nolegend_"
    ax.set_xlabel("images/s (median)")
    m = result["machine"]
    ax.set_title(f"wanwu bench: {result['config']['images']} JPEGs, {m['cpu']}, {m['cores']} cores", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(result: dict, out_dir: Path) -> list[Path]:
    """Write bench.json, bench.md and bench.png into ``out_dir``; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.json", out_dir / "bench.md"]
    written[0].write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    written[1].write_text(markdown(result), encoding="utf-8")
    if chart(result, out_dir / "bench.png"):
        written.append(out_dir / "bench.png")
    return written
