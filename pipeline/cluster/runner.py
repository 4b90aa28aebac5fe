"""``wanwu run --ray``: the batch job on a Ray cluster, through Ray Data, still exactly once.

Dataflow (Ray Data's streaming executor; nothing is materialised)::

    driver: scan keys -> shards --read tasks (CPU): read + decode a shard--> frames (object store)
        --> classifier actors (CPU or GPU) --> records (JSON text) --> driver: the sink (the ledger)

The driver owns the ledger, as the loader and sink of ``wanwu run`` do: the output
file gives the keys already done (skipped at planning time), every record is
written once whatever Ray retries (a key already written is dropped), and a rerun
resumes. Each row carries its shard and the shard's row count, so the driver
knows which shards are complete. Ray retries a read task whose worker died and a
batch whose actor died; a shard that still fails (Ray gave up on it) is read again
input by input in a second round, and an input whose shard fails again gets an
error record, so one image that kills the process decoding it costs only itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from wanwu.errors import ConfigError, StageError
from wanwu.pipeline.cluster.shards import Shard, plan_shards, shard_key, split_shard
from wanwu.pipeline.cluster.tasks import ClassifierActor, read_shard
from wanwu.pipeline.config import JobConfig, cpu_count
from wanwu.pipeline.run.job import JobResult
from wanwu.pipeline.run.progress import Progress
from wanwu.records import Record
from wanwu.stages.decoders.base import resolve_decoder_name
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sinks.base import Sink, create_sink
from wanwu.stages.sources.base import Source, open_source

logger = logging.getLogger(__name__)

ROUNDS = 2  # whole shards, then what is left of a failed shard input by input; then blame
RAMP_SHARD_SIZE = 64  # inputs in each of the first shards
CONNECT_TIMEOUT_S = 10.0  # for the head of a HOST:PORT cluster to accept a connection
READ_RETRIES = 3  # Ray's retries of a read task (or an actor's batch) whose process died


@dataclass(frozen=True)
class RayConfig:
    """How the job uses the cluster; the stages' own settings stay in ``JobConfig``."""

    address: str  # "local" (a Ray instance started for this job), "auto", "HOST:PORT" or "ray://HOST:PORT"
    actors: int = 0  # classifier actors; 0: one per GPU given with actor_gpus, else one per 4 cluster CPUs
    actor_cpus: float = 1.0  # CPUs each actor reserves
    actor_gpus: float = 0.0  # GPUs each actor reserves (its engine then runs on "cuda:0", its first)
    shard_size: int = 1000  # inputs per shard (per read task)
    block_rows: int = 64  # rows per block a read task yields: 64 frames of 224 x 224 x 3 are 9.2 MiB

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError("expected --ray local, auto, HOST:PORT or ray://HOST:PORT, got ''")
        for name in ("actors", "actor_cpus", "actor_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--ray-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.shard_size <= 0 or self.block_rows <= 0:
            raise ConfigError(f"expected a positive shard size and block rows, got {self.shard_size}, {self.block_rows}")


def connect(address: str) -> None:
    """Join the cluster at ``address``, or start one on this machine for ``local`` (127.0.0.1 only)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report to the outside world
    if address == "local":
        # One machine: Ray then advertises the loopback address, not the host's network one
        # (read when Ray is imported, and by the processes it starts).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray Data: pip install 'wanwu[ray]'") from exc
    if ray.is_initialized():
        return
    _check_reachable(address)
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(num_cpus=cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise StageError(f"expected a Ray cluster at {address!r}, could not join it: {exc}") from exc


def _check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """For HOST:PORT, a TCP connection to the head first: ray.init waits minutes on an address
    where nothing answers; this says so within ``timeout_s``."""
    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return  # "local", "auto", "ray://...": Ray finds or starts the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise StageError(f"expected a Ray cluster at {address!r}, nothing answers there: {exc}") from exc


class ClusterJob:
    """One ``wanwu run --ray``. Use ``run()``; it leaves the cluster as it found it."""

    def __init__(self, cfg: JobConfig, ray_cfg: RayConfig) -> None:
        if cfg.cache:
            raise ConfigError("--cache is not used with --ray (each node would need the same cache); drop one")
        if cfg.duration_s:
            raise ConfigError("--duration is for live streams, which --ray does not read")
        self.cfg, self.ray_cfg = cfg, ray_cfg
        self.model = get_model_spec(cfg.model, **cfg.model_options())
        self.sources: list[Source] = []
        for location in cfg.inputs:
            source = open_source(location, self.model.preprocess)
            if not isinstance(source, Source):
                raise ConfigError(f"--ray reads folders, LMDB archives and list files of images, got {location!r} "
                                  f"(a {source.kind} stream: use wanwu run or wanwu serve --camera)")
            self.sources.append(source)
        # Read tasks decode on CPUs, whatever device the actors' engines use.
        self.decoder = resolve_decoder_name(cfg.decoder, "cpu")
        self.decode = dataclasses.replace(cfg.decode_config(self.model.preprocess), device="cpu")
        self.result = JobResult("failed")
        self._signals = 0
        self.done: set[str] = set()  # the ledger: keys in the output, those of earlier runs and this one's

    def run(self) -> JobResult:
        cfg = self.cfg
        sink = create_sink(cfg.out)
        self.result.retried = sink.drop_errors() if cfg.retry_errors else 0
        self.done = sink.open(ledger=True)  # repairs a torn tail left by a crash
        self.result.skipped, self.result.prior_errors = len(self.done), sink.prior_errors
        sink.shutdown()
        # The driver keeps the keys itself (self.done): a sink without a ledger holds none,
        # so each key is in the driver's memory once.
        sink = create_sink(cfg.out)
        sink.open(ledger=False)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        started = self._started = time.perf_counter()
        progress = Progress(cfg.progress, cfg.log_interval_s, self.result.skipped)
        try:
            connect(self.ray_cfg.address)
            shards = list(plan_shards(cfg.inputs, self.sources, self.done, self.ray_cfg.shard_size,
                                      ramp=self._ramp()))
            self.result.total = sum(s.planned for s in shards)
            self._rounds(shards, sink, progress)
            if self.result.status != "interrupted":
                self.result.status = "finished"
        except StageError as exc:
            self.result.failure = str(exc)
        finally:
            self.result.elapsed_s = time.perf_counter() - started
            progress.finish(self.result.ok, self.result.errors, self.result.total)
            progress.close()
            sink.shutdown()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self._disconnect()
        return self.result

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1

    def _disconnect(self) -> None:
        ray = sys.modules.get("ray")  # absent when Ray is not installed or was never reached
        if ray is not None and ray.is_initialized():
            ray.shutdown()

    # ---- rounds

    def _rounds(self, shards: list[Shard], sink: Sink, progress: Progress) -> None:
        """Whole shards; a shard Ray gave up on again input by input; what fails then, blamed."""
        next_index = max((s.index for s in shards), default=-1) + 1
        for round_number in range(1, ROUNDS + 1):
            if not shards or self._signals:
                break
            complete = self._round(shards, sink, progress)
            failed = [s for s in shards if s.index not in complete]
            if not failed or self._signals:
                break
            logger.warning("round %d: %d of %d shards did not complete (Ray gave up on them)", round_number,
                           len(failed), len(shards))
            if round_number == ROUNDS:
                self._blame(failed, sink)
                break
            shards = []
            for shard in failed:
                source, location = self.sources[shard.input_index], self.cfg.inputs[shard.input_index]
                shards += split_shard(shard, source, location, len(self.sources) > 1, self.done,
                                      next_index + len(shards))
            next_index += len(shards)
        if self._signals:
            self.result.status = "interrupted"

    def _round(self, shards: Sequence[Shard], sink: Sink, progress: Progress) -> set[int]:
        """Run ``shards`` through Ray Data, write their records; return the shards that completed."""
        import ray.data

        cfg, rc = self.cfg, self.ray_cfg
        # Ray Data logs its plans and timings at INFO and warns that its progress bars are off;
        # a shard it gives up on is still logged, at ERROR. (Set here: importing ray.data resets it.)
        logging.getLogger("ray.data").setLevel(logging.ERROR if logger.getEffectiveLevel() > logging.INFO
                                               else logging.INFO)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver draws its own
        context.max_errored_blocks = -1  # a shard Ray gave up on is read again input by input, not the job's end
        datasource = _datasource_class()(shards, cfg.inputs, self.sources, self.decoder, self.decode, self.model.name,
                                         rc.block_rows)
        actors, device = self._actors()
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for retries yet and warns that ray_remote_args will go (in 2.64).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            dataset = ray.data.read_datasource(
                datasource, override_num_blocks=len(shards), num_cpus=1,
                # Ray Data retries a task whose worker died forever; an image that kills its decoder
                # would then stall the job. Three retries, then the next round reads it alone.
                ray_remote_args={"max_retries": READ_RETRIES},
            ).map_batches(
                ClassifierActor, fn_constructor_kwargs={"cfg": cfg, "device": device}, batch_size=cfg.batch_size,
                batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=rc.actor_cpus,
                num_gpus=rc.actor_gpus or None, max_restarts=-1, max_task_retries=READ_RETRIES,
            )
        counts: dict[int, list] = {}  # shard -> [its row count, keys seen]
        complete: set[int] = set()
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                self._take(batch, sink, counts, complete)
                progress.update(self.result.ok, self.result.errors, self.result.total)
                if self._signals:
                    logger.warning("stopping: what was written stays; run the same command again to resume")
                    break
        except Exception as exc:  # Ray Data's own failure (an actor that cannot start, a lost cluster)
            if self._signals:
                return complete
            raise StageError(f"the Ray Data pipeline failed: {type(exc).__name__}: {exc}") from exc
        return complete

    def _take(self, batch: dict[str, Any], sink: Sink, counts: dict[int, list], complete: set[int]) -> None:
        """Write the batch's new records (each key once) and note which shards it completes."""
        new = []
        for shard, total, key, text in zip(batch["shard"].tolist(), batch["total"].tolist(), batch["key"],
                                           batch["record"]):
            entry = counts.setdefault(shard, [total, set()])
            entry[1].add(key)
            if len(entry[1]) == entry[0]:
                complete.add(shard)
                del counts[shard]
            if key in self.done:
                continue  # a retried task's row, or a path listed twice
            self.done.add(key)
            new.append(json.loads(text))
        if new:
            sink.write(new)
            if self.result.first_record_s is None:
                self.result.first_record_s = time.perf_counter() - self._started
            errors = sum(1 for r in new if r["error"] is not None)
            self.result.errors += errors
            self.result.ok += len(new) - errors

    def _blame(self, failed: Sequence[Shard], sink: Sink) -> None:
        """Error records for the inputs of shards that failed read alone too: each killed its process."""
        several, records = len(self.sources) > 1, []
        why = StageError("the process reading and decoding this input died every time Ray ran it "
                         f"({READ_RETRIES + 1} attempts in each of {ROUNDS} rounds)")
        for shard in failed:
            source, location = self.sources[shard.input_index], self.cfg.inputs[shard.input_index]
            for item in source.scan_range(shard.start, shard.stop):
                key = shard_key(location, item, several)
                if key not in self.done:
                    self.done.add(key)
                    records.append(Record.failure(key, item.source, self.model.name, why, time.time()))
        if records:
            sink.write(records)
            self.result.errors += len(records)

    def _ramp(self) -> tuple[int, int]:
        """Four small shards per cluster CPU first (see ``plan_shards``)."""
        import ray

        return 4 * max(1, int(ray.cluster_resources().get("CPU", 1))), RAMP_SHARD_SIZE

    def _actors(self) -> tuple[int, str]:
        """How many classifier actors, and the device their engines run on."""
        import ray

        rc = self.ray_cfg
        device = "cuda:0" if rc.actor_gpus > 0 else self.cfg.device
        if rc.actors:
            return rc.actors, device
        resources = ray.cluster_resources()
        if rc.actor_gpus > 0:
            return max(1, int(resources.get("GPU", 0) // rc.actor_gpus)), device
        return max(1, int(resources.get("CPU", 1)) // 4), device


@functools.cache
def _datasource_class() -> type:
    """A Ray Data datasource of shards, one read task each (``tasks.read_shard``); built on Ray's base
    class on first use, so importing this module needs no Ray."""
    import numpy as np
    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read(shard: Shard, location: str, source: Source, several: bool, decoder: str, decode: Any,
             model_name: str, block_rows: int) -> Any:
        for rows in read_shard(shard, location, source, several, decoder, decode, model_name, block_rows):
            yield BlockAccessor.batch_to_block(rows)

    class ShardDatasource(Datasource):
        def __init__(self, shards: Sequence[Shard], inputs: Sequence[str], sources: Sequence[Source], decoder: str,
                     decode: Any, model_name: str, block_rows: int) -> None:
            super().__init__()
            self.shards, self.inputs, self.sources = list(shards), list(inputs), list(sources)
            self.decoder, self.decode, self.model_name, self.block_rows = decoder, decode, model_name, block_rows
            self.frame_bytes = int(np.prod(decode.preprocess.frame.shape))

        def estimate_inmemory_data_size(self) -> int:
            return sum(s.planned for s in self.shards) * self.frame_bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list:
            several = len(self.sources) > 1
            tasks = []
            for shard in self.shards:
                fn = functools.partial(read, shard, self.inputs[shard.input_index], self.sources[shard.input_index],
                                       several, self.decoder, self.decode, self.model_name, self.block_rows)
                meta = BlockMetadata(num_rows=shard.planned, size_bytes=shard.planned * self.frame_bytes,
                                     input_files=None, exec_stats=None)
                tasks.append(ReadTask(fn, meta, per_task_row_limit=per_task_row_limit))
            return tasks

    return ShardDatasource


def run_cluster_job(cfg: JobConfig, ray_cfg: RayConfig) -> JobResult:
    """Run the batch job described by ``cfg`` on the Ray cluster ``ray_cfg`` names, to the end."""
    if not cfg.inputs:
        raise ConfigError("expected at least one input, got none")
    return ClusterJob(cfg, ray_cfg).run()
