"""The CPU precision rule on fake /proc/cpuinfo texts: wanwu's ``auto`` and every baseline choose alike."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from wanwu.bench.baselines import BASELINES, baseline_settings
from wanwu.stages.engines.base import EngineConfig, create_engine
from wanwu.stages.engines.hw import cpu_features, cpu_precision, cpuinfo_text, native_bf16
from wanwu.stages.models.base import get_model_spec


def cpuinfo(model_name: str, family: int, model: int, flags: str, cores: int = 2) -> str:
    """A /proc/cpuinfo text as Linux writes it: one block per core, blank line between."""
    block = (f"processor\t: {{i}}\nvendor_id\t: x\ncpu family\t: {family}\nmodel\t\t: {model}\n"
             f"model name\t: {model_name}\nstepping\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    return "\n".join(block.format(i=i) for i in range(cores))


SAPPHIRE_RAPIDS = cpuinfo("Intel(R) Xeon(R) Platinum 8480+", 6, 143,
                          "avx2 avx512f avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8")
GENOA = cpuinfo("AMD EPYC 9654 96-Core Processor", 25, 17, "avx2 avx512f avx512_vnni avx512_bf16")
ZEN3 = cpuinfo("AMD EPYC 7B13", 25, 1, "avx avx2 fma")
CPUS = {"sapphire rapids": (SAPPHIRE_RAPIDS, "bf16"), "genoa": (GENOA, "bf16"), "zen3": (ZEN3, "fp32")}


@pytest.mark.parametrize("name", CPUS)
def test_every_baseline_and_wanwu_auto_pick_the_same_precision(name):
    text, expected = CPUS[name]
    assert native_bf16(text) is (expected == "bf16")
    assert cpu_precision("auto", text) == expected  # what the engines' auto computes in
    for baseline in BASELINES:
        assert baseline_settings(baseline, text, cores=2).precision == expected, baseline


def test_explicit_precisions_are_taken_as_asked():
    assert cpu_precision("bf16", ZEN3) == "bf16"
    assert cpu_precision("fp32", SAPPHIRE_RAPIDS) == "fp32"
    with pytest.raises(ValueError, match="expected precision in"):
        cpu_precision("fp16", ZEN3)


def test_cpu_features_reads_the_first_processor():
    cpu = cpu_features(SAPPHIRE_RAPIDS)
    assert (cpu.model_name, cpu.family, cpu.model) == ("Intel(R) Xeon(R) Platinum 8480+", 6, 143)
    assert cpu.isa() == {"AVX2": True, "AVX512F": True, "AVX512-BF16": True, "AMX": True, "VNNI": True}
    assert cpu_features(ZEN3).isa() == {"AVX2": True, "AVX512F": False, "AVX512-BF16": False, "AMX": False,
                                        "VNNI": False}
    assert cpu_features(GENOA).isa()["AMX"] is False and cpu_features(GENOA).native_bf16
    unknown = cpu_features("")  # no /proc/cpuinfo (not Linux): nothing native, fp32
    assert (unknown.model_name, unknown.family, unknown.flags) == ("?", None, frozenset())
    assert cpu_precision("auto", "") == "fp32"


def test_baselines_use_every_core_and_state_their_settings():
    naive, loader, peer = (baseline_settings(name, ZEN3, cores=4) for name in BASELINES)
    assert (naive.threads, naive.workers, naive.batch_size, naive.channels_last) == (4, 0, 1, True)
    assert (loader.threads, loader.workers, loader.batch_size, loader.channels_last) == (4, 4, 32, True)
    assert (peer.engine, peer.threads, peer.workers, peer.hint) == ("openvino", 4, 4, "LATENCY")
    assert loader.describe() == "torch fp32, 4 threads, 4 workers, batch 32, channels_last"
    assert peer.describe() == "openvino fp32, 4 threads, 4 workers, batch 32, LATENCY hint"
    with pytest.raises(ValueError, match="expected a baseline"):
        baseline_settings("tensorflow", ZEN3, 2)


ENGINES = [name for name in ("torch", "openvino") if importlib.util.find_spec(name) is not None]


@pytest.mark.parametrize("cpu", ["sapphire rapids", "zen3"])
@pytest.mark.parametrize("engine", ENGINES)
def test_engines_auto_follows_the_rule(monkeypatch, engine, cpu):
    text, expected = CPUS[cpu]
    if expected == "bf16" and engine == "openvino" and not native_bf16(cpuinfo_text()):
        pytest.skip("OpenVINO cannot compile bf16 on a CPU without native bf16")
    module = importlib.import_module(f"wanwu.stages.engines.{engine}")
    monkeypatch.setattr(module, "cpuinfo_text", lambda: text)
    loaded = create_engine(engine, get_model_spec("efficientnet_lite0"), EngineConfig(max_batch_size=2))
    try:
        loaded.load()
        # auto with native bf16: bf16, near ties recomputed in fp32
        assert loaded.precision == ("bf16+fp32" if expected == "bf16" else "fp32")
    finally:
        loaded.shutdown()
