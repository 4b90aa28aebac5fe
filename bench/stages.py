"""Each stage alone with all cores, configured as ``wanwu run`` configures it.

From these two rates follows the machine's limit for a whole job: when decode
and inference share the same cores, images/s cannot exceed
``1 / (1 / decode_rate + 1 / inference_rate)``. Each job has the limit of its own
stages: a job on a packed LMDB archive decodes its smaller JPEGs, so its limit
takes the decode rate of the archive's values, not of the original files.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def limit(decode_rate: float, inference_rate: float) -> float:
    """Images/s the machine can reach when both stages share its cores."""
    return 1.0 / (1.0 / decode_rate + 1.0 / inference_rate)


def _decode_share(args: tuple[list[bytes], str, str]) -> float:
    datas, decoder_name, model_name = args
    from wanwu.stages.decoders.base import DecodeConfig, create_decoder
    from wanwu.stages.models.base import get_model_spec

    pre = get_model_spec(model_name).preprocess
    decoder = create_decoder(decoder_name, DecodeConfig(pre))
    out = np.empty(pre.frame.shape, np.uint8)
    t0 = time.perf_counter()
    for data in datas:
        decoder.decode_into(data, out)
    return time.perf_counter() - t0


def decode_rate(paths: Sequence[Path], processes: int, decoder: str = "auto",
                model: str = "efficientnet_lite0") -> float:
    """Images/s of ``processes`` decoder processes splitting the corpus (bytes already in memory)."""
    return decode_bytes_rate([Path(p).read_bytes() for p in paths], processes, decoder, model)


def archive_values(location: str) -> list[bytes]:
    """Every value of the byte source at ``location`` (e.g. a packed LMDB archive), in its order."""
    from wanwu.stages.sources.base import open_byte_source

    source = open_byte_source(location)
    try:
        return [bytes(source.read(item)) for item in source.scan()]
    finally:
        source.shutdown()


def decode_bytes_rate(datas: Sequence[bytes], processes: int, decoder: str = "auto",
                      model: str = "efficientnet_lite0") -> float:
    """Images/s of ``processes`` decoder processes splitting the encoded images ``datas``."""
    datas = list(datas)
    shares = [(datas[i::processes], decoder, model) for i in range(processes)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        pool.map(_decode_share, [(s[0][:2], decoder, model) for s in shares])  # warm-up: imports
        t0 = time.perf_counter()
        pool.map(_decode_share, shares)
        return len(datas) / (time.perf_counter() - t0)


def inference_rate(n_images: int, batch_size: int = 32, engine: str = "auto", threads: int = 0,
                   model: str = "efficientnet_lite0", sample: Sequence[Path] = (),
                   precision: str = "auto") -> tuple[float, str]:
    """Images/s of the classifier stage alone on ``n_images`` in batches; returns (rate, "engine precision").

    The batches hold the decoded pixels of ``sample`` (cycled), not one batch again and
    again: with ``--precision auto`` the cost depends on how many images are near ties.
    The classifier is timed as the inference process runs it: engine, top-k and records.
    """
    from wanwu.records import Item
    from wanwu.stages.classifier import Classifier
    from wanwu.stages.decoders.base import DecodeConfig, create_decoder
    from wanwu.stages.engines.base import EngineConfig
    from wanwu.stages.models.base import get_model_spec

    spec = get_model_spec(model)
    sample = list(sample)[:n_images]
    pixels = np.zeros((max(batch_size, len(sample)), *spec.preprocess.frame.shape), np.uint8)
    decoder = create_decoder("turbo", DecodeConfig(spec.preprocess))
    for i, path in enumerate(sample):  # real pixels, not zeros
        decoder.decode_into(Path(path).read_bytes(), pixels[i])
    starts = range(0, len(pixels) - batch_size + 1, batch_size)
    batches = [np.ascontiguousarray(pixels[s:s + batch_size]) for s in starts]
    items = [Item(f"{i}", "bench", 224, 224, 0.0) for i in range(batch_size)]
    classifier = Classifier(spec, engine, EngineConfig(precision=precision, threads=threads, max_batch_size=batch_size))
    classifier.load()
    classifier.classify(batches[0], items)
    n_batches = max(1, -(-n_images // batch_size))
    t0 = time.perf_counter()
    for i in range(n_batches):
        classifier.classify(batches[i % len(batches)], items)
    rate = n_batches * batch_size / (time.perf_counter() - t0)
    label = f"{classifier.engine_name} {classifier.precision}"
    classifier.shutdown()
    return rate, label


def api_rate(paths: Sequence[Path], options: dict) -> float:
    """Images/s of ``wanwu.Recognizer.map`` over ``paths``, timed once the model is loaded.

    Raises:
        SystemExit: an image got no answer (an error record): the rate would be of another job.
    """
    from wanwu import Recognizer

    with Recognizer(**options) as wanwu:
        t0 = time.perf_counter()
        errors = [r.error for r in wanwu.map(paths) if r.error is not None]
        rate = len(paths) / (time.perf_counter() - t0)
    if errors:
        raise SystemExit(f"expected every image recognised by the Python API, got {len(errors)} errors: {errors[0]}")
    return rate


def precision_agreement(paths: Sequence[Path], precisions: Sequence[str], engine: str = "openvino",
                        model: str = "efficientnet_lite0", batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Top-1 agreement with fp32 of each of ``precisions`` on ``paths``, decoded as the pipeline does.

    Returns:
        ``{precision: {"top1_agreement": 0..1, "rechecked": share recomputed in fp32}}``; fp32 agrees
        with itself. Int8 quantizes here on a cold cache, so the timed rows find it cached.
    """
    from wanwu.stages.classifier import Classifier
    from wanwu.stages.engines.base import EngineConfig
    from wanwu.stages.models.base import get_model_spec
    from wanwu.stages.models.check import compare, decode_batch

    spec = get_model_spec(model)
    pixels = decode_batch(paths, spec)

    def logits(precision: str) -> tuple[np.ndarray, float]:
        classifier = Classifier(spec, engine, EngineConfig(precision=precision, max_batch_size=batch_size))
        classifier.load()
        classifier.engine.rechecked = 0  # not the warm-up's
        out = np.concatenate([classifier.logits(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
        rechecked = classifier.engine.rechecked / len(pixels)
        classifier.shutdown()
        return out, rechecked

    reference, _ = logits("fp32")
    result = {}
    for precision in precisions:
        out, rechecked = logits(precision) if precision != "fp32" else (reference, 0.0)
        result[precision] = {"top1_agreement": compare(out, reference)[0], "rechecked": rechecked}
    return result
