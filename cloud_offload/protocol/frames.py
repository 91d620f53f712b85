"""The binary segment frames of the offload protocol: encode, decode, check.

Specified in ``docs/protocol.md``; this module is the reference implementation. It moves bytes
and knows no planning: a frame's op list is checked for well-formedness (known kinds, head and
layer ranges, the segment grammar), not for what a plan would do.

Segment frame (little-endian)::

    off  size  field
    0    4     magic b"SWSG"
    4    1     version (1)
    5    1     kind: 1 request, 2 response, 3 error, 4 probe, 5 probe reply
    6    2     flags: bit 0 REPLAY, bit 1 CLOSE, others must be 0
    8    16    session id (UUID bytes)
    24   4     step (token step of the session)
    28   4     position of the tensor's first row (rows are positions position..position+T-1)
    32   2     segment id within the step
    34   2     attempt (0 first send, +1 per retry)
    36   16    model hash (first 16 bytes of the model file's SHA-256)
    52   1     codec of the payload: 0 none, 1 f32, 2 f16, 3 q8_0, 4 q4_0, 5 token
    53   1     reply codec (request: codec wanted for the response tensor; else 0 or echoed)
    54   2     n_ops
    56   11·n  ops: kind u8, layer u16, head bitmask u64
    ..   28    only in a request whose reply codec is 5 (token): the sampling block
               (temperature f32, top_p f32, top_k u32, index u32, logprobs u8, 0 u8, 0 u16, seed u64)
    ..   1     ndim (0..4; 0 = no tensor, codec none)
    ..   4·nd  dims u32
    ..   4     payload length
    ..   len   payload (codec bytes; an error frame's UTF-8 JSON {"code","message"})
    ..   4     CRC32C of every byte before it

Reply codec `token` asks a segment ending in LM_HEAD for the sampled token instead of the logits
(`splitwise_core.sampling`: the same rule as the device's); the response's codec is then `token`,
its shape (1, 1 + logprobs) and its payload (1 + logprobs) entries of (u32 token id, f32
log-probability), the chosen token first, then the most likely ones.

A probe (kind 4) and its reply (kind 5) use the same layout with no ops and no tensor; their
payload is a u32 (probe: the reply's requested frame size; reply: the probe's frame size as
received) followed by zero padding. They measure the link and never touch a session.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag, StrEnum

import numpy as np
import numpy.typing as npt

from splitwise_core import codecs
from splitwise_core.errors import CodecError, FrameError, InvalidArgumentError
from splitwise_core.ops import (
    FRAME_HEADER,
    FRAME_OP,
    HEADER_SIZE,
    OP_SIZE,
    SAMPLING_BLOCK,
    Op,
    OpKind,
    segment_problem,
)
from splitwise_core.sampling import MAX_LOGPROBS, SampledToken, Sampling

__all__ = [
    "CODEC_IDS",
    "DEFAULT_MAX_ROWS_PER_FRAME",
    "MAGIC",
    "MAX_DIMS",
    "MAX_ERROR_PAYLOAD",
    "MAX_FRAME",
    "MAX_HEADS",
    "MAX_OPS",
    "MAX_PAYLOAD",
    "MAX_PROBE_SIZE",
    "PROBE_MIN_SIZE",
    "TOKEN",
    "VERSION",
    "EncodedTensor",
    "ErrorCode",
    "Flags",
    "Frame",
    "FrameFault",
    "FrameKind",
    "decode_frame",
    "encode_error",
    "encode_probe",
    "encode_probe_reply",
    "encode_request",
    "encode_response",
    "encode_tensor",
    "model_hash_prefix",
]


class FrameFault(StrEnum):
    """Which check a frame failed (FrameError.reason); stable strings, logged and sent in replies."""

    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    LENGTH_MISMATCH = "length_mismatch"
    CRC_MISMATCH = "crc_mismatch"
    UNKNOWN_KIND = "unknown_kind"
    BAD_FLAGS = "bad_flags"
    UNKNOWN_CODEC = "unknown_codec"
    UNKNOWN_OP = "unknown_op"
    BAD_OP = "bad_op"
    HEADS_OUT_OF_RANGE = "heads_out_of_range"
    LAYER_OUT_OF_RANGE = "layer_out_of_range"
    BAD_OP_SEQUENCE = "bad_op_sequence"
    TOO_MANY_DIMS = "too_many_dims"
    BAD_DIMS = "bad_dims"
    PAYLOAD_SIZE = "payload_size"
    BAD_PAYLOAD = "bad_payload"  # from Frame.tensor(): the codec bytes decode to NaN/Inf
    BAD_ERROR_PAYLOAD = "bad_error_payload"
    MODEL_MISMATCH = "model_mismatch"
    BAD_SAMPLING = "bad_sampling"  # a sampling block's values out of range, or on a frame without LM_HEAD
    BAD_PROBE = "bad_probe"  # a probe's fields: reserved fields not 0, reply size out of range
    # Checked by the receiving worker against its model and limits (CloudWorker.check_request):
    TOO_MANY_ROWS = "too_many_rows"  # more tensor rows than the worker's max_rows_per_frame
    POSITION_OUT_OF_RANGE = "position_out_of_range"  # position + rows beyond the model's context


MAGIC = b"SWSG"
VERSION = 1
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_OPS = 1024
MAX_DIMS = 4
MAX_HEADS = 64
MAX_ERROR_PAYLOAD = 64 * 1024
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_MIN_FRAME = HEADER_SIZE + 1 + 4 + 4
MAX_FRAME = HEADER_SIZE + MAX_OPS * OP_SIZE + 1 + 4 * MAX_DIMS + 4 + MAX_PAYLOAD + 4
# Probes: header, ndim 0, payload length, the u32 size field (+ padding), CRC.
PROBE_MIN_SIZE = _MIN_FRAME + 4  # 69 bytes
MAX_PROBE_SIZE = 1 << 20  # both a probe and the reply it asks for
DEFAULT_MAX_ROWS_PER_FRAME = 512
"""Tensor rows (tokens) a worker computes per frame unless configured otherwise; devices send a longer
prompt's prefill in chunks of at most this many rows. llama.cpp's default batch: attention over T rows
costs O(T²) and a residual run of every layer O(n_layer · T), all on the worker's only compute thread
(512 rows: ~0.3 s per layer on one busy core; 8,192: ~30 s)."""


class FrameKind(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    ERROR = 3
    PROBE = 4  # device → worker: a link probe (no session, no ops, no tensor)
    PROBE_REPLY = 5  # worker → device: the probe's answer, of the requested size


class Flags(IntFlag):
    NONE = 0
    # Re-sent checkpointed input that rebuilds KV on a new worker; computed like a request.
    REPLAY = 1
    # The session's last request: the worker may free its KV after answering.
    CLOSE = 2


_KNOWN_FLAGS = int(Flags.REPLAY | Flags.CLOSE)


CODEC_IDS: dict[str, int] = {"f32": 1, "f16": 2, "q8_0": 3, "q4_0": 4}
TOKEN = "token"
"""Not a tensor codec: the reply codec that asks for the sampled token instead of the logits."""
_TOKEN_ID = 5
_CODEC_NAMES: dict[int, str] = {v: k for k, v in CODEC_IDS.items()} | {_TOKEN_ID: TOKEN}


@dataclass(frozen=True, slots=True)
class EncodedTensor:
    """Codec bytes and the true shape (what the edge checkpoints and re-sends on recovery)."""

    codec: str
    shape: tuple[int, ...]
    data: bytes

    def decode(self) -> npt.NDArray[np.float32]:
        return codecs.decode(self.data, self.codec, self.shape)


def encode_tensor(x: npt.NDArray[np.float32], codec: str) -> EncodedTensor:
    if codec not in CODEC_IDS:
        raise InvalidArgumentError(f"unknown codec {codec!r}; expected one of {', '.join(CODEC_IDS)}")
    arr = np.ascontiguousarray(x, dtype=np.float32)
    return EncodedTensor(codec=codec, shape=tuple(int(n) for n in arr.shape), data=codecs.encode(arr, codec))


def model_hash_prefix(sha256: bytes | str) -> bytes:
    """The frame's model hash field from a SHA-256 digest (32 bytes or 64 hex characters)."""
    raw = bytes.fromhex(sha256) if isinstance(sha256, str) else bytes(sha256)
    if len(raw) != 32:
        raise InvalidArgumentError(f"expected a SHA-256 digest (32 bytes), got {len(raw)} bytes")
    return raw[:16]


