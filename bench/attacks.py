"""Attacks on ``wanwu serve`` from 127.0.0.1, and what they cost it.

Each attack is a function the tests call (tests/test_serve_attacks.py asserts the
daemon holds) and ``python -m wanwu.bench.attacks`` runs against a fresh daemon,
printing attack -> result with the daemon's threads, peak memory and the latency
of a normal request during each.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class ProcessSampler:
    """Samples a process's resident memory and thread count until stopped (``with`` block)."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_mb = self.max_threads = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, int]:
        rss, threads = 0.0, 0
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        except OSError:
            pass
        return rss, threads

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss, threads = self.sample()
            self.peak_rss_mb, self.max_threads = max(self.peak_rss_mb, rss), max(self.max_threads, threads)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Flood:
    """Slow clients that keep ``n`` connections open, each trickling a request head a byte at a time."""

    host: str
    port: int
    n: int
    byte_interval_s: float = 1.0  # one byte per connection this often
    connected: int = 0  # connections made (reconnections included)
    closed_by_server: int = 0  # of them, closed by the daemon (timeouts, evictions, refusals)
    refused_503: int = 0  # answered "503 too many connections" at once
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "Flood":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _connect(self, sel: selectors.BaseSelector) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((self.host, self.port))
        sel.register(sock, selectors.EVENT_READ, data=[b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n", 0])
        self.connected += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for _ in range(self.n):
            self._connect(sel)
        next_byte = time.monotonic()
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 503"):
                    self.refused_503 += 1
                if not data or data.startswith(b"HTTP/"):
                    sel.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    self.closed_by_server += 1
            if time.monotonic() >= next_byte:
                next_byte += self.byte_interval_s
                for _ in range(self.n - len(sel.get_map())):  # a flood keeps its numbers up, once a tick
                    self._connect(sel)
                for key in list(sel.get_map().values()):
                    head, sent = key.data
                    try:
                        key.fileobj.send(head[sent % len(head):sent % len(head) + 1])  # type: ignore[union-attr]
                        key.data[1] = sent + 1
                    except (BlockingIOError, OSError):
                        pass
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()


def infer_seconds(url: str, image: bytes, model: str = "efficientnet_lite0", timeout_s: float = 60.0) -> float:
    """One normal request through Triton's HTTP client; its latency (raises if it failed)."""
    import numpy as np
    import tritonclient.http as triton

    start = time.perf_counter()
    with triton.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as client:
        tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        client.infer(model, [tensor])
    return time.perf_counter() - start


def raw_post(host: str, port: int, path: str, headers: dict[str, str], body: bytes,
             timeout_s: float = 60.0) -> tuple[int, bytes]:
    """POST ``body`` over a plain socket (``http.client`` would refuse some of what attackers send)."""
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(head.encode() + body)
        except OSError:  # the server answered early and closed: read what it said
            pass
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply


def json_amplification_body(size: int) -> bytes:
    """``{"x":[{},{},...]}`` of ``size`` bytes: tiny on the wire, huge as Python objects."""
    inner = b"{},"
    count = (size - 8) // len(inner)
    return b'{"x":[' + inner * count + b'{}]}'


def binary_count_bomb(count: int) -> tuple[bytes, int]:
    """A binary-tensor request declaring ``count`` 2-byte images; returns (body, JSON header length)."""
    header = json.dumps({"inputs": [{"name": "IMAGE", "shape": [count, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": count * 6}}]}).encode()
    return header + (b"\x02\x00\x00\x00ab" * count), len(header)


def zmq_big_message(address: str, frames: int, frame_bytes: int, wait_s: float = 5.0) -> bool:
    """Send one message of ``frames`` frames of ``frame_bytes`` each; True if any reply came."""
    import zmq

    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(address)
        blob = bytes(frame_bytes)
        sock.send_multipart([b"big"] + [blob] * frames, copy=False)
        return bool(sock.poll(int(wait_s * 1000)))
    finally:
        ctx.destroy(linger=0)


def statuses_during_drain(url: str, image: bytes, clients: int, duration_s: float,
                          sigterm: Callable[[], None]) -> dict[int, int]:
    """HTTP statuses seen by ``clients`` threads sending requests while ``sigterm()`` starts a drain."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    seen: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + duration_s

    def client() -> None:
        while time.monotonic() < stop:
            try:
                with triton.InferenceServerClient(url, connection_timeout=5, network_timeout=30) as c:
                    tensor = triton.InferInput("IMAGE", [8, 1], "BYTES")
                    tensor.set_data_from_numpy(np.array([[image]] * 8, dtype=np.object_))
                    c.infer("efficientnet_lite0", [tensor])
                    code = 200
            except InferenceServerException as exc:
                code = int(exc.status() or 0)
            except Exception:  # noqa: BLE001 (refused or reset: the door has closed)
                code = 0
            with lock:
                seen[code] = seen.get(code, 0) + 1
            if code == 0:
                time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(1.0, duration_s / 3))
    sigterm()
    for t in threads:
        t.join()
    return seen


def worker_pids(owner: int, role: str) -> list[int]:
    """Pids of the live workers of ``role`` (``inference``, ``decoder``, ...) whose parent is ``owner``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == owner and fields[0] != "Z" and f"wanwu.pipeline.workers {role} " in cmd:
            pids.append(int(entry.name))
    return pids


def pid_of(role: str, owner: int) -> int:
    """The pid of the owner's worker ``role`` (the first, for decoders)."""
    pids = worker_pids(owner, role)
    if not pids:
        raise LookupError(f"no {role} worker of {owner}")
    return pids[0]


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the daemon's Prometheus metrics (0 if absent)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + (f"{{{labels}}}" if labels else "")) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Daemon:
    """``wanwu serve`` in a child process and the addresses it printed; its log is read as it comes
    (as a journal would: a full pipe would block the daemon's next log line).

    Args:
        *args: flags after ``wanwu serve --http-port 0 --metrics-port 0``.
        env: extra environment variables.
        nofile: > 0 runs it under that file-descriptor limit (1,024 is systemd's default).
    """

    def __init__(self, *args: str, env: dict | None = None, nofile: int = 0) -> None:
        import resource
        import subprocess
        import sys

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([sys.executable, "-m", "wanwu", "serve", "--http-port", "0", "--metrics-port",
                                      "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=limit if nofile else None)
        self._log: list[str] = []
        self._reader = threading.Thread(target=lambda: self._log.extend(self.proc.stderr), daemon=True)
        self._reader.start()
        self.stderr = ""
        line = self.proc.stdout.readline()  # the ready line, once the model is loaded
        if not line:
            self.proc.wait(30)
            self._reader.join(10)
            raise RuntimeError("wanwu serve did not start:\n" + "".join(self._log)[-3000:])
        self.addresses = json.loads(line)
        self.url = self.addresses.get("http", "")  # "" with --no-http
        host, _, port = self.url.rpartition(":")
        self.host, self.port = host, int(port or 0)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status; ``stderr`` holds its log afterwards."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self.stderr = "".join(self._log)
        return code

    def worker_pids(self, role: str) -> list[int]:
        """Pids of this daemon's workers of ``role`` ("decoder" or "inference")."""
        return worker_pids(self.proc.pid, role)


def _probe(url: str, image: bytes, stop: threading.Event, out: list[float]) -> None:
    """Normal requests, one after another, until ``stop``: their latencies (inf for a failure)."""
    while not stop.is_set():
        try:
            out.append(infer_seconds(url, image, timeout_s=30))
        except Exception:  # noqa: BLE001 (a failed normal request is what the row reports)
            out.append(float("inf"))
        time.sleep(0.2)


def _row(daemon: Daemon, image: bytes, name: str, attack: Callable[[], str]) -> dict:
    import statistics

    stop, latencies = threading.Event(), []
    prober = threading.Thread(target=_probe, args=(daemon.url, image, stop, latencies), daemon=True)
    with ProcessSampler(daemon.proc.pid) as sampler:
        base_rss, _ = sampler.sample()
        prober.start()
        result = attack()
        stop.set()
        prober.join(60)
    after_rss, _ = sampler.sample()
    ok = [x for x in latencies if x != float("inf")]
    return {"attack": name, "result": result, "threads": sampler.max_threads,
            "peak_rss_mb": round(sampler.peak_rss_mb), "rss_before_after_mb": (round(base_rss), round(after_rss)),
            "normal_requests": f"{len(ok)}/{len(latencies)}",
            "normal_p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None}


def main() -> int:  # pragma: no cover - a report, run by hand: python -m wanwu.bench.attacks
    """Run every attack against a fresh daemon (defaults, ``ulimit -n 1024``); print a Markdown table."""
    import signal
    import skimage.data
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG", quality=90)
    image = buf.getvalue()
    daemon = Daemon("--decoders", "2", "--zmq", "tcp://127.0.0.1:0", nofile=1024)
    rows = []

    def flood(n: int, seconds: float) -> Callable[[], str]:
        def run() -> str:
            f = Flood(daemon.host, daemon.port, n).start()
            time.sleep(seconds)
            f.stop()
            return f"{f.connected} connections, {f.closed_by_server} closed by the daemon"
        return run

    def flood_and_kill() -> str:
        f = Flood(daemon.host, daemon.port, 1500).start()
        time.sleep(2)
        os.kill(pid_of("decoder", daemon.proc.pid), signal.SIGKILL)
        time.sleep(8)
        f.stop()
        metrics = daemon.addresses["metrics"]
        restarts = metric(metrics, "wanwu_worker_restarts_total", 'stage="decoder"')
        return f"decoder replaced ({restarts:.0f} restart); ready {metric(metrics, 'wanwu_ready'):.0f}"

    def amplification() -> str:
        body = json_amplification_body(64 << 20)
        codes: list[int] = []
        threads = [threading.Thread(target=lambda: codes.append(raw_post(
            daemon.host, daemon.port, "/v2/models/efficientnet_lite0/infer", {}, body)[0])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return f"statuses {sorted(codes)}"

    def count_bomb() -> str:
        body, header = binary_count_bomb(11_000_000)
        start = time.perf_counter()
        code, _ = raw_post(daemon.host, daemon.port, "/v2/models/efficientnet_lite0/infer",
                           {"Inference-Header-Content-Length": str(header)}, body)
        return f"{code} in {time.perf_counter() - start:.2f} s"

    def zmq_bomb() -> str:
        replied = zmq_big_message(daemon.addresses["zmq_request"], 8, 100 << 20)
        return "answered" if replied else "connection dropped at the first frame, nothing held"

    def sigstop() -> str:
        frozen = pid_of("inference", daemon.proc.pid)
        os.kill(frozen, signal.SIGSTOP)
        start = time.monotonic()
        while metric(daemon.addresses["metrics"], "wanwu_worker_stalls_total", 'stage="inference"') < 1:
            time.sleep(0.2)
        detected = time.monotonic() - start
        while metric(daemon.addresses["metrics"], "wanwu_ready") < 1:
            time.sleep(0.2)
        return f"detected after {detected:.0f} s, ready again after {time.monotonic() - start:.0f} s"

    for name, attack in [("none (baseline)", lambda: (time.sleep(3), "-")[1]),
                         ("1,100 slow clients, 10 s", flood(1100, 10)),
                         ("1,500 slow clients + kill -9 of a decoder", flood_and_kill),
                         ("4 x 64 MiB JSON amplification bodies", amplification),
                         ("binary request of 11 million 2-byte images", count_bomb),
                         ("ZeroMQ message of 8 x 100 MB frames", zmq_bomb),
                         ("SIGSTOP of the inference process", sigstop)]:
        rows.append(_row(daemon, image, name, attack))
        print(rows[-1], flush=True)
    seen = statuses_during_drain(daemon.url, image, 8, 4, lambda: daemon.proc.send_signal(signal.SIGTERM))
    code = daemon.stop()
    rows.append({"attack": "SIGTERM (drain) under 8 clients", "result": f"statuses {seen}, exit {code}"})
    keys = ["attack", "result", "threads", "peak_rss_mb", "rss_before_after_mb", "normal_requests", "normal_p50_ms"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
