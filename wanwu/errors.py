"""The error hierarchy shared by every stage and the pipeline.

Messages say what was expected and what came, e.g.
``DecodeError("expected an image, got 12 bytes that no decoder recognises")``.

Errors that describe one input (``InputError`` and its children) become error
records and never stop a job; the others are about the job itself.
"""

from __future__ import annotations


class WanwuError(Exception):
    """Base of every error wanwu raises on purpose."""


class ConfigError(WanwuError, ValueError):
    """A configuration value or command-line option is invalid."""


class PlanError(ConfigError):
    """Two chained stages disagree on what passes between them (shape, dtype, layout or device).

    Raised while planning, before any process starts; the message names both stages.
    """


class InputError(WanwuError):
    """One input is bad. The pipeline turns it into an error record and goes on."""


class ReadError(InputError):
    """The bytes of an input could not be read (vanished, unreadable, empty)."""


class DecodeError(InputError):
    """The bytes are not a decodable image (not an image, truncated, unsupported)."""


class PixelLimitError(DecodeError):
    """The image is larger than the configured pixel limit (decompression-bomb guard)."""


class StageError(WanwuError):
    """A stage failed in a way that is not about one input (a bug or a broken backend)."""


class ModelError(StageError):
    """A model could not be found, built or loaded."""


class EngineError(StageError):
    """An inference engine is unavailable or failed."""


class SinkError(StageError):
    """Records could not be written or the output could not be resumed."""


class TransportError(WanwuError):
    """Processes could not talk to each other (sockets, shared memory, a dead peer)."""


def error_dict(exc: BaseException) -> dict[str, str]:
    """The ``error`` field of a record for ``exc``: ``{"type", "message"}``.

    ``type`` is the exception's ``record_type`` when it has one (a serving error names
    its reason, e.g. ``queue_full``), else its class name.
    """
    kind = getattr(exc, "record_type", None) or type(exc).__name__
    return {"type": kind, "message": str(exc) or type(exc).__name__}