@dataclass(frozen=True, slots=True)
class Frame:
    kind: FrameKind
    flags: Flags
    session: uuid.UUID
    step: int
    position: int
    segment: int
    attempt: int
    model_hash: bytes
    codec: str | None  # None: no tensor
    reply_codec: str | None
    ops: tuple[Op, ...]
    shape: tuple[int, ...]
    # A view into the received buffer (no copy); call bytes() on it to keep it beyond the buffer.
    payload: memoryview = field(repr=False)
    # A request whose reply codec is TOKEN: how to sample, and the generated token's index.
    sampling: Sampling | None = None
    sample_index: int = 0

    @property
    def dedup_key(self) -> tuple[uuid.UUID, int, int]:
        """Retries of one segment share this key whatever their attempt number."""
        return (self.session, self.step, self.segment)

    def tensor(self) -> npt.NDArray[np.float32]:
        if self.codec is None or self.codec == TOKEN:
            raise FrameError(FrameFault.BAD_DIMS, f"a {self.kind.name.lower()} frame without a tensor")
        try:
            return codecs.decode(self.payload, self.codec, self.shape)
        except CodecError as exc:
            raise FrameError(FrameFault.BAD_PAYLOAD, f"payload does not decode: {exc}") from exc

    def sampled(self) -> SampledToken:
        """The sampled token of a response in codec TOKEN."""
        if self.codec != TOKEN:
            raise FrameError(FrameFault.BAD_DIMS, f"a {self.kind.name.lower()} frame in codec {self.codec}, not token")
        try:
            return SampledToken.from_bytes(self.payload)
        except InvalidArgumentError as exc:
            raise FrameError(FrameFault.BAD_PAYLOAD, f"sampled token: {exc}") from exc

    def encoded(self) -> EncodedTensor:
        if self.codec is None:
            raise FrameError(FrameFault.BAD_DIMS, f"a {self.kind.name.lower()} frame without a tensor")
        return EncodedTensor(codec=self.codec, shape=self.shape, data=bytes(self.payload))

    @property
    def probe_size(self) -> int:
        """PROBE: the frame size the reply must have; PROBE_REPLY: the probe's size as received."""
        if self.kind not in (FrameKind.PROBE, FrameKind.PROBE_REPLY):
            raise FrameError(FrameFault.UNKNOWN_KIND, f"not a probe frame but a {self.kind.name.lower()}")
        return int(_U32.unpack_from(self.payload, 0)[0])  # at least 4 bytes: checked by decode_frame

    def error(self) -> tuple[str, str]:
        """(code, message) of an error frame."""
        if self.kind is not FrameKind.ERROR:
            raise FrameError(FrameFault.UNKNOWN_KIND, f"not an error frame but a {self.kind.name.lower()}")
        obj = json.loads(bytes(self.payload))  # validated by decode_frame
        return str(obj["code"]), str(obj["message"])


