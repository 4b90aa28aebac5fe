"""The ``wanwu`` command line: ``run``, ``pack``, ``show``, ``models``, ``serve`` (and ``bench``
when the benchmarks are installed, through the ``wanwu.commands`` entry point)."""

from wanwu.pipeline.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
