"""The one exception hierarchy of Splitwise.

The Rust core raises these classes by name (see ``rust/src/py/errors.rs``), so every error a
caller can see, from Python or from the extension, is a :class:`SplitwiseError`. Each class also
subclasses the builtin that fits (``ValueError`` or ``TypeError``), so generic handlers keep
working.
"""

from __future__ import annotations

from collections.abc import Iterable


class SplitwiseError(Exception):
    """Base class of every Splitwise error."""


class InvalidArgumentError(SplitwiseError, ValueError):
    """An argument has a value outside its documented domain."""


class ShapeMismatchError(SplitwiseError, ValueError):
    """Array shapes or lengths do not fit together."""


class SnapshotError(SplitwiseError, ValueError):
    """A persisted state snapshot is corrupt, truncated or of another kind or version."""


class CodecError(SplitwiseError):
    """Base class of activation codec errors."""


class UnknownCodecError(CodecError, ValueError):
    """The codec name is not one of ``f32``, ``f16``, ``q8_0``, ``q4_0``."""


class NonFiniteInputError(CodecError, ValueError):
    """The tensor to encode holds NaN or infinity."""


class CodecRangeError(CodecError, ValueError):
    """A value is too large for the codec (its float16 scale would overflow)."""


class BufferSizeError(CodecError, ValueError):
    """An encoded buffer does not have the size its codec and shape require."""


class CorruptDataError(CodecError, ValueError):
    """An encoded buffer decodes to NaN or infinity (e.g. a non-finite block scale)."""


class DTypeError(CodecError, TypeError):
    """The input has the wrong type or dtype (encode wants float32, decode a bytes-like object)."""


class LayoutError(CodecError, ValueError):
    """The input is not C-contiguous (or is locked for writing by another borrower)."""


class ModelFileError(SplitwiseError, ValueError):
    """A model file (GGUF, shard) is missing, truncated, corrupt or of an unsupported kind; the
    message names the file and the problem."""


class PlanError(SplitwiseError, ValueError):
    """A partition plan is malformed or does not fit the model; the message names the bad path."""


class FrameError(SplitwiseError, ValueError):
    """A segment frame failed validation; `reason` names the check that failed (one of
    `cloud_offload.protocol.FrameFault`), for logs and error replies."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class StoppedError(SplitwiseError):
    """A long operation (e.g. writing shards) stopped early on request; its output is incomplete."""


class ConfigError(SplitwiseError, ValueError):
    """A configuration file is missing, unreadable, not valid TOML, or does not match the schema.

    ``str(err)`` is one line per problem, each starting with the file name; ``problems`` holds the
    same lines as a tuple.
    """

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