def _encode(
    kind: FrameKind,
    flags: int,
    session: uuid.UUID,
    step: int,
    position: int,
    segment: int,
    attempt: int,
    model_hash: bytes,
    codec: str | None,
    reply_codec: str | None,
    ops: Sequence[Op],
    shape: Sequence[int],
    payload: bytes,
    sampling_block: bytes = b"",
) -> bytes:
    if len(model_hash) != 16:
        raise InvalidArgumentError(f"model_hash must be 16 bytes, got {len(model_hash)}")
    if flags & ~_KNOWN_FLAGS:
        raise InvalidArgumentError(f"unknown flags 0x{flags & ~_KNOWN_FLAGS:x}")
    for name, value, bits in (("step", step, 32), ("position", position, 32), ("segment", segment, 16)):
        if not 0 <= value < 1 << bits:
            raise InvalidArgumentError(f"{name} {value} out of range 0..{(1 << bits) - 1}")
    if len(ops) > MAX_OPS:
        raise InvalidArgumentError(f"{len(ops)} ops, at most {MAX_OPS}")
    if len(shape) > MAX_DIMS:
        raise InvalidArgumentError(f"{len(shape)} dims, at most {MAX_DIMS}")
    if len(payload) > MAX_PAYLOAD:
        raise InvalidArgumentError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    out = bytearray(
        FRAME_HEADER.pack(
            MAGIC,
            VERSION,
            kind,
            flags,
            session.bytes,
            step,
            position,
            segment,
            min(attempt, 0xFFFF),  # the count saturates; it is informational
            model_hash,
            _codec_id(codec),
            _codec_id(reply_codec),
            len(ops),
        )
    )
    for op in ops:
        _check_op_args(op)
        out += FRAME_OP.pack(op.kind, op.layer, op.mask)
    out += sampling_block
    out += _U8.pack(len(shape))
    for n in shape:
        out += _U32.pack(n)
    out += _U32.pack(len(payload))
    out += payload
    out += _U32.pack(codecs.crc32c(out))
    return bytes(out)


