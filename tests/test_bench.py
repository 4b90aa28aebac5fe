"""The benchmark suite runs and reports; its numbers are not asserted (speed is shown, not tested)."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import run_wanwu
from wanwu.bench.baselines import BASELINES
from wanwu.bench.report import markdown, text_table
from wanwu.bench.stages import archive_values, limit
from wanwu.pipeline.pack.pack import pack
from wanwu.stages.engines.hw import ISA_FLAGS, cpu_precision, cpuinfo_text
from wanwu.stages.models.photos import build_corpus, corpus_sizes


def test_corpus_has_the_documented_size_mix() -> None:
    sizes = corpus_sizes(300)
    landscape = Counter(tuple(sorted(s, reverse=True)) for s in sizes)
    assert landscape == {(640, 480): 90, (1280, 720): 90, (1920, 1080): 90, (4032, 3024): 30}
    assert sum(1 for w, h in sizes if h > w) == 100  # a third portrait
    assert corpus_sizes(300) == sizes  # deterministic


def test_corpus_files_are_real_jpegs_of_those_sizes(tmp_path) -> None:
    paths = build_corpus(tmp_path, 6)
    for path, size in zip(paths, corpus_sizes(6)):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == size
            assert len(np.unique(np.asarray(im.convert("L").resize((16, 16))))) > 20  # content, not flat colour
    assert build_corpus(tmp_path, 6) == paths  # reused, not rewritten


def test_limit_of_two_stages_sharing_cores() -> None:
    assert limit(300.0, 300.0) == pytest.approx(150.0)
    assert limit(1e9, 200.0) == pytest.approx(200.0, rel=1e-6)


def test_archive_values_are_the_packed_jpegs(tmp_path) -> None:
    build_corpus(tmp_path / "corpus", 3)
    pack([str(tmp_path / "corpus")], str(tmp_path / "small.lmdb"), resize_shorter=64)
    values = archive_values(str(tmp_path / "small.lmdb"))
    assert len(values) == 3 and all(v[:2] == b"\xff\xd8" for v in values)  # JPEG start-of-image
    for value in values:
        with Image.open(io.BytesIO(value)) as im:
            assert min(im.size) == 64  # what the LMDB row decodes: the packed, smaller JPEGs


def _row(name: str, rate: float, **extra) -> dict:
    return {"name": name, "images_per_s": rate, "runs": [rate], "spread": 0.0, "peak_rss_mb": 100.0, **extra}


def test_report_states_settings_machine_and_each_rows_own_limit() -> None:
    result = {
        "machine": {"cpu": "AMD EPYC 7B13", "cpu_family": 25, "cpu_model": 1, "cores": 2, "memory_gb": 7.8,
                    "isa": {"AVX2": True, "AVX512F": False, "AVX512-BF16": False, "AMX": False, "VNNI": False},
                    "versions": {"torch": "2.14.1", "openvino": None}},
        "config": {"images": 300, "repeats": 2},
        "rows": [_row("naive", 10.0, settings="torch fp32, 2 threads, batch 1, channels_last"),
                 _row("dataloader", 20.0), _row("openvino dataloader", 40.0), _row("decode only", 300.0),
                 _row("inference only", 200.0),
                 _row("wanwu", 100.0, limit_images_per_s=120.0, of_limit=100 / 120),
                 _row("wanwu lmdb-256", 150.0, limit_images_per_s=180.0, of_limit=150 / 180)],
        "limit_images_per_s": 120.0, "efficiency": 100 / 120,
    }
    md = markdown(result)
    assert "AMD EPYC 7B13 (family 25, model 1), 2 cores, 7.8 GB" in md
    assert "AVX2 yes, AVX512F no, AVX512-BF16 no, AMX no, VNNI no; torch 2.14.1" in md
    assert "| wanwu | 100.0 | 10.0x | 5.00x | 2.50x | 83% | 100 |" in md
    assert "| wanwu lmdb-256 | 150.0 | 15.0x | 7.50x | 3.75x | 83% | 100 |" in md
    assert "| naive | 10.0 | 1.0x | 0.50x | 0.25x |  | 100 | torch fp32, 2 threads, batch 1, channels_last |" in md
    assert "| decode only | 300.0 |  |  |  |  | 100 |" in md  # a stage alone: no ratios
    assert "Largest spread between rounds" in md
    table = text_table(result)
    assert "vs openvino dataloader" in table.splitlines()[0]
    assert all(line == line.rstrip() for line in table.splitlines())


def test_report_puts_the_precisions_side_by_side_with_their_agreement() -> None:
    result = {
        "machine": {"cpu": "Intel Xeon", "cores": 2, "memory_gb": 8, "isa": {"AMX": True}, "versions": {}},
        "config": {"images": 60, "repeats": 1},
        "rows": [_row("wanwu", 100.0, limit_images_per_s=120.0, of_limit=100 / 120),
                 *(_row(f"{kind} {p}", rate * (2 if kind == "inference only" else 1), precision=p,
                        top1_agreement=agree, rechecked=share)
                   for p, rate, agree, share in (("fp32", 50.0, 1.0, 0.0), ("int8+fp32", 80.0, 0.998, 0.19))
                   for kind in ("inference only", "wanwu"))],
    }
    md = markdown(result)
    assert "| precision | inference only images/s | wanwu run images/s | top-1 agreement | recomputed in fp32 |" in md
    assert "| fp32 | 100.0 | 50.0 | 100.0% |  |" in md
    assert "| int8+fp32 | 160.0 | 80.0 | 99.8% | 19.0% |" in md


@pytest.mark.slow
def test_bench_quick_runs_and_writes_its_reports(tmp_path) -> None:
    proc = run_wanwu("bench", "--quick", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                     timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "bench.json").read_text(encoding="utf-8"))
    names = [row["name"] for row in result["rows"]]
    assert names == ["naive", "dataloader", "openvino dataloader", "decode only", "decode only lmdb-256",
                     "inference only", "wanwu", "wanwu lmdb-256", "wanwu python api", "wanwu cache warm",
                     "wanwu 50% repeats",
                     "wanwu 50% repeats cached"]
    assert all(row["images_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["settings"] for row in result["rows"])
    by = {row["name"]: row for row in result["rows"]}
    expected = cpu_precision("auto", cpuinfo_text())  # every baseline as wanwu's auto
    assert {by[name]["precision"] for name in BASELINES} == {expected}
    assert by["openvino dataloader"]["settings"].startswith(f"openvino {expected}")
    inference = by["inference only"]["images_per_s"]
    for name, decode in (("wanwu", "decode only"), ("wanwu lmdb-256", "decode only lmdb-256"),
                         ("wanwu python api", "decode only")):
        # each job's limit from its own stages
        assert by[name]["limit_images_per_s"] == pytest.approx(limit(by[decode]["images_per_s"], inference))
        assert by[name]["of_limit"] == pytest.approx(by[name]["images_per_s"] / by[name]["limit_images_per_s"])
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["versions"]["torch"] and set(machine["isa"]) == set(ISA_FLAGS)
    assert result["limit_images_per_s"] == by["wanwu"]["limit_images_per_s"] and result["efficiency"] > 0
    # The warm rerun answers every image from the cache; with 50% repeats, half are hits.
    images = result["config"]["images"]
    assert by["wanwu cache warm"]["cache"] == {"hits": images, "misses": 0, "insertions": 0, "evictions": 0}
    cached = by["wanwu 50% repeats cached"]["cache"]
    assert cached["hits"] + cached["misses"] == images and cached["misses"] == images // 2
    md = (tmp_path / "out" / "bench.md").read_text(encoding="utf-8")
    assert "| wanwu |" in md and "| openvino dataloader |" in md and "Machine:" in md and "Result cache:" in md
    with Image.open(tmp_path / "out" / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert "images/s" in proc.stdout


def test_the_video_tables_name_both_sides_and_the_ratio():
    from wanwu.bench.video import video_table

    side = {"wall_s": 10.0, "decoded": 900, "recognised": 30}
    result = {"files": [{"mode": "--fps 1", "wanwu": {**side, "wall_s": 4.0}, "opencv": side}],
              "streams": [{"streams": 16, "wanwu": {"min_fps": 30.0, "min_recognised_share": 0.35, "keeps_up": False},
                           "opencv": {"min_fps": 18.8, "keeps_up": False}}]}
    lines = video_table(result).splitlines()
    assert lines[2] == "| --fps 1 | 30 (OpenCV 30) | 4.0 | 225 | 10.0 | 90 | 2.50x |"
    assert lines[-1] == "| 16 | 30.0 fps | 35% | no | 18.8 fps | no |"


def test_the_cluster_rows_rate_once_started_leaves_out_start_up_and_the_tail(tmp_path) -> None:
    from wanwu.bench.cluster import _Growth, cluster_table

    growth = _Growth(tmp_path / "r.jsonl", 0.0)
    # 10 s of start-up, then 100 records a second, then a slow tail.
    growth.samples = [(0.0, 0), (10.0, 0), (10.5, 50), (11.0, 100), (19.0, 900), (19.5, 950), (30.0, 1000)]
    assert growth.first_s() == 10.5
    assert growth.steady_rate(1000) == pytest.approx(100.0)
    assert growth.steady_rate(5000) is None  # never reached 90%
    rows = [{"name": "wanwu run --ray local", "images_per_s": 33.3, "runs": [33.3], "steady_images_per_s": 100.0,
             "first_record_s": 10.5, "peak_pss_mb": 1500.0}]
    table = cluster_table({"rows": rows, "sinks": {"jsonl": 60000.0, "sqlite": 30000.0}})
    assert "| wanwu run --ray local | 33.3 | 33.3 | 100.0 | 10.5 | 1500 | defaults |" in table
    assert "JSONL 60,000 records/s, SQLite 30,000 records/s" in table


def test_the_driver_sinks_rates_are_measured_on_real_files() -> None:
    from wanwu.bench.cluster import sink_rates

    rates = sink_rates(n=2000)
    assert set(rates) == {"jsonl", "sqlite"} and all(r > 0 for r in rates.values())
