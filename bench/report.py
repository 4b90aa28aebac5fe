"""Turn a suite result into a table, JSON, Markdown and a bar chart."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _rows(result: dict) -> list[list[str]]:
    by = {r["name"]: r for r in result["rows"]}
    naive, loader = by["naive"]["images_per_s"], by["dataloader"]["images_per_s"]
    lim = result["limit_images_per_s"]
    table = []
    for r in result["rows"]:
        rate = r["images_per_s"]
        pipeline_row = r["name"].startswith("wanwu") or r["name"] in ("naive", "dataloader")
        table.append([
            r["name"], f"{rate:.1f}",
            f"{rate / naive:.1f}x" if naive and pipeline_row else "",
            f"{rate / loader:.2f}x" if loader and pipeline_row else "",
            f"{rate / lim:.0%}" if lim and r["name"].startswith("wanwu") else "",
            f"{r['peak_rss_mb']:.0f}",
        ])
    return table


HEADER = ["", "images/s", "vs naive", "vs dataloader", "of limit", "peak RSS MB"]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, AMX {'yes' if m['amx_bf16'] else 'no'}, "
        f"AVX512-BF16 {'yes' if m['avx512_bf16'] else 'no'}, {m['memory_gb']} GB; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
        f"Corpus: {result['config']['images']} JPEGs; median of {result['config']['repeats']} runs after a warm-up.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    by = {r["name"]: r for r in result["rows"]}
    lines += [
        "",
        f"Machine limit (decode and inference sharing the cores): {result['limit_images_per_s']:.1f} images/s; "
        f"wanwu reaches {result['efficiency']:.0%} of it. Engine: {by['inference only'].get('engine', '?')}.",
        f"First record after {by['wanwu'].get('first_record_s', float('nan')):.2f} s (model cached).",
    ]
    mem = result.get("memory_by_job_size_mb") or {}
    if mem:
        lines.append("Peak RSS by job size: " + ", ".join(f"{n} images {mb:.0f} MB" for n, mb in mem.items()) + ".")
    return "\n".join(lines) + "\n"


def text_table(result: dict) -> str:
    rows = [HEADER] + _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


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
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names[::-1], rates[::-1], color=["#4c72b0" if n.startswith("wanwu") else "#999999" for n in names[::-1]])
    ax.bar_label(bars, fmt="%.0f")
    ax.axvline(result["limit_images_per_s"], color="#c44e52", linestyle="--", label="machine limit")
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
