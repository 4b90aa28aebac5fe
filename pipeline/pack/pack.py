"""Packing folders and list files of images into one LMDB archive (``wanwu pack``).

Many small files are slow to open on network and spinning disks; one archive
read by key is not. The archive's keys are the keys the inputs' sources give, so
``wanwu run`` on the archive writes the same keys as on the originals, and its
values are the encoded bytes: unchanged, or (with ``resize_shorter``) large
images shrunk and re-encoded as JPEG.

Layout: a folder holding ``data.mdb`` (``subdir=True``), unless ``out`` ends in
``.mdb``, which makes one file. ``source_kind()`` recognises both. The archive
is built under a hidden temporary name next to ``out`` and renamed into place
once complete and synced, so a crash never leaves a half archive at ``out``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import ContextManager, Iterator

from wanwu.errors import ConfigError, ReadError
from wanwu.pipeline.pack.archive import ArchiveWriter, check_output, publish
from wanwu.pipeline.pack.pool import bounded_map
from wanwu.pipeline.pack.shrink import Shrink
from wanwu.stages.decoders.base import DEFAULT_MAX_PIXELS, max_encoded_bytes
from wanwu.stages.sources.base import Source, SourceItem, job_key, open_byte_source

logger = logging.getLogger(__name__)

_BATCH_ITEMS = 256  # values per write transaction
_DEFAULT_MAP_SIZE_BYTES = 1 << 30  # a first guess; doubled whenever the archive is full
_IN_FLIGHT_PER_WORKER = 32  # jobs queued per worker: bounds memory, keeps workers busy


@dataclass(frozen=True)
class PackStats:
    """What ``pack()`` did."""

    images: int  # values stored in the archive
    bytes_in: int  # encoded bytes read from the inputs
    bytes_out: int  # bytes of the stored values
    errors: int  # inputs unreadable (stored empty), undecodable (stored as is) or left out
    seconds: float  # wall time of the whole pack


@dataclass
class _Tally:
    """Running counts for ``PackStats``."""

    images: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0


@dataclass
class _Packed:
    """One input, ready to store."""

    key: str
    value: bytes
    bytes_in: int
    problem: str | None = None  # why it is not stored as intended, if it is not


class _Loader:
    """Reads one input and shrinks it if asked; runs in a pool worker or inline."""

    def __init__(self, sources: list[Source], shrink: Shrink | None) -> None:
        self.sources = sources  # pickled into each worker; each opens its own files
        self.shrink = shrink

    def __call__(self, job: tuple[int, SourceItem]) -> _Packed:
        index, item = job
        try:
            # Bounded as `wanwu run` bounds it at its default pixel limit: a file larger than any
            # image is not read into memory, nor stored.
            data = bytes(self.sources[index].read(item, max_encoded_bytes(DEFAULT_MAX_PIXELS)))
        except ReadError as exc:
            # Stored empty rather than left out: the archive keeps exactly the
            # inputs' keys, and reading the key from it raises ReadError too.
            return _Packed(item.key, b"", 0, f"unreadable, stored empty: {exc}")
        if self.shrink is None:
            return _Packed(item.key, data, len(data))
        value, problem = self.shrink(data)
        return _Packed(item.key, value, len(data), problem)


def pack(
    inputs: list[str],
    out: str,
    *,
    resize_shorter: int | None = None,
    quality: int = 90,
    workers: int = 0,
    map_size_bytes: int | None = None,
    overwrite: bool = False,
) -> PackStats:
    """Write every image of ``inputs`` into a new LMDB archive at ``out``.

    Args:
        inputs: folders, ``@list.txt`` files or LMDB archives, as ``wanwu run`` takes.
        out: the archive to create: a folder, or a single file if it ends in ``.mdb``.
        resize_shorter: if set, images whose shorter side exceeds it are shrunk to
            it and stored as JPEG (EXIF orientation applied); others, and bytes that
            do not decode, are stored unchanged, so ``wanwu run`` reports the same
            errors on the archive as on the originals.
        quality: JPEG quality (1-100) of shrunk images.
        workers: processes that shrink images; 0 means one per core. Unused
            without ``resize_shorter``, where reading is all the work.
        map_size_bytes: the archive's first map size; it doubles whenever full.
        overwrite: replace an existing archive at ``out``.

    Keys are the sources' keys, UTF-8 (with several inputs, prefixed as
    ``wanwu run`` does). A key seen twice keeps its first value; the others, and
    keys longer than LMDB allows, are left out with a warning and counted in
    ``errors``.

    Raises:
        ConfigError: an argument is invalid, an input is not a source, or ``out``
            exists (without ``overwrite``, or holding files that are not an archive).
    """
    started = time.perf_counter()
    _check_args(inputs, resize_shorter, quality, workers, map_size_bytes)
    out = out.rstrip("/") or out
    subdir = not out.endswith(".mdb")
    check_output(out, overwrite)
    sources = [open_byte_source(location) for location in inputs]
    shrink = Shrink(resize_shorter, quality) if resize_shorter else None
    jobs = _jobs(inputs, sources)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.partial-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        env_path = staging if subdir else os.path.join(staging, "data.mdb")
        with _loaded(_Loader(sources, shrink), jobs, workers) as results:
            tally = _write(env_path, subdir, results, map_size_bytes or _DEFAULT_MAP_SIZE_BYTES)
        for source in sources:
            source.shutdown()  # before replacing out, which may be one of the inputs
        publish(env_path, out, overwrite)
    finally:
        for source in sources:
            source.shutdown()
        if os.path.exists(staging):
            shutil.rmtree(staging)
    stats = PackStats(seconds=time.perf_counter() - started, **asdict(tally))
    logger.info("packed %s into %s: %s", ", ".join(inputs), out, stats)
    return stats


def _jobs(inputs: list[str], sources: list[Source]) -> Iterator[tuple[int, SourceItem]]:
    """Every input item with its archive key.

    With several inputs, the loader's rule (``job_key``): keys of folders
    and archives get the input as a prefix. The same name in two folders then
    does not collide, and ``wanwu run`` gives the same keys on the archive as on
    the inputs.
    """
    several = len(sources) > 1
    for index, (location, source) in enumerate(zip(inputs, sources)):
        for item in source.scan():
            yield index, replace(item, key=job_key(location, item.key, several))


def _check_args(
    inputs: list[str], resize_shorter: int | None, quality: int, workers: int,
    map_size_bytes: int | None,
) -> None:
    if not inputs or not all(isinstance(location, str) for location in inputs):
        raise ConfigError(f"expected a non-empty list of input paths, got {inputs!r}")
    if resize_shorter is not None and resize_shorter < 1:
        raise ConfigError(f"expected resize_shorter >= 1 or None, got {resize_shorter}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"expected 1 <= quality <= 100, got {quality}")
    if workers < 0:
        raise ConfigError(f"expected workers >= 0 (0: one per core), got {workers}")
    if map_size_bytes is not None and map_size_bytes < 1:
        raise ConfigError(f"expected map_size_bytes >= 1 or None, got {map_size_bytes}")


def _loaded(
    loader: _Loader, jobs: Iterator[tuple[int, SourceItem]], workers: int
) -> ContextManager[Iterator[_Packed]]:
    """The loaded inputs, in input order: from a process pool when shrinking."""
    count = workers or os.cpu_count() or 1
    if loader.shrink is None or count == 1:
        return contextlib.nullcontext(map(loader, jobs))
    return bounded_map(loader, jobs, count, count * _IN_FLIGHT_PER_WORKER)


def _write(env_path: str, subdir: bool, results: Iterator[_Packed], map_size_bytes: int) -> _Tally:
    """Store ``results`` in a new archive at ``env_path``; return what was stored."""
    tally = _Tally()
    writer = ArchiveWriter(env_path, subdir, map_size_bytes)
    batch: list[tuple[bytes, bytes]] = []
    finished = False
    try:
        for packed in results:
            tally.bytes_in += packed.bytes_in
            if packed.problem:
                logger.warning("%s: %s", packed.key, packed.problem)
                tally.errors += 1
            key = packed.key.encode("utf-8")
            if len(key) > writer.max_key_bytes:
                logger.warning("%s: left out, key longer than %d bytes", packed.key, writer.max_key_bytes)
                tally.errors += 1
                continue
            batch.append((key, packed.value))
            if len(batch) >= _BATCH_ITEMS:
                _commit(writer, batch, tally)
                batch = []
        _commit(writer, batch, tally)
        finished = True
    finally:
        writer.close(sync=finished)  # an unfinished staging copy is deleted anyway
    return tally


def _commit(writer: ArchiveWriter, batch: list[tuple[bytes, bytes]], tally: _Tally) -> None:
    for (key, value), fresh in zip(batch, writer.put_batch(batch)):
        if fresh:
            tally.images += 1
            tally.bytes_out += len(value)
        else:
            logger.warning("%s: left out, the key was already stored", key.decode("utf-8"))
            tally.errors += 1
