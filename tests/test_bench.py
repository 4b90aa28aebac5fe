"""The benchmark suite runs and reports; its numbers are not asserted (speed is shown, not tested)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import run_wanwu
from wanwu.stages.models.photos import build_corpus, corpus_sizes
from wanwu.bench.stages import limit


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


@pytest.mark.slow
def test_bench_quick_runs_and_writes_its_reports(tmp_path) -> None:
    proc = run_wanwu("bench", "--quick", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                     timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "bench.json").read_text(encoding="utf-8"))
    names = [row["name"] for row in result["rows"]]
    assert names == ["naive", "dataloader", "decode only", "inference only", "wanwu", "wanwu lmdb-256"]
    assert all(row["images_per_s"] > 0 and row["peak_rss_mb"] > 0 for row in result["rows"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"]
    assert 0 < result["limit_images_per_s"] and result["efficiency"] > 0
    md = (tmp_path / "out" / "bench.md").read_text(encoding="utf-8")
    assert "| wanwu |" in md and "Machine:" in md
    with Image.open(tmp_path / "out" / "bench.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert "images/s" in proc.stdout
