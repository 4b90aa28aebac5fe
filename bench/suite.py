"""The benchmark suite: wanwu against the usual alternatives, on the same corpus, in one run.

Each row runs in fresh processes, one warm-up run and then ``repeats`` timed
runs, in rounds (every row once per round; see ``_interleaved``); the table
reports the median images/s and the peak resident memory of the row's whole
process tree. Start-up (model load) is excluded everywhere: the
baselines load their model before the clock starts, and wanwu's figure is its
rate once its model is loaded (``gate.py``: no input is read before).

Every row states its settings: the baselines' come from ``baseline_settings``
(the engines' precision rule, the libraries' recommended threads and workers).
Each wanwu row's "of limit" divides by the limit of its own stages: decode of
its own input (the folder's JPEGs, or the archive's smaller ones) and inference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from wanwu.stages.engines.hw import cpu_features, cpuinfo_text
from wanwu.stages.models.photos import build_corpus
from wanwu.bench.baselines import BASELINES, Settings, baseline_settings
from wanwu.bench.proctree import PeakRss
from wanwu.bench.stages import limit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often."""

    images: int = 300  # corpus size
    repeats: int = 3  # timed runs per row (after one warm-up)
    naive_images: int = 0  # images for the slow naive loop; 0 = all
    model: str = "efficientnet_lite0"
    workdir: str = ""  # corpus and archives; "" = a folder under the temp dir, reused
    memory_images: tuple[int, ...] = ()  # job sizes for the memory-growth check, e.g. (500, 5000)
    # Precisions measured side by side (inference only and end to end, with top-1 agreement with
    # fp32); None: those this machine runs (precision_rows), (): none.
    precisions: tuple[str, ...] | None = None


@dataclass
class Row:
    name: str
    rates: list[float] = field(default_factory=list)  # images/s of each timed run
    peak_rss_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def spread(self) -> float:
        """(fastest - slowest) / median of the timed runs: the noise between rounds; 0 for one run."""
        return (max(self.rates) - min(self.rates)) / self.rate if self.rate else 0.0


