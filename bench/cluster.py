"""``wanwu bench --ray``: wanwu on Ray beside ``wanwu run`` and Ray Data's documented pattern, in one run.

Rows, each a whole command in fresh processes on the same folder of JPEGs, timed
from start to exit (cluster start-up and model load included, as a user waits for
them), with the peak PSS of the command's process tree (Ray's object store is
shared memory, which RSS would count once per process mapping it):

* ``wanwu run``: one machine, no Ray.
* ``wanwu run --ray local``: a Ray instance for the job, read tasks decoding shards,
  the classifier in one actor.
* ``Ray Data documented``: the pattern of Ray's batch-inference guide:
  ``read_images`` + ``map_batches`` (torchvision transforms) + ``map_batches`` with a
  torch model actor (``ActorPoolStrategy``), predictions written by the driver. The
  model runs as the DataLoader baseline does on this CPU (``baseline_settings``:
  precision, threads, channels_last).

And the driver's sink alone: how many records per second JSONL and SQLite take,
which bounds any cluster, however many nodes decode and infer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wanwu.bench.proctree import PeakRss, Sampler

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # loopback only


class _Growth(Sampler):
    """Samples how many records ``out`` holds every ``interval_s``, in a thread: (seconds, lines)."""

    def __init__(self, out: Path, t0: float, interval_s: float = 0.1) -> None:
        super().__init__(interval_s)
        self.out, self.t0, self.samples = out, t0, [(0.0, 0)]

    def sample(self) -> None:
        try:
            lines = self.out.read_bytes().count(b"\n")
        except OSError:
            return
        self.samples.append((time.perf_counter() - self.t0, lines))

    def first_s(self) -> float | None:
        """When the first record appeared."""
        return next((t for t, n in self.samples if n), None)

    def steady_rate(self, total: int) -> float | None:
        """Records/s between the first sample past 10% of ``total`` and the first past 90%: the rate
        once started, without start-up or the tail."""
        low = next(((t, n) for t, n in self.samples if n >= total * 0.1), None)
        high = next(((t, n) for t, n in self.samples if n >= total * 0.9), None)
        if low is None or high is None or high[0] <= low[0]:
            return None
        return (high[1] - low[1]) / (high[0] - low[0])


def _timed(cmd: list[str], out: Path, total: int) -> dict:
    """Run ``cmd`` to the end; its wall time, the peak PSS of its tree, and how ``out`` grew."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **RAY_ENV})
    with PeakRss(proc.pid, interval_s=0.1, pss=True) as peak, _Growth(out, t0) as growth:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = out.read_text(encoding="utf-8").count("\n")
    return {"wall_s": wall, "peak_pss_mb": peak.peak / 2**20, "records": lines, "first_record_s": growth.first_s(),
            "steady": growth.steady_rate(total)}


def run_cluster_bench(workdir: Path, images: int, repeats: int) -> dict:
    """Every row once as a warm-up, then ``repeats`` rounds of every row; medians."""
    from wanwu.bench.baselines import baseline_settings
    from wanwu.pipeline.config import cpu_count
    from wanwu.stages.engines.hw import cpuinfo_text
    from wanwu.stages.models.photos import build_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    folder = workdir / f"corpus-{images}"
    build_corpus(folder, images)
    settings = baseline_settings("dataloader", cpuinfo_text(), cpu_count())
    wanwu = [sys.executable, "-m", "wanwu", "run", str(folder), "--progress", "none"]
    rows = {
        "wanwu run": (wanwu + ["--out", str(workdir / "run.jsonl")], workdir / "run.jsonl"),
        "wanwu run --ray local": (wanwu + ["--ray", "local", "--out", str(workdir / "ray.jsonl")],
                                  workdir / "ray.jsonl"),
        "Ray Data documented": ([sys.executable, "-m", "wanwu.bench.cluster", str(folder), str(workdir / "doc.jsonl"),
                                 json.dumps({"precision": settings.precision, "threads": settings.threads,
                                             "channels_last": settings.channels_last,
                                             "batch_size": settings.batch_size})],
                                workdir / "doc.jsonl"),
    }
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for round_number in range(repeats + 1):
        for name, (cmd, out) in rows.items():
            result = _timed(cmd, out, images)
            if result["records"] != images:
                raise RuntimeError(f"{name}: expected {images} records, got {result['records']}")
            if round_number:  # round 0 warms caches (compiled models, the page cache)
                runs[name].append(result)
    table = []
    for name, results in runs.items():
        rates = [images / r["wall_s"] for r in results]
        steady = [r["steady"] for r in results if r["steady"] is not None]
        firsts = [r["first_record_s"] for r in results if r["first_record_s"] is not None]
        table.append({"name": name, "images_per_s": statistics.median(rates), "runs": rates,
                      "steady_images_per_s": statistics.median(steady) if steady else None,
                      "first_record_s": statistics.median(firsts) if firsts else None,
                      "peak_pss_mb": max(r["peak_pss_mb"] for r in results)})
    table[2]["settings"] = (f"torch {settings.precision}, {settings.threads} threads, batch {settings.batch_size}, "
                            f"{'channels_last' if settings.channels_last else 'NCHW'}, 1 actor")
    return {"images": images, "repeats": repeats, "rows": table, "sinks": sink_rates()}


