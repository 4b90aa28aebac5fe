"""``wanwu cache stats|clear DIR``: look into, or empty, a result cache."""

from __future__ import annotations

import argparse
import json
import os


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``cache`` and its subcommands to the ``wanwu`` parser's subcommands."""
    p = sub.add_parser("cache", help="look into or empty a result cache (see --cache)",
                       description="A result cache holds answers by image content, for every model and setting "
                       "it was used with.")
    csub = p.add_subparsers(dest="cache_command", required=True)
    stats = csub.add_parser("stats", help="entries and bytes")
    stats.add_argument("path", metavar="DIR")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_cmd_stats)
    clear = csub.add_parser("clear", help="drop every entry (the file keeps its size for reuse)")
    clear.add_argument("path", metavar="DIR")
    clear.set_defaults(func=_cmd_clear)


def _open(path: str):  # noqa: ANN202 (RecordCache, imported lazily)
    from wanwu.errors import ConfigError
    from wanwu.stages.cache import RecordCache

    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise ConfigError(f"expected a wanwu cache at {path!r}, found none")
    # Its own size as the bound: looking into a cache neither grows nor evicts it.
    return RecordCache(path, b"", max(1 << 20, os.path.getsize(os.path.join(path, "data.mdb"))))


def _cmd_stats(args: argparse.Namespace) -> int:
    cache = _open(args.path)
    try:
        stats = {k: v for k, v in cache.stats().items() if k in ("path", "entries", "used_bytes")}
    finally:
        cache.shutdown()
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"{stats['path']}: {stats['entries']} answers, {stats['used_bytes'] / 2**20:.1f} MiB in use")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    cache = _open(args.path)
    try:
        before = cache.stats()["entries"]
        cache.clear()
    finally:
        cache.shutdown()
    print(f"{args.path}: dropped {before} answers")
    return 0