def _codec_id(codec: str | None) -> int:
    if codec is None:
        return 0
    if codec == TOKEN:
        return _TOKEN_ID
    try:
        return CODEC_IDS[codec]
    except KeyError:
        raise InvalidArgumentError(f"unknown codec {codec!r}; expected one of {', '.join(CODEC_IDS)}") from None


def _check_op_args(op: Op) -> None:
    if not 0 <= op.layer <= 0xFFFF:
        raise InvalidArgumentError(f"op {op.kind.name}: layer {op.layer} out of range 0..65535")
    if any(not 0 <= h < MAX_HEADS for h in op.heads):
        raise InvalidArgumentError(f"op {op.kind.name}: heads {op.heads} out of range 0..{MAX_HEADS - 1}")
    if len(set(op.heads)) != len(op.heads):
        raise InvalidArgumentError(f"op {op.kind.name}: duplicate heads in {op.heads}")
    if (op.kind is OpKind.ATTN_PART) != bool(op.heads):
        raise InvalidArgumentError(f"op {op.kind.name}: heads {op.heads} (only ATTN_PART has heads, at least one)")
    if op.kind is OpKind.LM_HEAD and op.layer != 0:
        raise InvalidArgumentError("op LM_HEAD: layer must be 0")


def encode_request(
    *,
    session: uuid.UUID,
    step: int,
    position: int,
    segment: int,
    model_hash: bytes,
    ops: Sequence[Op],
    tensor: EncodedTensor | npt.NDArray[np.float32] | None,
    codec: str | None = None,
    reply_codec: str | None = None,
    attempt: int = 0,
    flags: int = 0,
    sampling: Sampling | None = None,
    sample_index: int = 0,
) -> bytes:
    """A request frame. `tensor` is an array (encoded with `codec`) or already-encoded bytes (a
    checkpoint being re-sent); None only with Flags.CLOSE and no ops (a session close).
    `reply_codec` defaults to the tensor's codec; TOKEN (ops ending in LM_HEAD) asks for the token
    sampled under `sampling` for generated token `sample_index`, which it then requires."""
    if (reply_codec == TOKEN) != (sampling is not None):
        raise InvalidArgumentError("give sampling exactly when the reply codec is token")
    if sampling is not None and (not ops or ops[-1].kind is not OpKind.LM_HEAD):
        raise InvalidArgumentError("only a segment ending in LM_HEAD can answer with a sampled token")
    if not 0 <= sample_index < 1 << 32:
        raise InvalidArgumentError(f"sample_index {sample_index} out of range 0..{(1 << 32) - 1}")
    if tensor is None:
        if not (flags & Flags.CLOSE) or ops:
            raise InvalidArgumentError("a request without a tensor must be a CLOSE with no ops")
        enc = None
    elif isinstance(tensor, EncodedTensor):
        enc = tensor
    else:
        if codec is None:
            raise InvalidArgumentError("codec is required to encode an array")
        enc = encode_tensor(tensor, codec)
    if ops:
        _check_sequence(ops, InvalidArgumentError)
    return _encode(
        FrameKind.REQUEST,
        flags,
        session,
        step,
        position,
        segment,
        attempt,
        model_hash,
        None if enc is None else enc.codec,
        reply_codec if reply_codec is not None or enc is None else enc.codec,
        ops,
        () if enc is None else enc.shape,
        b"" if enc is None else enc.data,
        _sampling_block(sampling, sample_index),
    )


def _sampling_block(sampling: Sampling | None, index: int) -> bytes:
    if sampling is None:
        return b""
    s = sampling
    return SAMPLING_BLOCK.pack(s.temperature, s.top_p, s.top_k, index, s.logprobs, 0, 0, s.seed)


