"""wanwu (万物): high-throughput streaming image recognition with Chinese labels.

The package is laid out by architecture:

* ``wanwu.stages``: what each step does (sources, decoders, engines, models, sinks),
  knowing nothing of processes;
* ``wanwu.pipeline``: how stages are wired into processes, sockets and shared memory;
* ``wanwu.kernels``: array kernels (CPU, and CUDA through CuPy with NumPy references);
* ``wanwu`` itself holds only the shared vocabulary: errors and specs.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``from wanwu import Recognizer`` without importing the pipeline (ZeroMQ, the engines)
    # on a plain ``import wanwu``.
    if name == "Recognizer":
        from wanwu.pipeline.api import Recognizer

        return Recognizer
    raise AttributeError(f"module 'wanwu' has no attribute {name!r}")
