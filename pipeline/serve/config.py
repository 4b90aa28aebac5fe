"""The daemon's configuration: one frozen dataclass, from flags or a TOML file, validated once.

A TOML file sets the fields below by name, at the top level or inside tables
(table names only group settings for the reader: ``[http]`` then ``http_port =
8000``), except ``[cameras]``, whose keys are camera names and values their URLs.
Flags given on the command line override the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wanwu.errors import ConfigError
from wanwu.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from wanwu.pipeline.serve.kserve import HttpLimits
    from wanwu.specs import Preprocess
    from wanwu.stages.sources.base import FrameSource

# TOML names kept from before the settings were shared with `wanwu run` (Triton's name).
_ALIASES = {"max_batch_size": "batch_size"}


@dataclass(frozen=True, kw_only=True)
class ServeConfig(PipelineConfig):
    """Everything ``wanwu serve`` needs: the shared settings, the doors and their limits.

    Every front door is optional; at least one must be on. Batching: ``batch_size`` is
    Triton's ``max_batch_size``; ``max_queue_delay_ms`` is how long the oldest waiting
    image waits for company; a request alone runs as soon as its images are decoded.
    """

    max_queue_delay_ms: float = 5.0  # the oldest waiting image runs within this long
    max_wait_ms: float = 2.0  # a lone request runs once no image has arrived for this long
    max_queue_size: int = 1024  # images accepted and not yet answered; more is "queue full"
    timeout_s: float = 30.0  # per request, unless the request says less
    max_images_per_request: int = 64
    max_request_bytes: int = 64 << 20  # one request's images (HTTP body after decompression, gRPC or ZeroMQ message)
    max_json_bytes: int = 8 << 20  # an HTTP body that is JSON only (base64 images)
    max_inflight_bytes: int = 256 << 20  # HTTP bodies being received or worked on at once; past it, 503
    max_connections: int = 512  # open HTTP connections; one more is answered 503 and closed
    keepalive_timeout_s: float = 15.0  # an idle HTTP connection closes after this long
    header_timeout_s: float = 10.0  # a request's head must be complete this long after its first byte
    min_body_rate: float = 64 << 10  # bytes/s an HTTP body must arrive at, after header_timeout_s of grace
    http_threads: int = 64  # HTTP requests inside the backend at once (the rest wait, costing no thread)
    stall_timeout_s: float = 30.0  # a worker that shows no sign of life this long is killed and replaced
    # Front doors. Hosts default to 127.0.0.1: nothing is exposed unless asked.
    http: bool = True
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = -1  # KServe v2 gRPC on host:grpc_port; -1 = off, 0 = any free port
    token: str = ""  # bearer token for HTTP and gRPC; "" = none
    metrics_port: int = 8002  # Prometheus /metrics on host:metrics_port; -1 = off
    zmq_request: str = ""  # ROUTER address, e.g. tcp://127.0.0.1:5555
    zmq_stream: str = ""  # PULL address: fire-and-forget, records go to `out`
    curve_secret_key: str = ""  # zmq.auth certificate file with the server's secret key
    curve_clients: str = ""  # folder of allowed client public certificates
    watch: str = ""  # hot folder
    python: bool = False  # the Python API (``wanwu.Recognizer``) is the door: set by it, not by users
    watch_done: str = ""  # move recognised files here ("" = leave them)
    watch_failed: str = ""  # move files that got an error record here
    watch_settle_s: float = 0.5  # a file is complete once unchanged this long
    out: str = ""  # records of the stream and hot-folder doors (.jsonl or .sqlite); also their ledger
    cameras: tuple[str, ...] = ()  # live streams recognised all the time, each "NAME=URL"
    camera_out: str = ""  # the cameras' records (.jsonl or .sqlite)
    drain_timeout_s: float = 20.0  # on SIGTERM: finish what is in flight within this long

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = {"max_queue_size": self.max_queue_size, "max_images_per_request": self.max_images_per_request,
                    "max_request_bytes": self.max_request_bytes}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not (self.timeout_s > 0 and self.drain_timeout_s >= 0 and 0 <= self.max_queue_delay_ms < math.inf):
            raise ConfigError("expected timeout_s > 0, drain_timeout_s >= 0 and a finite max_queue_delay_ms >= 0, "
                              f"got {self.timeout_s}, {self.drain_timeout_s}, {self.max_queue_delay_ms}")
        if self.max_queue_size < self.max_images_per_request:
            raise ConfigError(f"max_queue_size ({self.max_queue_size}) must hold at least one full request "
                              f"(max_images_per_request = {self.max_images_per_request})")
        if not (self.http or self.grpc_port >= 0 or self.zmq_request or self.zmq_stream or self.watch or self.python):
            raise ConfigError("expected at least one front door (HTTP, gRPC, zmq_request, zmq_stream or watch), "
                              "got none")
        if not self.stall_timeout_s > 0:
            raise ConfigError(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")
        if (self.zmq_stream or self.watch) and not self.out:
            raise ConfigError("the stream and hot-folder doors write records: expected `out` (.jsonl or .sqlite)")
        from wanwu.stages.sinks.base import STDOUT, is_stream

        if self.out and is_stream(self.out):
            raise ConfigError(f"expected a regular file for out (the ledger that keeps the stream and hot-folder "
                              f"doors exactly-once across restarts), got {self.out!r}, which is not one")
        if self.camera_out == STDOUT:
            raise ConfigError("expected a file for camera_out, got '-': the daemon's stdout carries the line "
                              "saying where its doors listen")
        self.camera_urls()  # validates the cameras
        if self.cameras and not self.camera_out:
            raise ConfigError("cameras write records: expected camera_out (.jsonl or .sqlite)")
        if self.camera_out and self.out and os.path.realpath(self.camera_out) == os.path.realpath(self.out):
            raise ConfigError(f"expected camera_out and out to be different files, got {self.out!r} for both")
        if self.curve_clients and not self.curve_secret_key:
            raise ConfigError("curve_clients needs curve_secret_key (the server's certificate)")
        self.http_limits()  # validates the HTTP limits

    def camera_urls(self) -> dict[str, str]:
        """The cameras as name -> URL, in the order given.

        Raises:
            ConfigError: an entry is not NAME=URL of a stream or video, or a name is given twice.
        """
        from wanwu.stages.sources.video import is_video

        out: dict[str, str] = {}
        for entry in self.cameras:
            name, eq, url = entry.partition("=")
            name, url = name.strip(), url.strip()
            if not (eq and name and url and is_video(url)) or "@" in name:
                raise ConfigError(f"expected a camera as NAME=URL (rtsp://, http://, tcp://, udp:// or a video "
                                  f"file; no '@' in NAME), got {entry!r}")
            if name in out:
                raise ConfigError(f"expected each camera name once, got {name!r} twice")
            out[name] = url
        return out

    def camera_sources(self, preprocess: "Preprocess") -> list["FrameSource"]:
        """The cameras as frame sources: reconnecting forever, even those that never came up."""
        from wanwu.stages.sources.video import VideoSource

        video = self.video_config(retry_unopened=True)
        return [VideoSource(url, preprocess, video, name) for name, url in self.camera_urls().items()]

    def http_limits(self) -> "HttpLimits":
        """The HTTP door's limits."""
        from wanwu.pipeline.serve.kserve import HttpLimits

        return HttpLimits(self.max_request_bytes, self.max_json_bytes, self.max_inflight_bytes, self.max_connections,
                          self.keepalive_timeout_s, self.header_timeout_s, self.min_body_rate, self.http_threads)

    @classmethod
    def from_toml(cls, path: str, **overrides: Any) -> "ServeConfig":
        """Read ``path`` (flat keys, or keys inside any tables), then apply ``overrides``.

        Raises:
            ConfigError: unreadable file, unknown key or a value of the wrong type.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"expected a readable TOML file at {path!r}: {exc}") from exc
        flat: dict[str, Any] = {}
        cameras = data.pop("cameras", None)
        if isinstance(cameras, dict):  # [cameras] NAME = "URL"
            if not all(isinstance(v, str) for v in cameras.values()):
                raise ConfigError(f"expected [cameras] as NAME = \"URL\" lines in {path}, got {cameras!r}")
            flat["cameras"] = tuple(f"{name}={url}" for name, url in cameras.items())
        elif cameras is not None:  # cameras = ["NAME=URL", ...], as --print-config writes it
            flat["cameras"] = cameras
        for key, value in data.items():
            if isinstance(value, dict):  # a table groups keys for the reader only
                flat.update(value)
            else:
                flat[key] = value
        return cls.build({**flat, **overrides})

    @classmethod
    def build(cls, values: dict[str, Any]) -> "ServeConfig":
        """A config from a dict of field values, checking names and types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {_ALIASES.get(name, name): value for name, value in values.items()}
        settable = set(fields) - {"python"}  # the Python API's own door, never a setting
        unknown = sorted(set(values) - settable)
        if unknown:
            raise ConfigError(f"unknown serve settings {unknown}; expected some of {sorted(settable)}")
        clean: dict[str, Any] = {}
        for name, value in values.items():
            default = fields[name].default
            if name == "cameras":
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"cameras must be a list of NAME=URL strings, got {value!r}")
                value = tuple(value)
            elif name in ("preferred_batch_sizes", "mean", "std"):
                kind = int if name == "preferred_batch_sizes" else float
                try:
                    value = tuple(kind(v) for v in value)
                except (TypeError, ValueError):
                    raise ConfigError(f"{name} must be a list of numbers, got {value!r}") from None
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{name} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)) or name == "decoders":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{name} must be a number, got {value!r}")
            elif isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
            clean[name] = value
        return cls(**clean)
