"""What runs on the cluster's workers: the read task of a shard and the classifier actor.

Both wrap the stages as they are. A read task scans its shard's range, reads the
bytes and decodes them with the job's decoder (on a CPU, libjpeg-turbo's DCT-domain
downscaling), so what enters Ray's object store is the model-sized frame (224 x
224 x 3 bytes for the embedded model), never the photo. Each row also carries its
shard and the shard's row count, which is how the driver knows a shard is
complete. An input that cannot be read or decoded becomes its error record here,
as in ``wanwu run``. The classifier actor is the classifier stage: frames in,
records out (as JSON text: nothing but text goes back to the driver).
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator, Sequence

import numpy as np

from wanwu.errors import InputError, ReadError
from wanwu.pipeline.cluster.shards import Shard, shard_key
from wanwu.records import Item, Record
from wanwu.stages.decoders.base import DecodeConfig, create_decoder, max_encoded_bytes
from wanwu.stages.sources.base import Source

COLUMNS = ("shard", "total", "key", "source", "width", "height", "t0", "error", "frame")
OUT_COLUMNS = ("shard", "total", "key", "record")


def record_text(record: Record) -> str:
    """A record as one line of JSON, as it travels back to the driver."""
    return json.dumps(record.to_dict(), ensure_ascii=False)


def read_shard(shard: Shard, location: str, source: Source, several_inputs: bool, decoder: str,
               decode: DecodeConfig, model_name: str, block_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of ``COLUMNS`` for every input of ``shard`` not in its ``skip``, ``block_rows`` at a time.

    Failed inputs get a zero frame and their error record as JSON in ``error``; the
    others an empty ``error``. A key listed twice in the range is read once.
    """
    items, keys = [], set()
    for item in source.scan_range(shard.start, shard.stop):
        key = shard_key(location, item, several_inputs)
        if key not in shard.skip and key not in keys:
            keys.add(key)
            items.append((item, key))
    del keys
    stage = create_decoder(decoder, decode)
    shape = stage.output_spec().shape
    try:
        for begin in range(0, len(items), block_rows):
            yield _block(shard, len(items), items[begin:begin + block_rows], source, stage, shape, model_name)
    finally:
        stage.shutdown()
        source.shutdown()


def _block(shard: Shard, total: int, chunk: Sequence[tuple[Any, str]], source: Source, stage: Any,
           shape: tuple[int, ...], model_name: str) -> dict[str, np.ndarray]:
    n = len(chunk)
    frames = np.zeros((n, *shape), np.uint8)
    width, height, t0 = np.full(n, -1, np.int32), np.full(n, -1, np.int32), np.zeros(n, np.float64)
    errors = [""] * n
    datas, rows = [], []
    for row, (item, key) in enumerate(chunk):
        t0[row] = time.time()
        try:
            datas.append(source.read(item, max_encoded_bytes(stage.cfg.max_pixels)))
            rows.append(row)
        except ReadError as exc:
            errors[row] = record_text(Record.failure(key, item.source, model_name, exc, t0[row]))
    outcomes = stage.decode_batch_into(datas, [frames[row] for row in rows])
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, InputError):
            item, key = chunk[row]
            errors[row] = record_text(Record.failure(key, item.source, model_name, outcome, t0[row]))
        else:
            width[row], height[row] = outcome.width, outcome.height
    return {
        "shard": np.full(n, shard.index, np.int64), "total": np.full(n, total, np.int64),
        "key": np.array([key for _, key in chunk], dtype=object),
        "source": np.array([item.source for item, _ in chunk], dtype=object),
        "width": width, "height": height, "t0": t0, "error": np.array(errors, dtype=object), "frame": frames,
    }


class ClassifierActor:
    """The classifier stage in a Ray actor: batches of read-task rows in, rows of ``OUT_COLUMNS`` out.

    Args:
        cfg: the job's ``JobConfig`` (model, engine, precision, top-k).
        device: where this actor's engine runs ("cpu", or "cuda:0": Ray shows an actor
            only the GPUs it was given, so its first is "cuda:0").
    """

    def __init__(self, cfg: Any, device: str) -> None:
        import dataclasses

        from wanwu.stages.classifier import Classifier
        from wanwu.stages.models.base import get_model_spec

        spec = get_model_spec(cfg.model, **cfg.model_options())
        engine_cfg = dataclasses.replace(cfg.engine_config(), device=device)
        self.classifier = Classifier(spec, cfg.engine, engine_cfg, cfg.top_k)
        self.classifier.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"]
        good = np.flatnonzero(errors == "")
        records = np.array(errors, dtype=object)  # an error row's record is already written
        if len(good):
            items = [Item(batch["key"][i], batch["source"][i], int(batch["width"][i]), int(batch["height"][i]),
                          float(batch["t0"][i])) for i in good]
            frames = np.ascontiguousarray(batch["frame"][good])
            for i, record in zip(good, self.classifier.classify(frames, items)):
                records[i] = record_text(record)
        return {"shard": batch["shard"], "total": batch["total"], "key": batch["key"], "record": records}
