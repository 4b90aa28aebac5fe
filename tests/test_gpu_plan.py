"""The GPU plan, decided on a CPU: pool placement and size, decoder chain and settings, stream order.

Every number below is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from wanwu.errors import ConfigError, PlanError
from wanwu.pipeline.config import PipelineConfig
from wanwu.pipeline.topology.gpu import (DeviceFacts, GpuSettings, Step, batch_steps, flush_steps, next_decoder,
                                         plan_decode, plan_gpu, plan_pool)
from wanwu.pipeline.topology.plan import Plan, make_plan
from wanwu.specs import FrameSpec, Preprocess
from wanwu.stages.models.base import get_model_spec

H200 = DeviceFacts("cuda:0", "NVIDIA H200", 90, 141 << 30, ipc=True, cupy=True, dali=True)
A10 = DeviceFacts("cuda:0", "NVIDIA A10", 86, 24 << 30, ipc=True, cupy=True, dali=True)  # no NVJPG engine
WSL = replace(H200, ipc=False)
MiB = 1 << 20


def cpu_plan(side: int = 224, decoders: int = 2, per_producer: int = 18, frames: bool = False) -> Plan:
    return Plan(FrameSpec((side, side, 3)), decoders, frames, per_producer, "m", Preprocess(side, side))


# ---- the pool


def test_device_pool_of_224_frames_by_hand():
    # 224 * 224 * 3 = 150,528 bytes = 588 * 256: already aligned. 18 slots x 2 producers x 2 halves = 72 slots,
    # 72 * 150,528 = 10,838,016 bytes, rounded up to 2 MiB pages: 6 * 2,097,152 = 12,582,912.
    pool = plan_pool(cpu_plan(), H200, device_frames=True, settings=GpuSettings())
    assert (pool.placement, pool.slot_bytes, pool.slot_stride_bytes, pool.n_slots) == ("device", 150528, 150528, 72)
    assert pool.pool_bytes == 12_582_912 and pool.slot_offset(71) == 71 * 150528


def test_device_slots_of_an_odd_frame_are_aligned_to_256_bytes():
    # 299 * 299 * 3 = 268,203 -> 1,048 * 256 = 268,288 per slot; 4 slots = 1,073,152 -> one 2 MiB page.
    pool = plan_pool(cpu_plan(299, decoders=1, per_producer=2), H200, True, GpuSettings())
    assert (pool.slot_bytes, pool.slot_stride_bytes, pool.pool_bytes) == (268203, 268288, 2 * MiB)
    assert pool.slot_offset(1) == 268288 and pool.slot_offset(1) % 256 == 0


def test_pinned_pool_keeps_the_host_layout_and_registers_whole_pages():
    # Host slots stay packed (the CPU layout is unchanged): 4 * 268,203 = 1,072,812 -> 262 pages = 1,073,152.
    pool = plan_pool(cpu_plan(299, decoders=1, per_producer=2), H200, False, GpuSettings())
    assert (pool.placement, pool.slot_stride_bytes, pool.pool_bytes) == ("pinned", 268203, 1_073_152)
    assert "host frames" in pool.why
    # 72 * 150,528 = 10,838,016 = 2,646 pages exactly.
    assert plan_pool(cpu_plan(), H200, True, GpuSettings(placement="pinned")).pool_bytes == 10_838_016


@pytest.mark.parametrize("facts, device_frames, reason", [
    (H200, False, "host frames"), (WSL, True, "CUDA IPC"), (replace(H200, cupy=False), True, "CuPy")])
def test_each_missing_condition_falls_back_to_pinned_and_says_why(facts, device_frames, reason):
    pool = plan_pool(cpu_plan(), facts, device_frames, GpuSettings())
    assert pool.placement == "pinned" and reason in pool.why
    with pytest.raises(PlanError, match=f"expected a device pool to be possible, got: .*{reason}"):
        plan_pool(cpu_plan(), facts, device_frames, GpuSettings(placement="device"))


def test_a_device_pool_larger_than_its_share_of_memory_is_refused():
    small = replace(H200, memory_bytes=40 * MiB)  # 25% = 10 MiB < the 12 MiB pool
    with pytest.raises(PlanError, match="within 25% of 41943040 bytes .* got 12582912 bytes"):
        plan_pool(cpu_plan(), small, True, GpuSettings())


def test_settings_are_validated_with_what_came():
    with pytest.raises(ConfigError, match="placement among auto, device, pinned, got 'gpu'"):
        GpuSettings(placement="gpu")
    with pytest.raises(ConfigError, match=r"hw_decoder_load in \[0, 1\], got 1.5"):
        GpuSettings(hw_decoder_load=1.5)
    with pytest.raises(ConfigError, match="positive CUDA graph batch sizes"):
        GpuSettings(graph_batch_sizes=(0,))


# ---- the decoders


def test_dali_on_an_h200_uses_the_hardware_decoder_with_padding_for_a_12mp_photo():
    decode = plan_decode("dali", H200, GpuSettings(), max_pixels=100_000_000)
    assert decode.chain == ("hw-jpeg", "dali-mixed", "cpu") and decode.decoder == "dali"
    m = decode.mixed
    assert (m.hw_decoder_load, m.preallocate_width_hint, m.preallocate_height_hint) == (0.75, 4032, 3024)
    # 4032 * 3024 * 3 = 36,578,304 bytes -> 35 MiB; a quarter of that is 8.75 MiB -> 9 MiB.
    assert (m.device_memory_padding, m.host_memory_padding) == (35 * MiB, 9 * MiB)


def test_no_hardware_decoder_means_load_zero_and_a_shorter_chain():
    decode = plan_decode("dali", A10, GpuSettings(), 100_000_000)
    assert decode.chain == ("dali-mixed", "cpu") and decode.mixed.hw_decoder_load == 0.0
    assert "no hardware JPEG decoder" in decode.why
    off = plan_decode("dali", H200, GpuSettings(hw_decoder_load=0.0), 100_000_000)
    assert off.chain == ("dali-mixed", "cpu") and "turned off" in off.why


def test_preallocation_never_exceeds_the_pixel_limit():
    # sqrt(1e6 / 12,192,768) = 0.28638: 4032 -> 1154, 3024 -> 866; 1154 * 866 = 999,364 <= 1e6.
    m = plan_decode("dali", H200, GpuSettings(), max_pixels=1_000_000).mixed
    assert (m.preallocate_width_hint, m.preallocate_height_hint) == (1154, 866)
    assert m.device_memory_padding == 16 * MiB and m.host_memory_padding == 8 * MiB  # the floors


def test_cpu_decoder_and_missing_dali():
    assert plan_decode("turbo", H200, GpuSettings(), 10**8).chain == ("cpu",)
    with pytest.raises(PlanError, match="expected DALI .* got none installed"):
        plan_decode("dali", replace(H200, dali=False), GpuSettings(), 10**8)


def test_fallback_chain_per_input_ends_in_an_error_record():
    decode = plan_decode("dali", H200, GpuSettings(), 10**8)
    assert next_decoder(decode, "JPEG") == "hw-jpeg"
    assert next_decoder(decode, "JPEG", ("hw-jpeg",)) == "dali-mixed"
    assert next_decoder(decode, "JPEG", ("hw-jpeg", "dali-mixed")) == "cpu"
    assert next_decoder(decode, "JPEG", ("hw-jpeg", "dali-mixed", "cpu")) == "error"
    assert next_decoder(decode, "PNG") == "dali-mixed"  # only JPEG goes to the hardware engine
    assert next_decoder(decode, "PNG", ("dali-mixed",)) == "cpu"
    assert next_decoder(plan_decode("turbo", H200, GpuSettings(), 10**8), "JPEG", ("cpu",)) == "error"


# ---- the whole GPU plan


def test_the_planned_default_on_an_h200_is_a_device_pool_fed_to_torch():
    plan = plan_gpu(cpu_plan(), H200, "dali", "torch", 10**8)
    assert plan.gpu.pool.placement == "device" and plan.gpu.feed == "device"
    assert plan.gpu.graph_batch_sizes == (32,)  # CUDA graphs for full batches; partial ones run eagerly
    assert plan_gpu(cpu_plan(), H200, "dali", "torch", 10**8, GpuSettings(cuda_graphs=False)).gpu.graph_batch_sizes == ()
    assert replace(plan, gpu=None) == cpu_plan()  # the CPU part is untouched
    assert pickle.loads(pickle.dumps(plan)) == plan  # it travels to every worker


def test_frame_sources_cpu_decoders_and_other_engines():
    assert plan_gpu(cpu_plan(frames=True), H200, "dali", "torch", 10**8).gpu.pool.placement == "pinned"
    turbo = plan_gpu(cpu_plan(), H200, "turbo", "torch", 10**8).gpu
    assert (turbo.pool.placement, turbo.decode.chain) == ("pinned", ("cpu",))
    frames_only = plan_gpu(cpu_plan(decoders=0, frames=True), H200, "dali", "torch", 10**8).gpu
    assert frames_only.decode.chain == ("cpu",)  # no decoder process: nothing to plan for DALI
    ort = plan_gpu(cpu_plan(), H200, "turbo", "onnxruntime", 10**8).gpu
    assert ort.feed == "host"
    ort_dali = plan_gpu(cpu_plan(), H200, "dali", "onnxruntime", 10**8).gpu  # DALI decodes; ORT reads host arrays
    assert (ort_dali.pool.placement, ort_dali.feed) == ("pinned", "host")
    assert "the engine reads host arrays" in ort_dali.pool.why
    with pytest.raises(PlanError, match="device pool to be possible, got: the engine reads host arrays"):
        plan_gpu(cpu_plan(), H200, "dali", "onnxruntime", 10**8, GpuSettings(placement="device"))
    with pytest.raises(PlanError, match="CUDA device .* got 'cpu'"):
        plan_gpu(cpu_plan(), replace(H200, device="cpu"), "dali", "torch", 10**8)


def test_cuda_graph_sizes():
    gpu = plan_gpu(cpu_plan(), H200, "dali", "torch", 10**8, GpuSettings(cuda_graphs=True), batch_size=32).gpu
    # A partial batch replays the smallest captured size that holds it.
    assert gpu.graph_batch_sizes == (32,) and gpu.graph_for(32) == 32 and gpu.graph_for(31) == gpu.graph_for(1) == 32
    gpu = plan_gpu(cpu_plan(), H200, "dali", "torch", 10**8,
                   GpuSettings(cuda_graphs=True, graph_batch_sizes=(16, 8, 16)), batch_size=16).gpu
    assert gpu.graph_batch_sizes == (8, 16)
    assert [gpu.graph_for(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 0]
    with pytest.raises(PlanError, match=r"up to the batch size 8, got \(16,\)"):
        plan_gpu(cpu_plan(), H200, "dali", "torch", 10**8, GpuSettings(cuda_graphs=True, graph_batch_sizes=(16,)),
                 batch_size=8)
    assert plan_gpu(cpu_plan(), H200, "turbo", "onnxruntime", 10**8, GpuSettings(cuda_graphs=True)).gpu.graph_batch_sizes == ()


def test_a_cuda_job_config_plans_on_a_cpu_machine():
    model = get_model_spec("efficientnet_lite0")
    plan = make_plan(PipelineConfig(device="cuda:0", decoders=2, batch_size=8), model)
    gpu = plan_gpu(plan, H200, "dali", "torch", 10**8, batch_size=8).gpu
    assert gpu.pool.n_slots == plan.n_slots and gpu.pool.slot_bytes == 224 * 224 * 3


# ---- the order of operations


def test_pinned_batch_zero_one_and_two_by_hand():
    pool = plan_pool(cpu_plan(), H200, False, GpuSettings())
    assert batch_steps(pool, 0) == (
        Step("copy", "copy", 0, 0), Step("copy", "record", 0, 0, "copied", 0),
        Step("compute", "wait", 0, 0, "copied", 0), Step("compute", "compute", 0, 0),
        Step("compute", "record", 0, 0, "computed", 0),
        Step("host", "sync", 0, 0, "copied", 0), Step("host", "release", 0, 0))
    one = batch_steps(pool, 1)
    assert one[-2:] == (Step("host", "sync", 0, 0, "computed", 0), Step("host", "results", 0, 0))
    assert one[0] == Step("copy", "copy", 1, 1)  # buffer 1 was never used: nothing to wait for
    assert batch_steps(pool, 2)[0] == Step("copy", "wait", 2, 0, "computed", 0)  # buffer 0 is batch 0's


def test_device_pool_gathers_on_the_compute_stream():
    pool = plan_pool(cpu_plan(), H200, True, GpuSettings())
    assert batch_steps(pool, 3)[:4] == (
        Step("compute", "gather", 3, 1), Step("compute", "record", 3, 1, "copied", 3),
        Step("compute", "compute", 3, 1), Step("compute", "record", 3, 1, "computed", 3))
    assert flush_steps(3) == (Step("host", "sync", 3, 1, "computed", 3), Step("host", "results", 3, 1))


@pytest.mark.parametrize("placement", ["pinned", "device"])
def test_a_run_of_batches_keeps_every_ordering_rule(placement):
    """Simulate 7 batches plus the flush: each rule of the module docstring, checked on the whole trace."""
    pool = plan_pool(cpu_plan(), H200, placement == "device", GpuSettings())
    trace = [s for n in range(7) for s in batch_steps(pool, n)] + list(flush_steps(6))
    at = {(s.op, s.event, s.batch, s.stream): i for i, s in enumerate(trace)}
    for n in range(7):
        write = at[("copy" if placement == "pinned" else "gather", "", n, "copy" if placement == "pinned" else "compute")]
        compute = at[("compute", "", n, "compute")]
        assert at[("record", "copied", n, trace[write].stream)] < compute  # copy recorded before compute
        if placement == "pinned":
            assert at[("wait", "copied", n, "compute")] < compute  # and waited for across streams
            if n >= 2:  # the buffer is overwritten only after its previous batch computed
                assert at[("wait", "computed", n, "copy")] < write
                assert trace[at[("wait", "computed", n, "copy")]].event_batch == n - 2
        assert at[("sync", "copied", n, "host")] < at[("release", "", n, "host")]
        assert at[("sync", "computed", n, "host")] < at[("results", "", n, "host")]
        if n < 6:  # overlap: n+1 is enqueued before the host waits for n to compute
            assert at[("compute", "", n + 1, "compute")] < at[("sync", "computed", n, "host")]
    assert [s.batch for s in trace if s.op == "results"] == list(range(7))  # each batch answered once, in order
    assert {s.buffer for s in trace} == {0, 1}
    with pytest.raises(PlanError, match="at least 2 buffers, got 0 and 1"):
        batch_steps(pool, 0, buffers=1)


@pytest.mark.parametrize("placement", ["pinned", "device"])
def test_batches_after_a_pause_answer_each_batch_once(placement):
    """The inference process flushes when its input pauses and then goes on numbering batches.

    This replays the feed's bookkeeping (``CudaFeed``: a batch is outstanding from its
    submit until its results step) over submits and flushes in a daemon-like pattern; no
    step may sync on or answer a batch that was answered already (on a device that was a
    KeyError that ended the inference process at the first batch after any pause).
    """
    pool = plan_pool(cpu_plan(), H200, placement == "device", GpuSettings())
    outstanding: set[int] = set()
    answered: list[int] = []
    n = 0
    for burst in (3, 1, 1, 4, 2):  # batches arriving back to back, then a pause (a flush)
        for _ in range(burst):
            steps = batch_steps(pool, n, previous_pending=n - 1 in outstanding)
            outstanding.add(n)
            n += 1
            for step in steps:
                if step.op == "sync":
                    assert step.event_batch in outstanding, (step, sorted(outstanding))
                if step.op == "results":
                    outstanding.remove(step.batch)
                    answered.append(step.batch)
        if n - 1 in outstanding:
            for step in flush_steps(n - 1):
                assert step.event_batch in outstanding or step.op == "results"
                if step.op == "results":
                    outstanding.remove(step.batch)
                    answered.append(step.batch)
    assert answered == list(range(n)) and not outstanding
    # Back to back, batch n still answers n-1 (the overlap); after a flush it answers nothing.
    assert batch_steps(pool, 5, previous_pending=False)[-1].op == "release"
    assert batch_steps(pool, 5)[-1] == Step("host", "results", 4, 0)
