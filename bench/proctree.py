"""Peak resident memory of a whole process tree, sampled from /proc.

RSS counts a page shared by several processes (shared memory, Ray's object store)
once in each; PSS (proportional set size) splits it between them, so a tree's PSS
is what it really holds. The suite reports RSS; the cluster rows, whose processes
share Ray's object store, report PSS.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def _pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(root: int, pss: bool = False) -> int:
    """Resident bytes of ``root`` and all its descendants now (their PSS with ``pss``)."""
    tree, total, todo = _children(), 0, [root]
    measure = _pss if pss else _rss
    while todo:
        pid = todo.pop()
        try:
            total += measure(pid)
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(tree.get(pid, []))
    return total


class Sampler:
    """Calls ``sample()`` every ``interval_s`` in a thread, from ``with`` until its end."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Hook: take one sample."""

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)


class PeakRss(Sampler):
    """Samples the tree under ``root`` every ``interval_s`` until stopped; ``peak`` in bytes (PSS with ``pss``)."""

    def __init__(self, root: int, interval_s: float = 0.05, pss: bool = False) -> None:
        super().__init__(interval_s)
        self.root, self.peak, self.pss = root, 0, pss

    def sample(self) -> None:
        self.peak = max(self.peak, tree_rss_bytes(self.root, self.pss))
