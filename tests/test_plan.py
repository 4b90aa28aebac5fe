"""Planning: the chain source -> decoder -> classifier is checked, and the pool sized, before any process starts."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, wanwu_cmd
from wanwu.errors import ConfigError, PlanError
from wanwu.pipeline.config import JobConfig, PipelineConfig
from wanwu.pipeline.topology.plan import make_plan
from wanwu.specs import FrameSpec, require_match
from wanwu.stages.models.base import get_model_spec
from wanwu.stages.sources.base import open_source

MODEL = get_model_spec("efficientnet_lite0")


def test_a_byte_source_plans_decoders_and_sizes_the_pool_from_the_declared_frame():
    plan = make_plan(PipelineConfig(decoders=3, batch_size=16), MODEL, [open_source(str(REPO / "samples"))])
    assert plan.frame == FrameSpec((224, 224, 3), "uint8", "cpu", "HWC")
    assert (plan.decoders, plan.frame_producer, plan.producers) == (3, False, 3)
    assert plan.n_slots == plan.slots_per_producer * 3 * 2 and plan.slots_per_producer * 3 >= 16 + 3


def test_slot_ranges_never_overlap_across_producers_or_generations():
    plan = make_plan(PipelineConfig(decoders=2), MODEL, [open_source(str(REPO / "samples")),
                                                         open_source("testsrc:frames=5", MODEL.preprocess)])
    assert plan.producers == 3 and plan.loader_producer == 2
    ranges = {(p, g % 2): set(plan.slot_range(p, g)) for p in range(3) for g in range(2)}
    seen: set[int] = set()
    for slots in ranges.values():
        assert not slots & seen and max(slots) < plan.n_slots
        seen |= slots
    assert plan.slot_range(1, 0) == plan.slot_range(1, 2)  # two generations on, a producer reuses its half


def test_a_frame_source_alone_needs_no_decoders():
    plan = make_plan(PipelineConfig(decoders=2), MODEL, [open_source("testsrc:", MODEL.preprocess)])
    assert (plan.decoders, plan.frame_producer, plan.producers) == (0, True, 1)


@pytest.mark.parametrize("location, differ", [("testsrc:size=256", "shape"), ("testsrc:device=cuda:0", "device")])
def test_a_mismatched_producer_is_refused_naming_both_stages(location, differ):
    with pytest.raises(PlanError) as info:
        make_plan(PipelineConfig(), MODEL, [open_source(location, MODEL.preprocess)])
    message = str(info.value)
    assert "source 'testsrc'" in message and "classifier 'efficientnet_lite0'" in message
    assert f"differ in {differ}" in message


def test_a_decoder_that_disagrees_with_the_classifier_is_refused():
    with pytest.raises(PlanError, match="decoder 'turbo' produces frames of .* classifier 'efficientnet_lite0'"):
        require_match("decoder 'turbo'", FrameSpec((256, 256, 3)), "classifier 'efficientnet_lite0' (openvino)",
                      MODEL.preprocess.frame)
    require_match("decoder 'turbo'", FrameSpec((224, 224, 3)), "classifier", MODEL.preprocess.frame)


def test_endless_sources_go_only_with_each_other():
    with pytest.raises(ConfigError, match="endless"):
        make_plan(PipelineConfig(), MODEL, [open_source("testsrc:", MODEL.preprocess),
                                            open_source(str(REPO / "samples"))])
    plan = make_plan(PipelineConfig(), MODEL, [open_source("testsrc:", MODEL.preprocess),
                                               open_source("rtsp://127.0.0.1:9/cam", MODEL.preprocess)])
    assert plan.frame_producer and plan.decoders == 0  # two cameras: one producer, no decoder


def test_inputs_read_twice_are_refused(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(ConfigError, match="once"):
        JobConfig(inputs=(str(tmp_path / "a"), str(tmp_path / "a") + "/"), out="r.jsonl")
    with pytest.raises(ConfigError, match="overlap"):
        JobConfig(inputs=(str(tmp_path / "a"), str(tmp_path / "a" / "b")), out="r.jsonl")


def test_the_cli_refuses_a_mismatch_before_any_process_starts(tmp_path: Path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.Popen(wanwu_cmd("run", "testsrc:size=320x240", "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "source 'testsrc'" in stderr and "(240, 320, 3)" in stderr and "classifier 'efficientnet_lite0'" in stderr
    assert not out.exists()  # nothing was opened, not even the output
    assert not list(Path(tempfile.gettempdir()).glob(f"wanwu-job-{proc.pid}-*"))  # no topology was made