def encode_response(
    request: Frame, tensor: EncodedTensor | npt.NDArray[np.float32] | SampledToken, *, codec: str | None = None
) -> bytes:
    """The response to `request`: its header fields and ops echoed, `tensor` in `codec` (default:
    the request's reply codec), or the sampled token a TOKEN request asked for."""
    if isinstance(tensor, SampledToken):
        if request.reply_codec != TOKEN:
            raise InvalidArgumentError(f"the request asked for {request.reply_codec}, not a sampled token")
        enc = EncodedTensor(codec=TOKEN, shape=(1, 1 + len(tensor.top)), data=tensor.to_bytes())
    elif request.reply_codec == TOKEN:
        raise InvalidArgumentError("the request asked for a sampled token, not a tensor")
    else:
        enc = (
            tensor
            if isinstance(tensor, EncodedTensor)
            else encode_tensor(tensor, codec or request.reply_codec or "f32")
        )
    return _encode(
        FrameKind.RESPONSE,
        int(request.flags),
        request.session,
        request.step,
        request.position,
        request.segment,
        request.attempt,
        request.model_hash,
        enc.codec,
        request.reply_codec,
        request.ops,
        enc.shape,
        enc.data,
    )


def encode_error(code: str, message: str, *, request: Frame | None = None) -> bytes:
    """An error frame answering `request` (header echoed) or, for a frame that did not decode,
    with zero header fields (the reply still carries the request's MQTT CorrelationData)."""
    payload = json.dumps(
        {"code": str(code), "message": str(message)[:4096]}, separators=(",", ":"), ensure_ascii=False
    ).encode()
    if request is None:
        return _encode(FrameKind.ERROR, 0, uuid.UUID(int=0), 0, 0, 0, 0, bytes(16), None, None, (), (), payload)
    return _encode(
        FrameKind.ERROR,
        int(request.flags),
        request.session,
        request.step,
        request.position,
        request.segment,
        request.attempt,
        request.model_hash,
        None,
        None,
        request.ops,
        (),
        payload,
    )


def _probe_frame(kind: FrameKind, probe_id: uuid.UUID, model_hash: bytes, attempt: int, size: int, value: int) -> bytes:
    if not PROBE_MIN_SIZE <= size <= MAX_PROBE_SIZE:
        raise InvalidArgumentError(f"probe frame size {size} out of range {PROBE_MIN_SIZE}..{MAX_PROBE_SIZE}")
    payload = _U32.pack(value) + bytes(size - PROBE_MIN_SIZE)
    return _encode(kind, 0, probe_id, 0, 0, 0, attempt, model_hash, None, None, (), (), payload)


def encode_probe(
    *,
    model_hash: bytes = bytes(16),
    size: int = PROBE_MIN_SIZE,
    reply_size: int = PROBE_MIN_SIZE,
    probe_id: uuid.UUID | None = None,
    attempt: int = 0,
) -> bytes:
    """A link probe of exactly `size` bytes asking for a reply of exactly `reply_size` bytes (both
    PROBE_MIN_SIZE..MAX_PROBE_SIZE). `probe_id` (default: random) goes in the session field and
    comes back in the reply; no session is created by it. The model hash is carried and echoed but
    not checked: a probe measures the link, not the model."""
    if not PROBE_MIN_SIZE <= reply_size <= MAX_PROBE_SIZE:
        raise InvalidArgumentError(f"probe reply size {reply_size} out of range {PROBE_MIN_SIZE}..{MAX_PROBE_SIZE}")
    return _probe_frame(FrameKind.PROBE, probe_id or uuid.uuid4(), model_hash, attempt, size, reply_size)


def encode_probe_reply(probe: Frame, received_size: int) -> bytes:
    """The answer to `probe`: its id, attempt and model hash echoed, `probe.probe_size` bytes long,
    carrying the size the probe had when it arrived."""
    if probe.kind is not FrameKind.PROBE:
        raise InvalidArgumentError(f"not a probe but a {probe.kind.name.lower()} frame")
    value = min(max(received_size, 0), 0xFFFFFFFF)
    return _probe_frame(FrameKind.PROBE_REPLY, probe.session, probe.model_hash, probe.attempt, probe.probe_size, value)


