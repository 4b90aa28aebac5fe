"""pack(): real photos and hostile files into a real LMDB archive, and back; its pool."""

from __future__ import annotations

import io
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image, ImageOps

from wanwu.errors import ConfigError, ReadError
from wanwu.pipeline.pack.pack import PackStats, pack
from wanwu.pipeline.pack.pool import bounded_map
from wanwu.stages.sources.base import Source, open_source, source_kind
from wanwu.stages.sources.lmdb import LmdbSource

ORIENTATION = 0x0112


def encode(arr: np.ndarray, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    extra = {"quality": 92} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, fmt, **extra)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skimage.data as data

    root = tmp_path_factory.mktemp("pack") / "photos"
    (root / "子目录 sub").mkdir(parents=True)
    coffee = encode(data.coffee())
    files = {
        "chelsea.jpg": encode(data.chelsea()),  # 451 x 300
        "子目录 sub/咖啡 杯.JPG": coffee,  # 600 x 400
        "宇航员.png": encode(data.astronaut(), "PNG"),  # 512 x 512, not a JPEG
        # 640 x 427 as stored, shown upright as 427 x 640 (EXIF: rotate 90 degrees clockwise).
        "子目录 sub/rocket.Jpeg": encode(data.rocket(), orientation=6),
        "small.jpg": encode(data.chelsea()[::3, ::3]),  # 151 x 100: under any resize here
        "broken.jpg": b"\xff\xd8\xff\xe0 this is not a JPEG",
        "truncated.jpg": coffee[: len(coffee) // 3],  # a large header, then nothing
        "empty.jpg": b"",
        "notes.txt": "不是图片".encode(),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def contents(source: Source) -> dict[str, bytes | None]:
    """Key -> bytes, or None where reading raises ReadError."""
    out: dict[str, bytes | None] = {}
    for item in source.scan():
        try:
            out[item.key] = bytes(source.read(item))
        except ReadError:
            out[item.key] = None
    source.shutdown()
    return out


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


def test_pack_stores_every_file_byte_for_byte(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos.lmdb"
    stats = pack([str(folder)], str(out), map_size_bytes=64 * 1024)  # small: forces growth
    originals = contents(open_source(str(folder)))
    assert len(originals) == 8  # notes.txt is not an image
    assert source_kind(str(out)) == "lmdb" and (out / "data.mdb").is_file()
    archived = contents(open_source(str(out)))
    assert archived == originals  # same keys, same bytes, same unreadable empty file
    on_disk = sum((folder / key).stat().st_size for key in originals)
    assert stats == PackStats(8, on_disk, on_disk, 1, stats.seconds)  # errors: the empty file
    assert not list(tmp_path.glob(".*partial*"))  # the staging folder is gone


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_resizes_large_images_upright_and_keeps_the_rest(
    folder: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "small.mdb"  # ends in .mdb: one file
    stats = pack([str(folder)], str(out), resize_shorter=256, quality=90, workers=workers)
    assert out.is_file() and source_kind(str(out)) == "lmdb"
    source = open_source(str(out))
    assert isinstance(source, LmdbSource)
    archived = contents(source)
    originals = contents(open_source(str(folder)))
    assert archived.keys() == originals.keys()
    upright_sizes = {
        "chelsea.jpg": (385, 256),
        "子目录 sub/咖啡 杯.JPG": (384, 256),
        "宇航员.png": (256, 256),
        "子目录 sub/rocket.Jpeg": (256, 384),  # portrait: the orientation was applied
    }
    for key, size in upright_sizes.items():
        image = decoded(archived[key])
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size), key
        assert ORIENTATION not in image.getexif()  # already upright; nothing to rotate again
        expected = ImageOps.exif_transpose(decoded(originals[key])).convert("RGB")
        expected = np.asarray(expected.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        assert np.abs(np.asarray(image, dtype=np.float32) - expected).mean() < 4.0, key
    for key in ("small.jpg", "broken.jpg", "truncated.jpg"):
        assert archived[key] == originals[key], key  # stored as they were
    assert archived["empty.jpg"] is None  # unreadable on both sides
    assert stats.images == 8 and stats.errors == 3  # broken, truncated, empty
    assert stats.bytes_out == sum(len(v) for v in archived.values() if v)
    assert stats.bytes_out < stats.bytes_in


def test_pack_from_a_list_and_several_inputs(folder: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listed = [os.path.relpath(folder / name, tmp_path) for name in ("chelsea.jpg", "small.jpg")]
    listing.write_text(f"{listed[0]}\n# skip\n{listed[1]}\n", encoding="utf-8")
    single = tmp_path / "list.lmdb"
    pack([f"@{listing}"], str(single))
    assert contents(open_source(str(single))) == contents(open_source(f"@{listing}"))
    # Several inputs: folder keys get the folder as a prefix, as `wanwu run` gives them.
    several = tmp_path / "several.lmdb"
    stats = pack([str(folder), f"@{listing}"], str(several))
    keys = set(contents(open_source(str(several))))
    assert keys == {f"{folder}/{key}" for key in contents(open_source(str(folder)))} | set(listed)
    assert stats.images == 10
    # The same key twice keeps the first value and counts the second as an error.
    stats = pack([f"@{listing}", f"@{listing}"], str(tmp_path / "twice.lmdb"))
    assert (stats.images, stats.errors) == (2, 2)


def test_existing_output_is_refused_unless_overwrite(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.lmdb"
    pack([str(folder)], str(out))
    with pytest.raises(ConfigError, match="already exists"):
        pack([str(folder)], str(out))
    stats = pack([str(folder)], str(out), resize_shorter=256, workers=1, overwrite=True)
    assert contents(open_source(str(out))).keys() == contents(open_source(str(folder))).keys()
    env = lmdb.open(str(out), readonly=True, lock=False)
    assert env.stat()["entries"] == stats.images
    env.close()
    # A folder holding anything but an archive is never written into, nor deleted.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match="folder holding"):
        pack([str(folder)], str(keep), overwrite=True)
    assert (keep / "mine.txt").exists()


@pytest.mark.parametrize(
    "kwargs", [{"quality": 0}, {"resize_shorter": 0}, {"workers": -1}, {"map_size_bytes": 0}]
)
def test_bad_arguments_are_config_errors(folder: Path, tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        pack([str(folder)], str(tmp_path / "x.lmdb"), **kwargs)
    with pytest.raises(ConfigError):
        pack([], str(tmp_path / "x.lmdb"))


def _square_or_fail(x: int) -> int:
    if x == -1:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dying as a segfaulting codec would
    if x == -2:
        raise ValueError("bad job -2")
    return x * x


def test_a_full_disk_fails_the_pack_with_the_reason_and_leaves_nothing(folder: Path, tmp_path: Path) -> None:
    from conftest import run_on_a_full_disk

    disk = tmp_path / "disk"
    proc = run_on_a_full_disk(disk, "64k", "pack", str(folder), str(disk / "photos.lmdb"),
                              then=f"echo left: $(ls -A {disk})")
    assert proc.returncode == 1, proc.stderr
    assert "cannot write the archive" in proc.stderr and "is its disk full?" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "left:", proc.stdout  # no staging copy left behind


def test_bounded_map_keeps_order_and_surfaces_failures() -> None:
    with bounded_map(_square_or_fail, iter(range(50)), processes=2, in_flight=8, chunksize=2) as results:
        assert list(results) == [x * x for x in range(50)]
    with bounded_map(_square_or_fail, [1, 2, -2, 3], processes=2, in_flight=4, chunksize=1) as results:
        assert next(results) == 1
        with pytest.raises(ValueError, match="bad job"):
            list(results)
    # A dead worker is an error, not a job that never finishes.
    with bounded_map(_square_or_fail, [1, -1, 2], processes=1, in_flight=3, chunksize=1) as results:
        with pytest.raises(BrokenProcessPool):
            list(results)
