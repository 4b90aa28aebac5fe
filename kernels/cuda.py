"""Loading, compiling and probing for the CUDA kernels of this package.

Every kernel keeps its CUDA C++ in a ``.cu`` file beside its Python module, which
holds the NumPy reference and the CuPy launcher. CuPy is imported only inside the
functions here, so a machine without CuPy or a driver imports ``wanwu.kernels``
freely and only a launch needs a device.

The sources include no headers (half-precision rounding is inline PTX), so they
compile the same under NVRTC at run time as in the offline check that CI runs
(:func:`compile_ptx`), with no include path to get right.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources
from typing import Any

from wanwu.errors import ConfigError

logger = logging.getLogger(__name__)

# Compute capabilities the sources are checked against in CI: A100 and H100/H200.
CHECKED_ARCHS = ("80", "90")
# The sources use __match_any_sync (sm_70+), __reduce_max_sync and cvt.rn.bf16.f32 (sm_80+).
MIN_COMPUTE_CAPABILITY = 80
NVRTC_OPTIONS = ("--std=c++17",)


def cuda_sources() -> dict[str, str]:
    """Every ``.cu`` file of this package, name to text, sorted by name."""
    files = [f for f in resources.files(__package__).iterdir() if f.name.endswith(".cu")]
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(files, key=lambda f: f.name)}


def cuda_source(name: str) -> str:
    """The text of the package's ``.cu`` file ``name``."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def compile_ptx(source: str, name: str, arch: str) -> str:
    """Compile ``source`` to PTX for ``compute_<arch>`` with NVRTC, without a device.

    This goes through ``cupy_backends``' NVRTC binding, which loads the NVRTC library
    of a wheel (``nvidia-cuda-nvrtc-cu12``) and never touches the driver; CuPy's own
    ``RawKernel.compile()`` asks the driver for the device and fails without one.

    Raises:
        ConfigError: the source does not compile; the message holds NVRTC's log.
        ImportError: CuPy (the ``gpu`` extra) is not installed.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch=compute_{arch}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise ConfigError(f"{name} does not compile for compute_{arch}: {exc}\n{log}") from exc
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def nvrtc_version() -> tuple[int, int]:
    """``(major, minor)`` of the NVRTC library that :func:`compile_ptx` uses."""
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


def cuda_unavailable_reason() -> str | None:
    """Why kernels cannot run here, or ``None`` when CuPy sees a capable device.

    Safe to call on any machine: it never raises, and its answer is the reason a
    GPU test skips with.
    """
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed (the 'gpu' extra): {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no usable CUDA driver or device: {exc}"
    if count == 0:
        return "no CUDA device"
    capability = int(cupy.cuda.Device().compute_capability)  # "90" for 9.0
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"the kernels need compute capability >= 8.0, device 0 has {capability / 10:.1f}"
    return None


@functools.lru_cache(maxsize=None)
def load_function(source_name: str, function: str) -> Any:
    """The CuPy ``RawKernel`` for ``function`` of the package's ``source_name``.

    Compiled by CuPy (NVRTC, for the current device) on the first call and cached
    per process, and by CuPy on disk across processes.
    """
    import cupy

    module = cupy.RawModule(code=cuda_source(source_name), options=NVRTC_OPTIONS)
    return module.get_function(function)


def as_device_array(array: Any, what: str) -> Any:
    """``array`` as a CuPy array, refusing host arrays (a silent copy hides a slow path).

    Raises:
        ConfigError: ``array`` is not a CuPy array.
    """
    import cupy

    if not isinstance(array, cupy.ndarray):
        raise ConfigError(f"expected {what} as a cupy.ndarray on the device, got {type(array).__name__}")
    return array