def _check_probe(
    frame_kind: FrameKind, flags: int, step: int, position: int, segment: int, size: int, n_ops: int, payload_len: int
) -> None:
    """Probes and probe replies: no flags, ops, tensor or step/position/segment; a u32 size field;
    at most MAX_PROBE_SIZE bytes and, for a probe, a reply size within PROBE_MIN_SIZE..MAX_PROBE_SIZE."""
    name = frame_kind.name.lower().replace("_", " ")
    if size > MAX_PROBE_SIZE:
        raise FrameError(FrameFault.TOO_LARGE, f"{name} of {size} bytes, at most {MAX_PROBE_SIZE}")
    if flags:
        raise FrameError(FrameFault.BAD_FLAGS, f"a {name} carries no flags (got 0x{flags:04x})")
    if n_ops:
        raise FrameError(FrameFault.BAD_OP_SEQUENCE, f"a {name} carries no ops (got {n_ops})")
    if step or position or segment:
        raise FrameError(FrameFault.BAD_PROBE, f"a {name} has step, position and segment 0")
    if payload_len < 4:
        raise FrameError(FrameFault.BAD_PROBE, f"a {name} payload starts with a u32 size ({payload_len} bytes)")


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    n_layer: int | None = None,
    n_head: int | None = None,
    model_hash: bytes | None = None,
) -> Frame:
    """Parse and validate one frame; raises FrameError (never anything else) on any bad input.

    Given the receiver's model (`n_layer`, `n_head`, `model_hash`), layers, heads and the model
    hash are checked too. The returned payload is a view into `data`, not a copy.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError(FrameFault.TRUNCATED, f"expected bytes, got {type(data).__name__}")
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    size = mv.nbytes
    if size > MAX_FRAME:
        raise FrameError(FrameFault.TOO_LARGE, f"{size} bytes, at most {MAX_FRAME}")
    if size < 4 or mv[:4] != MAGIC:
        if size >= 4:
            raise FrameError(FrameFault.BAD_MAGIC, f"magic {bytes(mv[:4])!r}, expected {MAGIC!r}")
        raise FrameError(FrameFault.TRUNCATED, f"{size} bytes, shorter than a frame")
    if size < _MIN_FRAME:
        raise FrameError(FrameFault.TRUNCATED, f"{size} bytes, a frame has at least {_MIN_FRAME}")
    (_, version, kind, flags, sess, step, position, segment, attempt, mhash, codec_id, reply_id, n_ops) = (
        FRAME_HEADER.unpack_from(mv, 0)
    )
    if version != VERSION:
        raise FrameError(FrameFault.UNSUPPORTED_VERSION, f"version {version}, this side speaks {VERSION}")
    # Structure first (lengths), then the CRC, then the meaning of the fields: a corrupted byte
    # reports a length or CRC problem rather than a misleading semantic one.
    if n_ops > MAX_OPS:
        raise FrameError(FrameFault.LENGTH_MISMATCH, f"{n_ops} ops, at most {MAX_OPS}")
    off = HEADER_SIZE + n_ops * OP_SIZE
    sampling_off = off
    if kind == FrameKind.REQUEST and reply_id == _TOKEN_ID:
        off += SAMPLING_BLOCK.size
    if size < off + 1 + 4 + 4:
        raise FrameError(FrameFault.TRUNCATED, f"{size} bytes, too short for {n_ops} ops")
    ndim = mv[off]
    if ndim > MAX_DIMS:
        raise FrameError(FrameFault.TOO_MANY_DIMS, f"{ndim} dims, at most {MAX_DIMS}")
    dims_off = off + 1
    off = dims_off + 4 * ndim
    if size < off + 4 + 4:
        raise FrameError(FrameFault.TRUNCATED, f"{size} bytes, too short for {ndim} dims")
    (payload_len,) = _U32.unpack_from(mv, off)
    if payload_len > MAX_PAYLOAD:
        raise FrameError(FrameFault.TOO_LARGE, f"payload of {payload_len} bytes, at most {MAX_PAYLOAD}")
    payload_off = off + 4
    end = payload_off + payload_len
    if size != end + 4:
        fault = FrameFault.TRUNCATED if size < end + 4 else FrameFault.LENGTH_MISMATCH
        raise FrameError(fault, f"{size} bytes, the header says {end + 4}")
    (crc,) = _U32.unpack_from(mv, end)
    actual = codecs.crc32c(mv[:end])
    if crc != actual:
        raise FrameError(FrameFault.CRC_MISMATCH, f"CRC32C 0x{crc:08x} in the frame, 0x{actual:08x} computed")

    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise FrameError(FrameFault.UNKNOWN_KIND, f"frame kind {kind}") from None
    if flags & ~_KNOWN_FLAGS:
        raise FrameError(FrameFault.BAD_FLAGS, f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:04x}")
    codec = _codec_name(codec_id, "codec")
    reply_codec = _codec_name(reply_id, "reply codec")
    ops = tuple(_decode_op(mv, HEADER_SIZE + i * OP_SIZE, i, n_layer, n_head) for i in range(n_ops))
    shape = tuple(_U32.unpack_from(mv, dims_off + 4 * i)[0] for i in range(ndim))
    payload = mv[payload_off:end]
    sampling: Sampling | None = None
    sample_index = 0

    if (codec is None) != (ndim == 0):
        raise FrameError(FrameFault.BAD_DIMS, f"codec {codec} with {ndim} dims (no tensor ⇔ codec none)")
    if codec == TOKEN:
        if frame_kind is not FrameKind.RESPONSE or ndim != 2 or shape[0] != 1 or not 1 <= shape[1] <= 1 + MAX_LOGPROBS:
            raise FrameError(
                FrameFault.BAD_DIMS, f"a token payload is a response of shape (1, 1..{1 + MAX_LOGPROBS}), got {shape}"
            )
        if payload_len != SampledToken.wire_bytes(shape[1] - 1):
            raise FrameError(FrameFault.PAYLOAD_SIZE, f"{payload_len} payload bytes for {shape[1]} sampled entries")
    elif codec is not None:
        n = math.prod(shape)
        if n == 0:
            raise FrameError(FrameFault.BAD_DIMS, f"shape {shape} has a zero dimension")
        # Guard before codec_size: no codec packs an element in fewer than 4 bits.
        expected = codecs.codec_size(codec, n) if n <= 2 * MAX_PAYLOAD + 64 else MAX_PAYLOAD + 1
        if expected != payload_len:
            raise FrameError(
                FrameFault.PAYLOAD_SIZE, f"{payload_len} payload bytes, {codec} of shape {shape} takes {expected}"
            )
    if frame_kind in (FrameKind.PROBE, FrameKind.PROBE_REPLY):
        if codec is not None or reply_codec is not None:
            raise FrameError(FrameFault.BAD_DIMS, "a probe carries no tensor and no codec")
        _check_probe(frame_kind, flags, step, position, segment, size, n_ops, payload_len)
        if frame_kind is FrameKind.PROBE:
            (wanted,) = _U32.unpack_from(payload, 0)
            if wanted > MAX_PROBE_SIZE:
                raise FrameError(
                    FrameFault.TOO_LARGE, f"probe asks for a {wanted}-byte reply, at most {MAX_PROBE_SIZE}"
                )
            if wanted < PROBE_MIN_SIZE:
                raise FrameError(
                    FrameFault.BAD_PROBE, f"probe asks for a {wanted}-byte reply, at least {PROBE_MIN_SIZE}"
                )
    elif frame_kind is FrameKind.ERROR:
        if codec is not None or reply_codec is not None:
            raise FrameError(FrameFault.BAD_DIMS, "an error frame carries no tensor and no codec")
        _check_error_payload(payload)
    elif frame_kind is FrameKind.REQUEST:
        if codec is None:
            if not (flags & Flags.CLOSE) or ops or payload_len:
                raise FrameError(FrameFault.BAD_DIMS, "a request without a tensor must be an empty CLOSE")
        else:
            if not ops:
                raise FrameError(FrameFault.BAD_OP_SEQUENCE, "a request with a tensor needs ops")
            if reply_codec is None:
                raise FrameError(FrameFault.UNKNOWN_CODEC, "a request names its reply codec")
        if ops:
            _check_sequence(ops, None)
        if reply_codec == TOKEN:
            sampling, sample_index = _decode_sampling(mv, sampling_off, ops)
    elif codec is None:
        raise FrameError(FrameFault.BAD_DIMS, "a response carries a tensor")
    elif (codec == TOKEN) != (reply_codec == TOKEN):
        raise FrameError(FrameFault.BAD_DIMS, f"a response in codec {codec} answering reply codec {reply_codec}")
    if model_hash is not None and mhash != model_hash and frame_kind not in (FrameKind.PROBE, FrameKind.PROBE_REPLY):
        raise FrameError(
            FrameFault.MODEL_MISMATCH, f"frame for model {mhash.hex()}, this side has {bytes(model_hash).hex()}"
        )
    return Frame(
        kind=frame_kind,
        flags=Flags(flags),
        session=uuid.UUID(bytes=sess),
        step=step,
        position=position,
        segment=segment,
        attempt=attempt,
        model_hash=mhash,
        codec=codec,
        reply_codec=reply_codec,
        ops=ops,
        shape=shape,
        payload=payload,
        sampling=sampling,
        sample_index=sample_index,
    )


def _decode_sampling(mv: memoryview, off: int, ops: tuple[Op, ...]) -> tuple[Sampling, int]:
    temperature, top_p, top_k, index, logprobs, reserved8, reserved16, seed = SAMPLING_BLOCK.unpack_from(mv, off)
    if not ops or ops[-1].kind is not OpKind.LM_HEAD:
        raise FrameError(FrameFault.BAD_SAMPLING, "a sampled-token reply needs ops ending in LM_HEAD")
    if reserved8 or reserved16:
        raise FrameError(FrameFault.BAD_SAMPLING, "the sampling block's reserved fields must be 0")
    try:
        return Sampling(temperature, top_k, top_p, seed, logprobs), index
    except InvalidArgumentError as exc:
        raise FrameError(FrameFault.BAD_SAMPLING, str(exc)) from None


def _codec_name(codec_id: int, what: str) -> str | None:
    if codec_id == 0:
        return None
    name = _CODEC_NAMES.get(codec_id)
    if name is None:
        raise FrameError(FrameFault.UNKNOWN_CODEC, f"{what} id {codec_id}")
    return name


def _decode_op(mv: memoryview, off: int, i: int, n_layer: int | None, n_head: int | None) -> Op:
    kind_id, layer, mask = FRAME_OP.unpack_from(mv, off)
    try:
        kind = OpKind(kind_id)
    except ValueError:
        raise FrameError(FrameFault.UNKNOWN_OP, f"ops[{i}]: op kind {kind_id}") from None
    if kind is OpKind.ATTN_PART:
        if mask == 0:
            raise FrameError(FrameFault.BAD_OP, f"ops[{i}]: ATTN_PART with no heads")
        if n_head is not None and mask >> n_head:
            raise FrameError(
                FrameFault.HEADS_OUT_OF_RANGE, f"ops[{i}]: head mask 0x{mask:x} beyond heads 0..{n_head - 1}"
            )
    elif mask:
        raise FrameError(FrameFault.BAD_OP, f"ops[{i}]: {kind.name} carries a head mask 0x{mask:x}")
    if kind is OpKind.LM_HEAD:
        if layer:
            raise FrameError(FrameFault.BAD_OP, f"ops[{i}]: LM_HEAD with layer {layer} (must be 0)")
    elif n_layer is not None and layer >= n_layer:
        raise FrameError(FrameFault.LAYER_OUT_OF_RANGE, f"ops[{i}]: layer {layer} out of range 0..{n_layer - 1}")
    heads = tuple(h for h in range(MAX_HEADS) if mask >> h & 1) if mask else ()
    return Op(kind, layer, heads)


def _check_sequence(ops: Sequence[Op], exc: type[InvalidArgumentError] | None) -> None:
    """The segment grammar: [ATTN_PART] | [FFN_DOWN] | [FFN] | [RESIDUAL_FFN?, LAYER*, LM_HEAD?]
    with consecutive layers; raises FrameError (exc None) or `exc`."""
    problem = segment_problem(ops)
    if problem is None:
        return
    if exc is None:
        raise FrameError(FrameFault.BAD_OP_SEQUENCE, problem)
    raise exc(problem)


def _check_error_payload(payload: memoryview) -> None:
    if len(payload) > MAX_ERROR_PAYLOAD:
        raise FrameError(FrameFault.BAD_ERROR_PAYLOAD, f"error payload of {len(payload)} bytes")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(FrameFault.BAD_ERROR_PAYLOAD, f"error payload is not UTF-8 JSON: {exc}") from None
    if not (
        isinstance(obj, dict)
        and obj.keys() == {"code", "message"}
        and isinstance(obj["code"], str)
        and isinstance(obj["message"], str)
    ):
        raise FrameError(FrameFault.BAD_ERROR_PAYLOAD, 'error payload must be {"code": str, "message": str}')


class ErrorCode(StrEnum):
    """Error codes of app replies and of segment error frames."""

    BAD_REQUEST = "bad_request"  # invalid infer request / segment op for this worker
    OVERLOADED = "overloaded"  # the device's request queue (or a worker) is full
    INTERNAL = "internal"  # a bug or an unexpected failure; the message says more
    MODEL_MISMATCH = "model_mismatch"  # plan or frame for another model
    BAD_FRAME = "bad_frame"  # segment frame failed validation (message starts with the FrameFault)
    UNKNOWN_SESSION = "unknown_session"  # worker holds no KV for this session: replay checkpoints
    TIMEOUT = "timeout"  # the request could not finish in time
