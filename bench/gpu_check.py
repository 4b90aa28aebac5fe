"""One command for a GPU machine: ``python -m wanwu.bench.gpu_check [--out DIR]``.

Within 10 minutes it (1) runs ``pytest -m gpu``, (2) measures decode only,
inference only and end to end on the GPU with the CPU path beside them, (3) takes
a torch.profiler trace of the inference feed showing host-to-device copies and
compute on different streams overlapping, then prints a table and writes
``gpu_check.json`` and ``gpu_trace.json``. Without a GPU it exits 2 and says why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
PYTEST_TIMEOUT_S = 300
RUN_TIMEOUT_S = 120
EXIT_NO_GPU = 2


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None."""
    try:
        import torch
    except ImportError as exc:
        return f"torch does not import: {exc}"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (CUDA build {torch.version.cuda})"
    from wanwu.kernels.cuda import cuda_unavailable_reason

    return cuda_unavailable_reason()


def sample_photos() -> list[Path]:
    """The bundled sample photos (the folder also holds a README and a client script)."""
    return sorted(p for p in (REPO / "samples").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def photos_corpus(folder: Path, copies: int) -> list[Path]:
    """The bundled sample photos, ``copies`` times each (no result cache is used, so copies count)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for photo in sample_photos():
        for i in range(copies):
            target = folder / f"{i:04d}-{photo.name}"
            shutil.copyfile(photo, target)
            out.append(target)
    return out


def decode_rate(decoder: str, device: str, files: list[Path]) -> float:
    """Images per second of one decoder decoding ``files`` into host frames (after one warm-up pass)."""
    import numpy as np

    from wanwu.stages.decoders.base import DecodeConfig, create_decoder

    dec = create_decoder(decoder, DecodeConfig(device=device))
    datas = [f.read_bytes() for f in files]
    outs = [np.empty(dec.output_spec().shape, np.uint8) for _ in range(32)]
    dec.decode_batch_into(datas[:32], outs[: len(datas[:32])])
    t = time.perf_counter()
    for i in range(0, len(datas), 32):
        chunk = datas[i:i + 32]
        dec.decode_batch_into(chunk, outs[: len(chunk)])
    dec.shutdown()
    return len(datas) / (time.perf_counter() - t)


def inference_rate(engine: str, device: str, batch: int = 32, batches: int = 20) -> float:
    """Images per second of the classifier on random uint8 batches (after load and warm-up)."""
    import numpy as np

    from wanwu.stages.classifier import Classifier
    from wanwu.stages.engines.base import EngineConfig
    from wanwu.stages.models.base import get_model_spec

    model = get_model_spec("efficientnet_lite0")
    clf = Classifier(model, engine, EngineConfig(device=device, max_batch_size=batch))
    clf.load()
    x = np.random.default_rng(0).integers(0, 256, (batch, *clf.input_spec().shape), dtype=np.uint8)
    clf.logits(x)
    t = time.perf_counter()
    for _ in range(batches):
        clf.logits(x)
    clf.shutdown()
    return batch * batches / (time.perf_counter() - t)


def end_to_end(folder: Path, out: Path, *args: str) -> dict[str, Any]:
    """``wanwu run`` over ``folder``: wall seconds, images per second, top-1 per key.

    ``rate`` is the whole command's; ``started_rate`` counts from the first record on
    (the job's own clock, ``--stats-json``), so a short corpus is not all start-up.
    """
    stats = out.with_suffix(".stats.json")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wanwu", "run", str(folder), "--out", str(out), "--progress",
                           "none", "--stats-json", str(stats), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    job = json.loads(stats.read_text()) if stats.exists() else {}
    first, elapsed = job.get("first_record_s"), job.get("elapsed_s", 0.0)
    started = len(records) / (elapsed - first) if first is not None and elapsed > first else None
    return {"args": list(args), "rc": proc.returncode, "wall_s": wall, "images": len(records),
            "rate": len(records) / wall, "started_rate": started, "ready_s": job.get("ready_s"),
            "first_record_s": first, "busy": job.get("busy"), "restarts": job.get("restarts"),
            "failure": job.get("failure"), "stderr_tail": proc.stderr[-2000:],
            "top1": {r["key"]: r["labels"][0]["class_id"] for r in records if r["labels"]}}


class PinnedFeed:
    """A ``CudaFeed`` over a pinned pool of random frames, as the inference process builds it.

    ``submit(n)`` sends batch ``n`` (slots alternate between two halves of the pool);
    ``answered`` holds (first key, number of records) per answered batch, in answer order.
    """

    def __init__(self, batch: int = 32, graphs: bool = True) -> None:
        import numpy as np

        from wanwu.pipeline.topology.gpu import DeviceFacts, GpuSettings, plan_gpu
        from wanwu.pipeline.topology.plan import Plan
        from wanwu.pipeline.topology.shm import SlotPool
        from wanwu.pipeline.workers.gpu_feed import CudaFeed
        from wanwu.specs import FrameSpec
        from wanwu.stages.classifier import Classifier
        from wanwu.stages.engines.base import EngineConfig
        from wanwu.stages.models.base import get_model_spec

        model = get_model_spec("efficientnet_lite0")
        plan = Plan(FrameSpec((224, 224, 3)), 1, False, batch, model.name, model.preprocess)
        plan = plan_gpu(plan, DeviceFacts("cuda:0", ipc=True, cupy=True, dali=True), "turbo", "torch", 10**8,
                        GpuSettings(placement="pinned", cuda_graphs=graphs), batch)
        self.batch = batch
        self.pool = SlotPool.create(plan.frame, plan.n_slots)
        self.pool.frames[:] = np.random.default_rng(0).integers(0, 256, self.pool.frames.shape, dtype=np.uint8)
        self.clf = Classifier(model, "torch", EngineConfig(device="cuda:0", max_batch_size=batch))
        self.clf.load()
        self.answered: list[tuple[str, int]] = []  # (first key, records) per answered batch
        self.feed = CudaFeed(plan.gpu, self.pool, self.clf, batch, lambda items: None,
                             lambda items, recs, s: self.answered.append((items[0].key, len(recs))))

    def submit(self, n: int) -> None:
        from wanwu.pipeline.topology.messages import Decoded

        first = (n % 2) * self.batch
        self.feed.submit([Decoded(n * self.batch + i, f"k{n}-{i}", "s", first + i, 224, 224, 0.0, 0, 0)
                          for i in range(self.batch)])

    def close(self) -> None:
        self.feed.close()
        self.clf.shutdown()
        self.pool.close()


def feed_rate(graphs: bool, batch: int = 32, batches: int = 40) -> float:
    """Images per second through the device feed (pinned pool, back-to-back batches, after warm-up)."""
    feed = PinnedFeed(batch, graphs)
    try:
        for n in range(2):
            feed.submit(n)
        feed.feed.flush()
        t = time.perf_counter()
        for n in range(2, 2 + batches):
            feed.submit(n)
        feed.feed.flush()
        return batch * batches / (time.perf_counter() - t)
    finally:
        feed.close()


def overlap_trace(trace_path: Path, batches: int = 8, batch: int = 32, graphs: bool = True) -> dict[str, Any]:
    """Run the inference feed (pinned pool) under torch.profiler; return the streams and overlap seen.

    Returns:
        ``answered`` (records answered while tracing), ``copy_streams`` and ``kernel_streams``
        (CUDA stream ids seen), and ``overlap_us``: total time during which a frame copy
        (pinned host to device) on one stream ran while a kernel ran on another. Small
        uploads that belong to the compute (an index for the fp32 recheck) are not frame copies.
    """
    from torch.profiler import ProfilerActivity, profile

    feed = PinnedFeed(batch, graphs)
    try:
        for n in range(2):  # warm-up: cuDNN picks its algorithms
            feed.submit(n)
        feed.feed.flush()
        feed.answered.clear()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for n in range(2, 2 + batches):  # numbering goes on after the flush, as in the inference process
                feed.submit(n)
            feed.feed.flush()
        prof.export_chrome_trace(str(trace_path))
        answered = sum(k for _, k in feed.answered)
    finally:
        feed.close()
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "Pinned -> Device" in e.get("name", "")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    overlap = 0.0
    for c in copies:
        for k in kernels:
            if c["args"].get("stream") != k["args"].get("stream"):
                start, end = max(c["ts"], k["ts"]), min(c["ts"] + c["dur"], k["ts"] + k["dur"])
                overlap += max(0.0, end - start)
    return {"answered": answered, "copy_streams": sorted({c["args"].get("stream") for c in copies}),
            "kernel_streams": sorted({k["args"].get("stream") for k in kernels}), "overlap_us": overlap,
            "copies": len(copies), "kernels": len(kernels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wanwu.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_trace.json")
    parser.add_argument("--copies", type=int, default=64, help="copies of each sample photo in the corpus")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check needs a CUDA GPU and found none: {reason}. Nothing was measured.", file=sys.stderr)
        return EXIT_NO_GPU
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": {"gpu": torch.cuda.get_device_name(0), "host": platform.node(),
                                          "cpus": os.cpu_count(), "torch": torch.__version__}}
    if not args.skip_tests:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", str(REPO / "tests")],
                              capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
        report["pytest"] = {"rc": proc.returncode, "wall_s": time.perf_counter() - t, "tail": proc.stdout[-3000:]}
    dali = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
    report["rates"] = rows = {}
    report["not_measured"] = not_measured = {}

    def measure(name: str, fn: Callable[[], Any]) -> Any:
        """Run one step; print and save its row now, so a later failure loses nothing measured."""
        try:
            value = fn()
        except Exception as exc:  # the report says what failed and goes on
            logger.exception("%s failed", name)
            value, not_measured[name] = None, f"failed: {type(exc).__name__}: {exc}"
        if isinstance(value, float) or value is None:
            rows[name] = value
            print(f"{name:<34}{'not measured' if value is None else f'{value:.1f}':>14}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return value

    print(f"GPU check on {report['machine']['gpu']}\n{'row':<34}{'images/s':>14}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = photos_corpus(Path(tmp) / "photos", args.copies)
        if dali:
            measure("decode dali cuda:0", lambda: decode_rate("dali", "cuda:0", files))
        else:  # an image without DALI still measures everything else, and says what it left out
            rows["decode dali cuda:0"] = None
            not_measured["decode dali cuda:0"] = "nvidia.dali does not import (the 'dali' extra)"
        measure("decode turbo cpu", lambda: decode_rate("turbo", "cpu", files))
        measure("inference torch cuda:0", lambda: inference_rate("torch", "cuda:0"))
        measure("inference torch cuda:0 batch 256", lambda: inference_rate("torch", "cuda:0", batch=256, batches=10))
        measure("inference auto cpu", lambda: inference_rate("auto", "cpu", batches=3))
        measure("device feed batch 32 eager", lambda: feed_rate(False))
        measure("device feed batch 32 graphs", lambda: feed_rate(True))
        measure("device feed batch 8 eager", lambda: feed_rate(False, batch=8, batches=80))
        measure("device feed batch 8 graphs", lambda: feed_rate(True, batch=8, batches=80))
        runs = {}
        for name, extra in (("cuda:0", ("--device", "cuda:0", "--engine", "torch")), ("cpu", ())):
            runs[name] = run = end_to_end(Path(tmp) / "photos", Path(tmp) / f"{name}.jsonl", *extra)
            report.setdefault("end_to_end", {})[name] = run
            # A worker restart means the run hid a crash (records are still exactly once): not a clean row.
            measure(f"end to end {name}", lambda run=run: run["rate"] if run["rc"] == 0 and not run["restarts"]
                    else None)
            measure(f"once started {name}", lambda run=run: run["started_rate"])
        agree = sum(runs["cuda:0"]["top1"].get(k) == v for k, v in runs["cpu"]["top1"].items())
        report["end_to_end"].update(top1_agree=agree, of=len(runs["cpu"]["top1"]))
    tr = report["trace"] = measure("trace", lambda: overlap_trace(out / "gpu_trace.json")) or {}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    for name, why in not_measured.items():
        print(f"{name}: not measured: {why}")
    if tr:
        print(f"trace: H2D on streams {tr['copy_streams']}, kernels on {tr['kernel_streams']}, "
              f"overlap {tr['overlap_us'] / 1000:.2f} ms")
    print(f"top-1 agreement cuda:0 vs cpu: {agree}/{len(runs['cpu']['top1'])}")
    if "pytest" in report:
        print(f"pytest -m gpu: exit {report['pytest']['rc']}")
    ok = (report.get("pytest", {}).get("rc", 0) == 0 and all(r["rc"] == 0 and not r["restarts"] for r in runs.values())
          and tr.get("overlap_us", 0) > 0 and agree == len(runs["cpu"]["top1"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
