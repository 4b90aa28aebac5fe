"""Shards of a job's inputs (``wanwu run --ray``): ranged scans of folders, list files and LMDB
archives agree with the full scan, and the driver's plan covers every input still to do once."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from wanwu.pipeline.cluster.shards import plan_shards, shard_key, split_shard
from wanwu.stages.sources.base import Source, open_source


def _tree(root: Path) -> list[str]:
    """A folder whose walk order differs from plain string order ("a.jpg" < "a/..." as strings)."""
    names = ["a.jpg", "a/b.jpg", "a/c/d.jpg", "a/c.jpg", "a-b.jpg", "b/x.png", "b/y/z.jpg", "c.jpg", "d/e/f/g.jpg",
             "e.txt", "猫/猫.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return [n for n in names if not n.endswith(".txt")]


def _lmdb(path: Path, keys: list[bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key in keys:
            txn.put(key, b"x")
    env.close()


def _list_source(tmp_path: Path) -> Source:
    """A list file with a BOM, a blank line, a comment, padding, and a path listed twice."""
    (tmp_path / "l.txt").write_text("\ufeffa.jpg\n\n# note\nb.jpg\n  c d.jpg  \na.jpg\n猫.jpg\ne.jpg\n", encoding="utf-8")
    return open_source("@" + str(tmp_path / "l.txt"))


@pytest.fixture(params=["folder", "list", "lmdb"])
def source(request, tmp_path) -> Source:
    if request.param == "folder":
        _tree(tmp_path / "f")
        return open_source(str(tmp_path / "f"))
    if request.param == "list":
        return _list_source(tmp_path)
    _lmdb(tmp_path / "a.lmdb", [b"a", b"a/b", b"b", b"c\xff", "猫".encode(), b"z"])
    return open_source(str(tmp_path / "a.lmdb"))


def test_ranges_between_any_positions_concatenate_to_the_whole_scan(source):
    whole = list(source.scan_range())
    assert len(whole) >= 6
    positions = [item.position for item in whole]
    assert all(positions) and len(set(positions)) == len(positions)
    for cut_a in range(len(whole)):
        for cut_b in range(cut_a, len(whole) + 1):
            stop_a = positions[cut_a]
            stop_b = positions[cut_b] if cut_b < len(whole) else None
            parts = (list(source.scan_range(None, stop_a)) + list(source.scan_range(stop_a, stop_b))
                     + (list(source.scan_range(stop_b, None)) if stop_b is not None else []))
            assert [i.key for i in parts] == [i.key for i in whole], (cut_a, cut_b)


def test_a_folder_walks_in_the_order_of_path_components(tmp_path):
    names = _tree(tmp_path / "f")
    keys = [item.key for item in open_source(str(tmp_path / "f")).scan()]
    assert sorted(keys) == sorted(names)
    assert keys == sorted(keys, key=lambda k: k.split("/"))
    assert keys.index("a/c/d.jpg") < keys.index("a.jpg")  # a folder "a" sorts before "a.jpg"


def test_a_list_file_scan_drops_repeats_but_a_range_does_not(tmp_path):
    source = _list_source(tmp_path)
    assert [i.key for i in source.scan()] == ["a.jpg", "b.jpg", "c d.jpg", "猫.jpg", "e.jpg"]
    assert [i.key for i in source.scan_range()] == ["a.jpg", "b.jpg", "c d.jpg", "a.jpg", "猫.jpg", "e.jpg"]


@pytest.mark.parametrize("size", [1, 2, 4, 100])
def test_the_plan_covers_every_input_not_done_once(source, size):
    keys = [item.key for item in source.scan_range()]
    done = {keys[0], keys[2], keys[-1]}
    shards = list(plan_shards(["in"], [source], done, size))
    assert [s.index for s in shards] == list(range(len(shards)))
    read = []
    for shard in shards:
        got = [i.key for i in source.scan_range(shard.start, shard.stop) if i.key not in shard.skip]
        assert 0 < len(got) <= size and len(got) == shard.planned
        assert not set(got) & done
        read += got
    assert sorted(read) == sorted(k for k in keys if k not in done)
    assert shards[0].start != source.scan_range().__next__().position  # the done first input starts no shard


def test_several_inputs_are_planned_with_their_job_keys(tmp_path):
    _tree(tmp_path / "one")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.jpg").write_bytes(b"x")
    locations = [str(tmp_path / "one"), str(tmp_path / "two")]
    sources = [open_source(loc) for loc in locations]
    done = {f"{locations[1]}/a.jpg"}
    shards = list(plan_shards(locations, sources, done, 3))
    assert {s.input_index for s in shards} == {0}  # the second input has nothing left to do
    assert all(shard_key(locations[0], i, True).startswith(locations[0] + "/") for i in sources[0].scan())


def test_a_failed_shard_splits_into_one_shard_per_input_left(source):
    shard = next(plan_shards(["in"], [source], set(), 100))
    first = next(iter(source.scan_range())).key
    singles = split_shard(shard, source, "in", False, {first}, first_index=10)
    assert [s.index for s in singles] == list(range(10, 10 + len(singles)))
    got = [[i.key for i in source.scan_range(s.start, s.stop)] for s in singles]
    assert all(len(g) == 1 for g in got)
    assert [g[0] for g in got] == [i.key for i in source.scan_range() if i.key != first]


def test_a_shard_size_below_one_is_refused(source):
    from wanwu.errors import ConfigError

    with pytest.raises(ConfigError, match="shard size"):
        list(plan_shards(["in"], [source], set(), 0))


def test_the_first_shards_are_smaller_then_the_size_asked_for(tmp_path):
    (tmp_path / "l.txt").write_text("".join(f"{i:03d}.jpg\n" for i in range(40)), encoding="utf-8")
    source = open_source("@" + str(tmp_path / "l.txt"))
    shards = list(plan_shards(["in"], [source], set(), 10, ramp=(3, 2)))
    assert [s.planned for s in shards] == [2, 2, 2, 10, 10, 10, 4]