def sink_rates(n: int = 50_000, batch: int = 64) -> dict[str, float]:
    """Records per second the driver's sinks write (5 labels each, batches of ``batch``), fresh files."""
    from wanwu.records import Record
    from wanwu.stages.sinks.base import create_sink

    labels = [{"label": "虎斑猫", "label_en": "tabby, tabby cat", "class_id": 281, "score": 0.5}] * 5
    records = [Record(f"folder/{i // 1000:04d}/img_{i:08d}.jpg", "folder", 640, 480, labels, "efficientnet_lite0",
                      12.5) for i in range(n)]
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext in ("jsonl", "sqlite"):
            sink = create_sink(os.path.join(tmp, f"r.{ext}"))
            sink.open()
            t0 = time.perf_counter()
            for start in range(0, n, batch):
                sink.write(records[start:start + batch])
            sink.shutdown()
            rates[ext] = n / (time.perf_counter() - t0)
    return rates


def cluster_table(result: dict) -> str:
    """The rows as a markdown table, and the sinks' rates under it."""
    lines = ["| Row | images/s, whole command | runs | images/s once started (10% to 90%) | first record (s) "
             "| peak PSS (MB) | settings |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        first = f"{row['first_record_s']:.1f}" if row["first_record_s"] is not None else "-"
        steady = f"{row['steady_images_per_s']:.1f}" if row["steady_images_per_s"] is not None else "-"
        runs = ", ".join(f"{r:.1f}" for r in row["runs"])
        lines.append(f"| {row['name']} | {row['images_per_s']:.1f} | {runs} | {steady} | {first} | "
                     f"{row['peak_pss_mb']:.0f} | {row.get('settings', 'defaults')} |")
    sinks = result["sinks"]
    lines.append("")
    lines.append(f"Driver's sink alone: JSONL {sinks['jsonl']:,.0f} records/s, SQLite {sinks['sqlite']:,.0f} records/s "
                 "(batches of 64, 5 labels each).")
    return "\n".join(lines)


def _documented(folder: str, out: str, options: dict) -> None:
    """Ray's batch-inference guide, on a local Ray instance, with the embedded model in torch."""
    import contextlib

    import numpy as np
    import ray
    import torch
    from torchvision import transforms as T

    from wanwu.pipeline.config import cpu_count
    from wanwu.stages.models.base import get_model_spec

    ray.init(num_cpus=cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec = get_model_spec("efficientnet_lite0")
    pre = spec.preprocess
    transform = T.Compose([T.ToTensor(), T.Resize(pre.resize_shorter), T.CenterCrop(pre.crop),
                           T.Normalize(pre.mean, pre.std)])

    def preprocess(batch: dict) -> dict:
        return {"path": batch["path"], "transformed": np.stack([transform(img).numpy() for img in batch["image"]])}

    class Classifier:
        def __init__(self) -> None:
            torch.set_num_threads(options["threads"])
            self.layout = torch.channels_last if options["channels_last"] else torch.contiguous_format
            self.model = get_model_spec("efficientnet_lite0").build_torch().eval().to(memory_format=self.layout)

        def __call__(self, batch: dict) -> dict:
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if options["precision"] == "bf16" \
                else contextlib.nullcontext()
            x = torch.as_tensor(batch["transformed"]).contiguous(memory_format=self.layout)
            with torch.inference_mode(), cast:
                scores, ids = self.model(x).float().softmax(-1).topk(5)
            return {"path": batch["path"], "scores": scores.numpy(), "ids": ids.numpy()}

    ds = ray.data.read_images(folder, mode="RGB", include_paths=True)
    ds = ds.map_batches(preprocess, batch_format="numpy")
    ds = ds.map_batches(Classifier, compute=ray.data.ActorPoolStrategy(size=1), batch_size=options["batch_size"],
                        num_cpus=1)
    with open(out, "w", encoding="utf-8") as f:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for path, scores, ids in zip(batch["path"], batch["scores"], batch["ids"]):
                f.write(json.dumps({"key": str(path), "class_ids": ids.tolist(), "scores": scores.tolist()}) + "\n")
            f.flush()  # as a sink would: what is written survives the driver
    ray.shutdown()


if __name__ == "__main__":
    _documented(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