def _timed(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """Run ``cmd``; return its stdout and the peak RSS of its process tree."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRss(proc.pid) as peak:
        out, err = proc.communicate()
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return out, peak.peak


def _measure(row: Row, kind: str, args: dict) -> Callable[[bool], None]:
    """One run of ``python -m wanwu.bench.measure`` per call; kept when called with True."""
    cmd = [sys.executable, "-m", "wanwu.bench.measure", kind, json.dumps(args)]

    def step(keep: bool) -> None:
        out, peak = _timed(cmd)
        result = json.loads(out.strip().splitlines()[-1])
        if keep:
            row.rates.append(result["rate"])
            row.peak_rss_bytes = max(row.peak_rss_bytes, peak)
            row.extra.update({k: v for k, v in result.items() if k != "rate"})

    return step


def _wanwu(row: Row, inputs: list[str], workdir: Path, options: dict | None = None,
           cold_cache: bool = False) -> Callable[[bool], None]:
    """One ``wanwu run`` per call, timed from the moment its model is loaded (``bench/gate.py``).

    With ``options["cache"]``, the cache persists between calls (the warm-up fills it), unless
    ``cold_cache``: then every call starts from an empty one.
    """
    firsts: list[float] = []
    out = workdir / "results.jsonl"
    cmd = [sys.executable, "-m", "wanwu.bench.measure", "wanwu",
           json.dumps({"inputs": inputs, "out": str(out), "options": options or {}})]

    def step(keep: bool) -> None:
        out.unlink(missing_ok=True)
        if cold_cache:
            shutil.rmtree((options or {})["cache"], ignore_errors=True)
        stdout, peak = _timed(cmd)
        stats = json.loads(stdout.strip().splitlines()[-1])
        if keep:
            row.rates.append(stats["rate"])
            row.peak_rss_bytes = max(row.peak_rss_bytes, peak)
            firsts.append(stats["first_record_s"])
            row.extra.update(wall_images_per_s=stats["images_per_s"], busy=stats["busy"],
                             first_record_s=statistics.median(firsts))
            if stats.get("cache"):
                row.extra["cache"] = stats["cache"]

    return step


def _interleaved(steps: list[Callable[[bool], None]], repeats: int) -> None:
    """A warm-up of every row, then ``repeats`` rounds of one run of every row.

    Rounds rather than row after row: a machine whose speed drifts over minutes
    (shared hosts do) then shifts every row alike, and the ratios between rows
    (speed-ups, efficiency) stay honest.
    """
    for step in steps:
        step(False)
    for _ in range(repeats):
        for step in steps:
            step(True)


def _symlink_corpus(paths: list[Path], folder: Path, n: int) -> Path:
    """A folder of ``n`` distinct names linking to the corpus files (a big job without the disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = folder / f"{i:06d}.jpg"
        if not link.exists():
            link.symlink_to(paths[i % len(paths)])
    return folder


def run_suite(cfg: BenchConfig) -> dict:
    """Measure every row; returns the report as a dict (see ``report.py``)."""
    from wanwu.pipeline.config import cpu_count
    from wanwu.pipeline.pack.pack import pack

    workdir = Path(cfg.workdir or Path(tempfile.gettempdir()) / "wanwu-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    cores = cpu_count()
    paths = build_corpus(workdir / f"corpus-{cfg.images}", cfg.images)
    str_paths = [str(p) for p in paths]
    archive = workdir / f"corpus-{cfg.images}-256.lmdb"
    if not archive.exists():
        pack([str(workdir / f"corpus-{cfg.images}")], str(archive), resize_shorter=256)
    naive_paths = str_paths[: cfg.naive_images] if cfg.naive_images else str_paths
    common = {"model": cfg.model, "paths": str_paths}
    cpuinfo = cpuinfo_text()
    baselines = [Row(name) for name in BASELINES]
    steps = [_measure(row, "baseline", {**common, "paths": naive_paths if row.name == "naive" else str_paths,
                                        "name": row.name, "settings": asdict(_settings(row, cpuinfo, cores))})
             for row in baselines]
    decode, decode_lmdb, inference = Row("decode only"), Row("decode only lmdb-256"), Row("inference only")
    run_folder, run_lmdb, api = Row("wanwu"), Row("wanwu lmdb-256"), Row("wanwu python api")
    # The result cache: a rerun of the corpus with the cache its warm-up filled, and a corpus of
    # which half are repeats of the other half (the same bytes under other names), without and
    # with a cache that starts empty every run.
    warm, repeats, repeats_cached = Row("wanwu cache warm"), Row("wanwu 50% repeats"), Row("wanwu 50% repeats cached")
    repeat_folder = _repeats_corpus(paths, workdir / f"repeats-{cfg.images}", cfg.images)
    _interleaved(steps + [
        _measure(decode, "decode", {**common, "processes": cores, "decoder": "auto"}),
        _measure(decode_lmdb, "decode", {**common, "paths": [], "archive": str(archive), "processes": cores,
                                         "decoder": "auto"}),
        _measure(inference, "inference", {**common, "batch_size": 32, "engine": "auto"}),
        _wanwu(run_folder, [str(workdir / f"corpus-{cfg.images}")], workdir),
        _wanwu(run_lmdb, [str(archive)], workdir),
        _measure(api, "api", {**common, "options": {}}),
        _wanwu(warm, [str(workdir / f"corpus-{cfg.images}")], workdir, {"cache": str(workdir / "cache-warm")}),
        _wanwu(repeats, [str(repeat_folder)], workdir),
        _wanwu(repeats_cached, [str(repeat_folder)], workdir, {"cache": str(workdir / "cache-cold")}, cold_cache=True),
    ], cfg.repeats)
    shutil.rmtree(workdir / "cache-warm", ignore_errors=True)  # the next bench must start it cold
    for row in (decode, decode_lmdb):
        row.extra["settings"] = f"{cores} processes, {row.extra.pop('decoder', '?')} decoder"
    inference.extra["settings"] = f"{inference.extra.get('engine', '?')}, batch 32"
    # Each job's limit is that of its own stages: the archive holds smaller JPEGs.
    defaults = f"defaults: {cores} decoders, {inference.extra.get('engine', '?')}"
    for row, decoded, how in ((run_folder, decode, "wanwu run"), (run_lmdb, decode_lmdb, "wanwu run"),
                              (api, decode, "Recognizer().map(paths)")):
        row.extra["limit_images_per_s"] = limit(decoded.rate, inference.rate)
        row.extra["of_limit"] = row.rate / row.extra["limit_images_per_s"]
        row.extra["settings"] = f"{how} {defaults}"
    memory = {}
    for n in cfg.memory_images:
        folder = _symlink_corpus(paths, workdir / f"links-{n}", n)
        row = Row(f"wanwu {n}")
        _wanwu(row, [str(folder)], workdir)(True)
        memory[n] = row.peak_rss_bytes
    for row in (warm, repeats, repeats_cached):
        row.extra["settings"] = {"wanwu cache warm": "--cache, filled by its warm-up run",
                                 "wanwu 50% repeats": "no cache", "wanwu 50% repeats cached": "--cache, empty at start"}[
            row.name]
    rows = baselines + [decode, decode_lmdb, inference, run_folder, run_lmdb, api, warm, repeats, repeats_cached]
    rows += _precision_rows(cfg, common, workdir / f"corpus-{cfg.images}", workdir)
    return {
        "machine": machine_description(),
        "config": asdict(cfg),
        "rows": [{"name": r.name, "images_per_s": r.rate, "runs": r.rates, "spread": r.spread,
                  "peak_rss_mb": r.peak_rss_bytes / 2**20, **r.extra} for r in rows],
        "limit_images_per_s": run_folder.extra["limit_images_per_s"],
        "efficiency": run_folder.extra["of_limit"],
        "memory_by_job_size_mb": {str(n): b / 2**20 for n, b in memory.items()},
    }


def precision_rows() -> tuple[str, ...]:
    """The precisions this machine runs: fp32, bf16 where the CPU has it natively, int8 and
    int8+fp32 where NNCF is installed."""
    import importlib.util

    from wanwu.stages.engines.hw import native_bf16

    return ("fp32", *(("bf16",) if native_bf16(cpuinfo_text()) else ()),
            *(("int8", "int8+fp32") if importlib.util.find_spec("nncf") else ()))


def _precision_rows(cfg: BenchConfig, common: dict, folder: Path, workdir: Path) -> list[Row]:
    """For each precision, inference only and ``wanwu run --precision P``, with top-1 agreement with fp32.

    Agreement is measured once, outside the timed rows, on the same corpus (which is not the int8
    calibration set); it also quantizes int8 on a cold engine cache, so no timed row does.
    """
    precisions = precision_rows() if cfg.precisions is None else cfg.precisions
    if not precisions:
        return []
    agreement = Row("agreement")
    _measure(agreement, "agreement", {**common, "precisions": list(precisions)})(True)
    rows: list[Row] = []
    steps = []
    for precision in precisions:
        alone, job = Row(f"inference only {precision}"), Row(f"wanwu {precision}")
        steps += [_measure(alone, "inference", {**common, "batch_size": 32, "engine": "openvino",
                                                "precision": precision}),
                  _wanwu(job, [str(folder)], workdir, {"engine": "openvino", "precision": precision})]
        for row, settings in ((alone, f"openvino {precision}, batch 32"), (job, f"wanwu run --precision {precision}")):
            row.extra.update(agreement.extra["precisions"][precision], precision=precision, settings=settings)
            rows.append(row)
    _interleaved(steps, cfg.repeats)
    return rows


def _repeats_corpus(paths: list[Path], folder: Path, n: int) -> Path:
    """``n`` names: the first half of the corpus, then each of those again under another name."""
    folder.mkdir(parents=True, exist_ok=True)
    half = paths[: max(1, n // 2)]
    for i in range(n):
        link = folder / f"{i:06d}.jpg"
        if not link.exists():
            link.symlink_to(half[i % len(half)])
    return folder


def _settings(row: Row, cpuinfo: str, cores: int) -> Settings:
    """The baseline's settings on this CPU, also stated in its row."""
    settings = baseline_settings(row.name, cpuinfo, cores)
    row.extra["settings"] = settings.describe()
    row.extra["precision"] = settings.precision
    return settings


def machine_description() -> dict:
    """CPU (model, family/model numbers, the ISA features that matter), cores, memory and library versions."""
    from importlib import metadata

    from wanwu.pipeline.config import cpu_count

    cpu = cpu_features(cpuinfo_text())
    versions = {}
    for dist in ("wanwu", "torch", "torchvision", "openvino", "onnxruntime", "simplejpeg", "nvidia-dali-cuda120",
                 "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    isa = cpu.isa()
    return {
        "cpu": cpu.model_name, "cpu_family": cpu.family, "cpu_model": cpu.model, "isa": isa,
        "native_bf16": cpu.native_bf16, "amx_bf16": isa["AMX"], "avx512_bf16": isa["AVX512-BF16"],
        "cores": cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0], "versions": versions,
    }
