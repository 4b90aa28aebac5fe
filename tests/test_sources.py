"""Sources driven by hand over real files, real list files and a real LMDB archive."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import lmdb
import pytest

from wanwu.errors import ConfigError, ReadError
from wanwu.stages.sources.base import SOURCES, Source, SourceItem, open_source, source_kind
from wanwu.stages.sources.folder import FolderSource
from wanwu.stages.sources.listfile import ListFileSource
from wanwu.stages.sources.lmdb import LmdbSource

# key -> content; the folder scan must find exactly these, in this order.
IMAGES = {
    "a.jpg": b"\xff\xd8 a",
    "b.JPG": b"\xff\xd8 b",
    "c d.Jpeg": b"\xff\xd8 c d",
    "sub/deeper/z.png": b"\x89PNG z",
    "sub/x.webp": b"RIFF x",
    "zz.tiff": b"II* zz",
    "子目录 一/猫 咪.jpg": "猫".encode(),
    "火箭.GIF": b"GIF89a",
}
NOT_IMAGES = ["notes.txt", "README", "sub/x.jpg.bak", "子目录 一/.jpg", "sub/archive.tar.gz"]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name, data in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name in NOT_IMAGES:
        (root / name).write_bytes(b"not an image")
    return root


def read_all(source: Source) -> dict[str, bytes]:
    return {item.key: bytes(source.read(item)) for item in source.scan()}


def test_registry_builds_every_kind() -> None:
    assert SOURCES.names() == ["folder", "list", "lmdb"]
    for name in SOURCES.names():
        assert SOURCES.get(name).kind == name


def test_folder_finds_images_at_any_depth_in_name_order(tree: Path) -> None:
    source = open_source(str(tree))
    assert isinstance(source, FolderSource)
    items = list(source.scan())
    # Name order at each level: "a.jpg" < ... < "sub" < "zz.tiff" < "子目录 一" < "火箭.GIF".
    assert [item.key for item in items] == [
        "a.jpg", "b.JPG", "c d.Jpeg", "sub/deeper/z.png", "sub/x.webp", "zz.tiff",
        "子目录 一/猫 咪.jpg", "火箭.GIF",
    ]
    assert [item.key for item in source.scan()] == [item.key for item in items]
    for item in items:
        assert item.source == str(tree)
        assert os.path.isabs(item.locator)
        assert item.locator == str(tree / item.key)
    assert read_all(source) == IMAGES


def test_folder_reads_symlinked_files_but_does_not_enter_symlinked_folders(tree: Path) -> None:
    (tree / "link.jpg").symlink_to(tree / "a.jpg")
    (tree / "loop").symlink_to(tree, target_is_directory=True)  # would never end if followed
    (tree / "dangling.jpg").symlink_to(tree / "gone.jpg")
    source = FolderSource(str(tree))
    keys = [item.key for item in source.scan()]
    assert "link.jpg" in keys and not any(key.startswith("loop/") for key in keys)
    items = {item.key: item for item in source.scan()}
    assert source.read(items["link.jpg"]) == IMAGES["a.jpg"]
    # A dangling link is an input that cannot be read, not one that silently vanishes.
    with pytest.raises(ReadError, match="dangling.jpg"):
        source.read(items["dangling.jpg"])


def test_undecodable_file_name_gets_a_utf8_key_and_stays_readable(tree: Path) -> None:
    with open(os.fsencode(tree) + b"/bad\xff name.jpg", "wb") as f:
        f.write(b"bytes")
    source = FolderSource(str(tree))
    item = next(i for i in source.scan() if i.key.startswith("bad"))
    assert item.key == "bad\\xff name.jpg"  # a backslash escape: sinks can write it
    item.key.encode("utf-8")
    assert source.read(item) == b"bytes"


def test_empty_file_raises_read_error(tree: Path) -> None:
    (tree / "empty.jpg").write_bytes(b"")
    source = FolderSource(str(tree))
    item = next(i for i in source.scan() if i.key == "empty.jpg")
    with pytest.raises(ReadError, match=r"is empty \(0 bytes\)"):
        source.read(item)


def test_vanished_file_raises_read_error_naming_path_and_cause(tree: Path) -> None:
    source = FolderSource(str(tree))
    item = next(i for i in source.scan() if i.key == "a.jpg")
    (tree / "a.jpg").unlink()  # deleted between scan and read
    with pytest.raises(ReadError, match=r"a\.jpg.*No such file or directory"):
        source.read(item)


def test_fifo_named_like_an_image_is_skipped_and_cannot_hang_read(tree: Path) -> None:
    os.mkfifo(tree / "pipe.jpg")
    source = FolderSource(str(tree))
    assert "pipe.jpg" not in {item.key for item in source.scan()}
    with pytest.raises(ReadError, match="regular file"):
        source.read(SourceItem("pipe.jpg", str(tree), str(tree / "pipe.jpg")))


def test_a_file_larger_than_the_bound_is_refused_unread(tree: Path) -> None:
    os.truncate(tree / "a.jpg", 3 << 30)  # 3 GiB, sparse: read whole, it would take 3 GiB of memory
    source = FolderSource(str(tree))
    item = next(i for i in source.scan() if i.key == "a.jpg")
    with pytest.raises(ReadError, match=r"at most 1,048,576 bytes.*a\.jpg.* of 3,221,225,472 bytes; not read"):
        source.read(item, 1 << 20)
    (tree / "a.jpg").write_bytes(b"x" * 100)
    assert source.read(item, 100) == b"x" * 100  # the bound itself is allowed


def test_folder_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable folder"):
        list(FolderSource(str(tmp_path / "nope")).scan())


def test_list_file(tree: Path, tmp_path: Path) -> None:
    listing = tree / "lists" / "todo.txt"
    listing.parent.mkdir()
    absolute = str(tree / "sub" / "x.webp")
    listing.write_text(
        "\n".join([
            "# photos to do",
            "../a.jpg",  # relative to the list file's folder, not the working directory
            "",
            "   ../子目录 一/猫 咪.jpg  ",  # surrounding white space is not part of the path
            absolute,
            "../a.jpg",  # listed twice: yielded once
            "../missing.jpg",
            "   # an indented comment",
        ]) + "\n",
        encoding="utf-8",
    )
    source = open_source(f"@{listing}")
    assert isinstance(source, ListFileSource)
    items = list(source.scan())
    assert [item.key for item in items] == ["../a.jpg", "../子目录 一/猫 咪.jpg", absolute, "../missing.jpg"]
    assert all(item.source == str(listing) and os.path.isabs(item.locator) for item in items)
    assert source.read(items[0]) == IMAGES["a.jpg"]
    assert source.read(items[1]) == IMAGES["子目录 一/猫 咪.jpg"]
    assert source.read(items[2]) == IMAGES["sub/x.webp"]
    with pytest.raises(ReadError, match="missing.jpg"):
        source.read(items[3])


def test_list_file_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="list file"):
        list(ListFileSource(str(tmp_path / "nope.txt")).scan())


def make_lmdb(path: Path, entries: dict[str, bytes], subdir: bool = True) -> None:
    env = lmdb.open(str(path), subdir=subdir, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode("utf-8"), value)
    env.close()


@pytest.mark.parametrize("name", ["archive.lmdb", "archive.mdb"])
def test_lmdb_scan_in_key_order_and_read(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    make_lmdb(path, IMAGES, subdir=name.endswith(".lmdb"))
    assert source_kind(str(path)) == "lmdb"
    source = open_source(str(path))
    assert isinstance(source, LmdbSource)
    items = list(source.scan())
    assert [item.key for item in items] == sorted(IMAGES, key=lambda k: k.encode("utf-8"))
    assert all(item.source == str(path) for item in items)
    got = read_all(source)
    assert got == IMAGES and all(type(value) is bytes for value in got.values())
    with pytest.raises(ReadError, match="no such key"):
        source.read(SourceItem("absent.jpg", str(path), "absent.jpg"))
    source.shutdown()
    source.shutdown()  # safe twice


def test_lmdb_empty_value_raises_read_error(tmp_path: Path) -> None:
    make_lmdb(tmp_path / "a.lmdb", {"empty.jpg": b""})
    source = LmdbSource(str(tmp_path / "a.lmdb"))
    with pytest.raises(ReadError, match="empty"):
        source.read(next(source.scan()))


def test_lmdb_value_larger_than_the_bound_is_refused_uncopied(tmp_path: Path) -> None:
    make_lmdb(tmp_path / "a.lmdb", {"big.jpg": b"\xff" * 5000, "small.jpg": b"\xff" * 10})
    source = LmdbSource(str(tmp_path / "a.lmdb"))
    items = {item.key: item for item in source.scan()}
    with pytest.raises(ReadError, match=r"at most 4,096 bytes.*big\.jpg.* of 5,000 bytes; not read"):
        source.read(items["big.jpg"], 4096)
    assert source.read(items["small.jpg"], 4096) == b"\xff" * 10
    source.shutdown()


def test_lmdb_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LMDB"):
        list(LmdbSource(str(tmp_path / "nope.lmdb")).scan())


def _read_in_child(source: Source, items: list[SourceItem]) -> dict[str, bytes]:
    return {item.key: bytes(source.read(item)) for item in items}


@pytest.mark.parametrize("kind", ["folder", "list", "lmdb"])
def test_source_pickles_and_works_in_a_spawned_child(tree: Path, tmp_path: Path, kind: str) -> None:
    if kind == "folder":
        location = str(tree)
    elif kind == "list":
        (tmp_path / "l.txt").write_text("photos/a.jpg\nphotos/火箭.GIF\n", encoding="utf-8")
        location = f"@{tmp_path / 'l.txt'}"
    else:
        make_lmdb(tmp_path / "a.lmdb", IMAGES)
        location = str(tmp_path / "a.lmdb")
    source = open_source(location)
    items = list(source.scan())  # opens files or the environment in this process first
    expected = _read_in_child(source, items)
    clone = pickle.loads(pickle.dumps(source))
    assert _read_in_child(clone, items) == expected
    clone.shutdown()  # the original still works: an archive opened twice is shared
    assert _read_in_child(source, items) == expected
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_in_child, (source, items)) == expected
    source.shutdown()


def test_macos_appledouble_files_are_not_images(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8 not really")
    (tmp_path / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    assert [item.key for item in FolderSource(str(tmp_path)).scan()] == ["photo.jpg"]
