"""End to end: the real CLI, real processes, sockets, shared memory, model and photos."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import CAT_CLASSES, COFFEE_CLASSES, run_wanwu, write_hostile, write_photos
from wanwu.stages.sinks.base import read_records

pytestmark = pytest.mark.slow


def records_by_key(path: Path) -> dict[str, dict]:
    records = read_records(str(path))
    counts = Counter(r["key"] for r in records)
    doubled = [k for k, c in counts.items() if c > 1]
    assert not doubled, f"keys written more than once: {doubled[:5]}"
    return {r["key"]: r for r in records}


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, photos) -> tuple[Path, dict, dict]:
    folder = tmp_path_factory.mktemp("mixed") / "照片 photos"
    good = write_photos(folder, photos)
    bad = write_hostile(folder / "bad", photos)
    (folder / "README.txt").write_text("not picked up: not an image extension")
    return folder, good, {f"bad/{k}": v for k, v in bad.items()}


@pytest.fixture(scope="module")
def folder_run(mixed_folder, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    folder, _, _ = mixed_folder
    out = tmp_path_factory.mktemp("out") / "results.jsonl"
    return run_wanwu("run", str(folder), "--out", str(out), "--progress", "log"), out


def test_mixed_folder_gives_one_record_per_file_and_exit_3(folder_run, mixed_folder):
    proc, out = folder_run
    _, good, bad = mixed_folder
    assert proc.returncode == 3, proc.stderr
    recs = records_by_key(out)
    assert set(recs) == set(good) | set(bad)
    for key, photo in good.items():
        rec = recs[key]
        assert rec["error"] is None, rec
        top = rec["labels"][0]["class_id"]
        if photo == "chelsea":
            assert top in CAT_CLASSES, rec["labels"]
        if photo == "coffee":
            assert top in COFFEE_CLASSES, rec["labels"]
    for key, err_type in bad.items():
        assert recs[key]["error"]["type"] == err_type, recs[key]
        assert recs[key]["labels"] == []


def test_records_have_the_documented_fields(folder_run):
    _, out = folder_run
    text = out.read_text(encoding="utf-8")
    assert "猫" in text or "咖啡" in text, "Chinese labels must be written unescaped"
    rec = next(r for r in map(json.loads, text.splitlines()) if r["error"] is None)
    assert list(rec) == ["key", "source", "width", "height", "labels", "model", "elapsed_ms", "error"]
    assert len(rec["labels"]) == 5
    scores = [label["score"] for label in rec["labels"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert set(rec["labels"][0]) == {"label", "label_en", "class_id", "score"}
    assert rec["model"] == "efficientnet_lite0" and rec["elapsed_ms"] > 0


def test_width_height_are_of_the_original(folder_run):
    _, out = folder_run
    recs = records_by_key(out)
    assert (recs["子目录 sub/coffee big.JPG"]["width"], recs["子目录 sub/coffee big.JPG"]["height"]) == (1800, 1200)
    assert (recs["猫 chelsea.jpg"]["width"], recs["猫 chelsea.jpg"]["height"]) == (451, 300)


def test_summary_reports_counts_and_busy_shares(folder_run, mixed_folder):
    proc, _ = folder_run
    _, good, bad = mixed_folder
    assert f"{len(good)} recognised, {len(bad)} errors" in proc.stderr
    assert "busy share:" in proc.stderr and "inference" in proc.stderr and "decoder-0" in proc.stderr


def test_rerun_of_a_finished_job_writes_nothing_new(folder_run, mixed_folder):
    folder, good, bad = mixed_folder
    _, out = folder_run
    before = out.read_bytes()
    proc = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none")
    assert proc.returncode == 3, "the output still holds error records: " + proc.stderr
    assert f"0 recognised, 0 errors, {len(good) + len(bad)} already done ({len(bad)} errors)" in proc.stderr
    assert out.read_bytes() == before


def test_sqlite_output_matches_jsonl(folder_run, mixed_folder, tmp_path):
    folder, _, _ = mixed_folder
    _, jsonl = folder_run
    db = tmp_path / "results.sqlite"
    proc = run_wanwu("run", str(folder), "--out", str(db), "--progress", "none")
    assert proc.returncode == 3, proc.stderr
    a, b = records_by_key(jsonl), records_by_key(db)
    assert set(a) == set(b)
    for key in a:
        assert [l["class_id"] for l in a[key]["labels"]] == [l["class_id"] for l in b[key]["labels"]]
        assert (a[key]["error"] or {}).get("type") == (b[key]["error"] or {}).get("type")


def test_pack_then_run_gives_the_folder_labels(folder_run, mixed_folder, tmp_path):
    folder, _, _ = mixed_folder
    _, jsonl = folder_run
    archive = tmp_path / "photos.lmdb"
    proc = run_wanwu("pack", str(folder), str(archive))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "from-lmdb.jsonl"
    proc = run_wanwu("run", str(archive), "--out", str(out), "--progress", "none")
    assert proc.returncode == 3, proc.stderr
    a, b = records_by_key(jsonl), records_by_key(out)
    assert set(a) == set(b)
    for key in a:
        assert [l["class_id"] for l in a[key]["labels"]] == [l["class_id"] for l in b[key]["labels"]], key


def test_list_file_input(mixed_folder, tmp_path):
    folder, good, _ = mixed_folder
    listing = tmp_path / "list.txt"
    paths = [str(folder / k) for k in sorted(good)]
    listing.write_text("# photos\n" + "\n".join(paths + [str(folder / "missing.jpg")]) + "\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    proc = run_wanwu("run", f"@{listing}", "--out", str(out), "--progress", "none")
    assert proc.returncode == 3, proc.stderr
    recs = records_by_key(out)
    assert set(recs) == set(paths) | {str(folder / "missing.jpg")}
    assert recs[str(folder / "missing.jpg")]["error"]["type"] == "ReadError"


@pytest.mark.parametrize("args, expected", [
    (["run", "samples"], 2),  # --out missing
    (["run", "/no/such/folder", "--out", "x.jsonl"], 2),
    (["run", "samples", "--out", "x.jsonl", "--batch-size", "0"], 2),
    (["run", "samples", "--out", "x.txt"], 2),
    (["run", "samples", "--out", "x.jsonl", "--model", "no-such-model"], 2),
    (["frobnicate"], 2),
])
def test_usage_errors_exit_2(args, expected, tmp_path):
    from conftest import REPO

    proc = run_wanwu(*args, cwd=tmp_path if "samples" not in args else REPO, timeout=60)
    assert proc.returncode == expected, proc.stderr
    assert not (REPO / "x.jsonl").exists()


def test_all_good_exits_0_and_help_explains_options(tmp_path):
    from conftest import REPO

    out = tmp_path / "r.jsonl"
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(out), "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert len(records_by_key(out)) == 4
    help_text = run_wanwu("run", "--help").stdout
    for option in ("--decoders", "--batch-size", "--top-k", "--max-pixels", "--engine", "--decoder"):
        assert option in help_text


def test_an_unwritable_output_exits_1(tmp_path):
    from conftest import REPO

    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(blocker / "r.jsonl"), "--progress", "none")
    assert proc.returncode == 1, proc.stderr


def test_records_stream_to_stdout_with_out_dash(tmp_path):
    """``--out -``: JSON Lines on stdout, nothing else there (the summary and any worker's chatter
    go to stderr); the photos get the labels a file output gives them."""
    from conftest import REPO

    proc = run_wanwu("run", str(REPO / "samples"), "--out", "-", "--progress", "log", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["key"] for r in records) == sorted(p.name for p in (REPO / "samples").glob("*.jpg"))
    by_key = {r["key"]: r for r in records}
    assert by_key["猫 chelsea.jpg"]["labels"][0]["class_id"] in CAT_CLASSES
    assert "finished: 4 recognised" in proc.stderr and "-> stdout" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no file named "-"
    shown = run_wanwu("show", "-", input=proc.stdout, timeout=60)  # `wanwu run ... -o - | wanwu show -`
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 4 and "埃及猫" in shown.stdout, shown.stderr


@pytest.mark.parametrize("ext", ["jsonl", "sqlite"])
def test_retry_errors_tries_the_failed_inputs_again_and_only_those(tmp_path, photos, ext):
    """A file caught half-copied fails; once it is whole, a plain rerun keeps its error record
    (the output is the ledger), and ``--retry-errors`` recognises it, leaving the rest alone."""
    from conftest import jpeg_bytes

    folder = tmp_path / "in"
    folder.mkdir()
    whole = jpeg_bytes(photos["chelsea"])
    (folder / "coffee.jpg").write_bytes(jpeg_bytes(photos["coffee"]))
    (folder / "猫 cat.jpg").write_bytes(whole[: len(whole) // 3])  # still being copied
    out = tmp_path / f"r.{ext}"
    args = ("run", str(folder), "--out", str(out), "--progress", "none")
    assert run_wanwu(*args).returncode == 3
    first = {r["key"]: r for r in read_records(str(out))}
    assert first["猫 cat.jpg"]["error"]["type"] == "DecodeError" and first["coffee.jpg"]["error"] is None
    (folder / "猫 cat.jpg").write_bytes(whole)  # the copy completes
    assert run_wanwu(*args).returncode == 3  # without the flag: done is done
    proc = run_wanwu(*args, "--retry-errors")
    assert proc.returncode == 0, proc.stderr
    assert "1 recognised, 0 errors, 1 already done (0 errors), 1 tried again after an error" in proc.stderr
    records = read_records(str(out))
    assert sorted(r["key"] for r in records) == ["coffee.jpg", "猫 cat.jpg"]
    by_key = {r["key"]: r for r in records}
    assert by_key["猫 cat.jpg"]["error"] is None and by_key["猫 cat.jpg"]["labels"][0]["class_id"] in CAT_CLASSES
    assert by_key["coffee.jpg"] == first["coffee.jpg"]  # the good record untouched


def test_a_job_whose_log_reader_went_away_finishes_its_work(tmp_path):
    """`wanwu run ... 2>&1 | tee log` and tee is killed, or the terminal hangs up: the progress
    lines (every 10 s) and the summary cannot be written any more. The job still ends its work,
    with its exit status, instead of dying of the broken pipe."""
    import subprocess

    from conftest import wanwu_cmd

    out = tmp_path / "frames.jsonl"
    proc = subprocess.Popen(wanwu_cmd("run", "testsrc:frames=260,fps=20", "--out", str(out), "--progress", "log",
                                      "--batch-size", "8"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stderr.close()  # nobody reads the log any more
    assert proc.wait(timeout=120) == 0
    assert len(read_records(str(out))) == 260


def test_an_output_device_that_refuses_writes_fails_at_once_with_one_line(tmp_path):
    """/dev/full behind a .jsonl name: reading it as a ledger would never end; writing fails.
    The job ends with exit 1 and the reason, told without a traceback (it is no bug)."""
    from conftest import REPO

    out = tmp_path / "r.jsonl"
    out.symlink_to("/dev/full")
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(out), "--progress", "none", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("option", [["--decoder", "dali"], ["--engine", "torch"], ["--engine", "onnxruntime"]])
def test_other_decoders_and_engines_agree_end_to_end(option, folder_run, mixed_folder, tmp_path):
    if option[1] == "dali":
        pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda120 is not installed")
    folder, good, bad = mixed_folder
    _, reference = folder_run
    out = tmp_path / "r.jsonl"
    proc = run_wanwu("run", str(folder), "--out", str(out), "--progress", "none", *option)
    assert proc.returncode == 3, proc.stderr
    a, b = records_by_key(reference), records_by_key(out)
    assert set(a) == set(b)
    for key in good:
        # Near-ties may swap between engines and precisions; confident answers may not.
        ref, other = a[key]["labels"], b[key]["labels"]
        assert ref[0]["class_id"] in [l["class_id"] for l in other[:3]], (key, option, ref, other)
        if ref[0]["score"] > 0.5:
            assert ref[0]["class_id"] == other[0]["class_id"], (key, option, ref, other)
    for key, err_type in bad.items():
        assert b[key]["error"]["type"] == err_type, (key, option, b[key])


def test_a_worker_that_cannot_start_fails_the_job_with_exit_1(tmp_path):
    from conftest import REPO

    # No CUDA device here: the inference process fails to load and the job must say so, not hang.
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(tmp_path / "r.jsonl"), "--progress", "none",
                     "--engine", "torch", "--device", "cuda:0", "--decoder", "turbo", timeout=120)
    if proc.returncode == 0:
        pytest.skip("a CUDA device is present")
    assert proc.returncode == 1, proc.stderr
    assert "inference" in proc.stderr


def test_stats_json(tmp_path):
    from conftest import REPO

    stats = tmp_path / "stats.json"
    proc = run_wanwu("run", str(REPO / "samples"), "--out", str(tmp_path / "r.jsonl"), "--progress", "none",
                     "--stats-json", str(stats), "--decoders", "1")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(stats.read_text())
    assert s["ok"] == 4 and s["errors"] == 0 and s["exit_code"] == 0 and s["restarts"] == 0
    assert 0 < s["ready_s"] <= s["elapsed_s"] and 0 < s["first_record_s"] <= s["elapsed_s"]
    assert s["images_per_s"] > 0
    assert set(s["busy"]) == {"loader", "decoder-0", "inference", "sink"}
