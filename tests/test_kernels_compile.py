"""Every CUDA source in wanwu.kernels compiles for sm_80 and sm_90, with no GPU needed.

NVRTC (the compiler CuPy uses at run time) turns each ``.cu`` file into PTX; ptxas
then assembles that PTX for the real architectures, which is where register and
shared-memory limits are enforced. A kernel that stops compiling fails here, not on
the first GPU that runs it.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time

import pytest

from wanwu.errors import ConfigError
from wanwu.kernels import cuda

logger = logging.getLogger(__name__)

SOURCES = cuda.cuda_sources()
CASES = [(name, arch) for name in SOURCES for arch in cuda.CHECKED_ARCHS]
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(')


def entry_points(source: str) -> list[str]:
    """The ``extern "C" __global__`` function names of ``source``."""
    return _ENTRY.findall(source)


@pytest.fixture(scope="module")
def ptx() -> dict[tuple[str, str], str]:
    """PTX of every (source, arch), compiled once; logs how long NVRTC took."""
    start = time.perf_counter()
    out = {(name, arch): cuda.compile_ptx(SOURCES[name], name, arch) for name, arch in CASES}
    logger.warning("NVRTC %s: %d sources x %d archs in %.2f s", cuda.nvrtc_version(), len(SOURCES),
                   len(cuda.CHECKED_ARCHS), time.perf_counter() - start)
    return out


def test_the_package_has_the_kernels_of_issue_14():
    assert {"normalize.cu", "topk.cu"} <= set(SOURCES)
    assert entry_points(SOURCES["normalize.cu"]) == ["nhwc_u8_to_nchw_f16", "nhwc_u8_to_nchw_bf16"]
    assert entry_points(SOURCES["topk.cu"]) == ["softmax_topk_f32"]


@pytest.mark.parametrize("name, arch", CASES)
def test_nvrtc_compiles_every_entry_point(ptx, name, arch):
    text = ptx[(name, arch)]
    assert f".target sm_{arch}" in text
    for function in entry_points(SOURCES[name]):
        assert re.search(rf"\.entry {function}\(", text), f"{function} missing from the PTX of {name}"


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas (CUDA toolkit) is not on the PATH")
@pytest.mark.parametrize("name, arch", CASES)
def test_ptxas_assembles_without_spilling(ptx, tmp_path, name, arch):
    source = tmp_path / f"{name}.{arch}.ptx"
    source.write_text(ptx[(name, arch)])
    result = subprocess.run(
        ["ptxas", f"-arch=sm_{arch}", "-v", str(source), "-o", str(tmp_path / "out.cubin")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # One report per entry point; a spill would mean the launch bounds no longer fit.
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    assert len(spills) == len(entry_points(SOURCES[name])), result.stderr
    assert all(s == ("0", "0") for s in spills), result.stderr


def test_a_source_that_does_not_compile_fails_with_the_compiler_log():
    broken = 'extern "C" __global__ void f(float* x) { x[threadIdx.x] = undeclared; }'
    with pytest.raises(ConfigError, match="undeclared"):
        cuda.compile_ptx(broken, "broken.cu", "90")


def test_the_device_probe_answers_without_raising():
    reason = cuda.cuda_unavailable_reason()
    assert reason is None or isinstance(reason, str) and reason
