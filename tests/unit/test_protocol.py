"""Offload protocol: topics, segment frames (round trips, every validation, fuzzing), app JSON messages."""

from __future__ import annotations

import json
import struct
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cloud_offload.mqtt import mqtt_payload
from cloud_offload.protocol import frames, topics
from cloud_offload.protocol.frames import FrameFault, FrameKind
from splitwise_core import codecs
from splitwise_core.errors import FrameError, InvalidArgumentError, SplitwiseError
from splitwise_core.ops import HEADER_SIZE, OP_SIZE, SAMPLING_BLOCK, Op, OpKind
from splitwise_core.sampling import MAX_LOGPROBS, SampledToken, Sampling, sample
from splitwise_device import app_messages

SESSION = uuid.UUID("12345678-1234-5678-1234-567812345678")
MODEL_HASH = frames.model_hash_prefix(bytes(range(32)))
OPS_BY_KIND: dict[OpKind, tuple[list[Op], int]] = {  # ops, input columns (d=64, n_ff=96)
    OpKind.ATTN_PART: ([Op(OpKind.ATTN_PART, 3, (0, 4, 8))], 64),
    OpKind.FFN_DOWN: ([Op(OpKind.FFN_DOWN, 29)], 96),
    OpKind.FFN: ([Op(OpKind.FFN, 0)], 64),
    OpKind.RESIDUAL_FFN: ([Op(OpKind.RESIDUAL_FFN, 5), Op(OpKind.LAYER, 6), Op(OpKind.LAYER, 7)], 64),
    OpKind.LAYER: ([Op(OpKind.LAYER, i) for i in range(10, 30)], 64),
    OpKind.LM_HEAD: ([Op(OpKind.LAYER, 28), Op(OpKind.LAYER, 29), Op(OpKind.LM_HEAD)], 64),
}


def request(
    ops: list[Op] | None = None, rows: int = 3, cols: int = 64, codec: str = "q8_0", **kw: Any
) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(rows * cols).normal(size=(rows, cols)).astype(np.float32)
    args: dict[str, Any] = {
        "session": SESSION,
        "step": 7,
        "position": 40,
        "segment": 2,
        "model_hash": MODEL_HASH,
        "ops": ops if ops is not None else [Op(OpKind.ATTN_PART, 1, (2, 3))],
        "tensor": x,
        "codec": codec,
    }
    args.update(kw)
    return frames.encode_request(**args), x


def reseal(frame: bytes | bytearray) -> bytes:
    """Recompute the CRC so a deliberately malformed field reaches the semantic checks."""
    body = bytes(frame[:-4])
    return body + struct.pack("<I", codecs.crc32c(body))


def patched(frame: bytes, offset: int, value: bytes) -> bytes:
    out = bytearray(frame)
    out[offset : offset + len(value)] = value
    return reseal(out)


def fault(data: bytes, **kw: Any) -> FrameFault:
    with pytest.raises(FrameError) as info:
        frames.decode_frame(data, **kw)
    assert isinstance(info.value, SplitwiseError) and isinstance(info.value, ValueError)
    return FrameFault(info.value.reason)


OPS_OFF = HEADER_SIZE  # first op


def desc_off(n_ops: int) -> int:
    return HEADER_SIZE + n_ops * OP_SIZE


# --- topics -------------------------------------------------------------------------------------


def test_topics() -> None:
    assert topics.device_infer_topic("pi-5_a") == "splitwise/v1/device/pi-5_a/infer"
    assert topics.device_status_topic("pi") == "splitwise/v1/device/pi/status"
    assert topics.device_reply_topic("pi", "n0nce") == "splitwise/v1/device/pi/reply/n0nce"
    assert topics.device_reply_filter("pi") == "splitwise/v1/device/pi/reply/+"
    assert topics.pool_segment_topic("eu") == "splitwise/v1/cloud/eu/segment"
    assert topics.pool_segment_share("eu") == "$share/eu/splitwise/v1/cloud/eu/segment"
    assert topics.worker_segment_topic("w1") == "splitwise/v1/cloud/worker/w1/segment"
    assert topics.worker_status_topic("w1") == "splitwise/v1/cloud/worker/w1/status"


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "a/b", "x" * 65, "é", "a b", "$sys"])
def test_bad_ids(bad: str) -> None:
    for build in (
        topics.device_infer_topic,
        topics.pool_segment_topic,
        topics.pool_segment_share,
        topics.worker_status_topic,
    ):
        with pytest.raises(InvalidArgumentError):
            build(bad)
    with pytest.raises(InvalidArgumentError):
        topics.device_reply_topic("ok", bad)


def test_pool_named_worker_is_reserved() -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        topics.pool_segment_topic("worker")
    assert topics.validate_id("x" * 64) == "x" * 64


# --- frame round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("kind", list(OpKind))
def test_round_trip_every_op_and_codec(kind: OpKind, codec: str) -> None:
    ops, cols = OPS_BY_KIND[kind]
    data, x = request(ops, rows=5, cols=cols, codec=codec, attempt=3, reply_codec="f32")
    frame = frames.decode_frame(data, n_layer=30, n_head=9, model_hash=MODEL_HASH)
    assert frame.kind is FrameKind.REQUEST
    assert (frame.session, frame.step, frame.position, frame.segment, frame.attempt) == (SESSION, 7, 40, 2, 3)
    assert frame.model_hash == MODEL_HASH
    assert (frame.codec, frame.reply_codec, frame.shape) == (codec, "f32", (5, cols))
    assert frame.ops == tuple(ops)
    expected = codecs.decode(codecs.encode(x, codec), codec, x.shape)
    np.testing.assert_array_equal(frame.tensor(), expected)
    assert frame.payload.obj is data  # a view, not a copy

    y = np.arange(5 * 64, dtype=np.float32).reshape(5, 64)
    reply = frames.decode_frame(frames.encode_response(frame, y))
    assert reply.kind is FrameKind.RESPONSE and reply.codec == "f32"  # the requested reply codec
    assert reply.dedup_key == frame.dedup_key and reply.ops == frame.ops and reply.attempt == 3
    np.testing.assert_array_equal(reply.tensor(), y)

    err = frames.decode_frame(
        frames.encode_error(frames.ErrorCode.UNKNOWN_SESSION, "no KV for this session", request=frame)
    )
    assert err.kind is FrameKind.ERROR and err.dedup_key == frame.dedup_key
    assert err.error() == ("unknown_session", "no KV for this session")
    assert err.codec is None and err.shape == ()


def test_reply_codec_defaults_to_the_request_codec() -> None:
    data, _ = request(codec="f16")
    frame = frames.decode_frame(data)
    assert frame.reply_codec == "f16"
    assert frames.decode_frame(frames.encode_response(frame, np.ones((3, 64), np.float32))).codec == "f16"
    assert frames.decode_frame(frames.encode_response(frame, np.ones((1, 9), np.float32), codec="q4_0")).codec == "q4_0"


def test_checkpoint_resend_and_flags() -> None:
    x = np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)
    checkpoint = frames.encode_tensor(x, "q4_0")
    data = frames.encode_request(
        session=SESSION,
        step=3,
        position=9,
        segment=0,
        model_hash=MODEL_HASH,
        ops=[Op(OpKind.LAYER, 4)],
        tensor=checkpoint,
        flags=frames.Flags.REPLAY,
        attempt=70000,
    )
    frame = frames.decode_frame(data)
    assert frame.flags == frames.Flags.REPLAY and frame.attempt == 0xFFFF
    assert frame.encoded() == checkpoint
    np.testing.assert_array_equal(frame.tensor(), checkpoint.decode())


def test_session_close_has_no_tensor() -> None:
    data = frames.encode_request(
        session=SESSION,
        step=9,
        position=0,
        segment=0,
        model_hash=MODEL_HASH,
        ops=[],
        tensor=None,
        flags=frames.Flags.CLOSE,
    )
    frame = frames.decode_frame(data)
    assert frame.flags == frames.Flags.CLOSE and frame.codec is None and frame.ops == () and len(frame.payload) == 0
    with pytest.raises(FrameError):
        frame.tensor()
    with pytest.raises(InvalidArgumentError):
        frames.encode_request(
            session=SESSION, step=9, position=0, segment=0, model_hash=MODEL_HASH, ops=[Op(OpKind.FFN, 1)], tensor=None
        )


def test_error_for_an_undecodable_frame() -> None:
    frame = frames.decode_frame(frames.encode_error("bad_frame", "crc_mismatch: ..."))
    assert frame.session == uuid.UUID(int=0) and frame.error() == ("bad_frame", "crc_mismatch: ...")


def test_dedup_key_ignores_the_attempt() -> None:
    keys = {frames.decode_frame(request(attempt=a)[0]).dedup_key for a in range(3)}
    assert keys == {(SESSION, 7, 2)}
    assert frames.decode_frame(request(segment=3)[0]).dedup_key != (SESSION, 7, 2)
    assert frames.decode_frame(request(step=8)[0]).dedup_key != (SESSION, 7, 2)


def test_frame_layout() -> None:
    data, _ = request([Op(OpKind.ATTN_PART, 513, (0, 63))], rows=2, cols=32, codec="f32", attempt=1)
    assert HEADER_SIZE == 56 and OP_SIZE == 11
    assert data[:4] == b"SWSG" and data[4] == 1 and data[5] == FrameKind.REQUEST
    assert data[8:24] == SESSION.bytes and data[36:52] == MODEL_HASH
    assert struct.unpack_from("<H", data, 6) == (0,)
    assert struct.unpack_from("<IIHH", data, 24) == (7, 40, 2, 1)
    assert struct.unpack_from("<BBH", data, 52) == (frames.CODEC_IDS["f32"], frames.CODEC_IDS["f32"], 1)
    assert struct.unpack_from("<BHQ", data, 56) == (OpKind.ATTN_PART, 513, 1 | 1 << 63)
    assert struct.unpack_from("<BII", data, 67) == (2, 2, 32)
    assert struct.unpack_from("<I", data, 76) == (2 * 32 * 4,)
    assert len(data) == 80 + 256 + 4
    assert struct.unpack_from("<I", data, len(data) - 4) == (codecs.crc32c(data[:-4]),)


# --- validation --------------------------------------------------------------------------------


def test_bad_magic_version_truncation_length_crc() -> None:
    data, _ = request()
    assert fault(b"XXXX" + data[4:]) is FrameFault.BAD_MAGIC
    assert fault(patched(data, 4, b"\x02")) is FrameFault.UNSUPPORTED_VERSION
    assert fault(data[:3]) is FrameFault.TRUNCATED
    assert fault(b"") is FrameFault.TRUNCATED
    for cut in (10, HEADER_SIZE + 5, len(data) - 1):
        assert fault(data[:cut]) is FrameFault.TRUNCATED
    assert fault(data + b"\x00") is FrameFault.LENGTH_MISMATCH
    corrupt = bytearray(data)
    corrupt[-10] ^= 0x01
    assert fault(bytes(corrupt)) is FrameFault.CRC_MISMATCH
    assert fault(data[:-1] + bytes([data[-1] ^ 0x80])) is FrameFault.CRC_MISMATCH


def test_unknown_kind_flags_codec_op() -> None:
    data, _ = request()
    assert fault(patched(data, 5, b"\x09")) is FrameFault.UNKNOWN_KIND
    assert fault(patched(data, 6, struct.pack("<H", 0x8000))) is FrameFault.BAD_FLAGS
    assert fault(patched(data, 52, b"\x07")) is FrameFault.UNKNOWN_CODEC
    assert fault(patched(data, 53, b"\x07")) is FrameFault.UNKNOWN_CODEC
    assert fault(patched(data, OPS_OFF, b"\x63")) is FrameFault.UNKNOWN_OP


def test_op_fields() -> None:
    data, _ = request([Op(OpKind.ATTN_PART, 3, (1, 8))])
    mask_off = OPS_OFF + 3
    assert frames.decode_frame(data, n_head=9).ops[0].heads == (1, 8)
    assert fault(patched(data, mask_off, struct.pack("<Q", 1 << 9)), n_head=9) is FrameFault.HEADS_OUT_OF_RANGE
    assert fault(patched(data, mask_off, struct.pack("<Q", 0))) is FrameFault.BAD_OP
    assert fault(data, n_layer=3) is FrameFault.LAYER_OUT_OF_RANGE
    ffn, _ = request([Op(OpKind.FFN, 2)])
    assert fault(patched(ffn, mask_off, struct.pack("<Q", 1))) is FrameFault.BAD_OP
    lm, _ = request([Op(OpKind.LM_HEAD)])
    assert fault(patched(lm, OPS_OFF + 1, struct.pack("<H", 4))) is FrameFault.BAD_OP


@pytest.mark.parametrize(
    "ops",
    [
        [Op(OpKind.ATTN_PART, 1, (0,)), Op(OpKind.LAYER, 2)],
        [Op(OpKind.LAYER, 2), Op(OpKind.FFN_DOWN, 2)],
        [Op(OpKind.LAYER, 2), Op(OpKind.RESIDUAL_FFN, 3)],
        [Op(OpKind.LAYER, 2), Op(OpKind.LAYER, 4)],
        [Op(OpKind.LAYER, 2), Op(OpKind.LAYER, 2)],
        [Op(OpKind.LM_HEAD), Op(OpKind.LAYER, 0)],
    ],
)
def test_bad_op_sequences(ops: list[Op]) -> None:
    with pytest.raises(InvalidArgumentError):
        request(ops)
    # The same frame built by hand (as a buggy or hostile sender would) fails decoding.
    good, _ = request([Op(OpKind.LAYER, i) for i in range(len(ops))])
    raw = (
        good[:OPS_OFF]
        + b"".join(struct.pack("<BHQ", op.kind, op.layer, op.mask) for op in ops)
        + good[desc_off(len(ops)) :]
    )
    assert fault(reseal(raw)) is FrameFault.BAD_OP_SEQUENCE


def test_encode_rejects_bad_ops() -> None:
    for op in (Op(OpKind.ATTN_PART, 0, (64,)), Op(OpKind.ATTN_PART, 0, ()), Op(OpKind.FFN, 0, (1,))):
        with pytest.raises(InvalidArgumentError):
            request([op])
    with pytest.raises(InvalidArgumentError, match="layer"):
        request([Op(OpKind.FFN, 70000)])
    with pytest.raises(InvalidArgumentError, match="codec"):
        request(codec="q2_k")
    with pytest.raises(InvalidArgumentError, match="model_hash"):
        request(model_hash=b"short")


def test_dims_and_payload_size() -> None:
    data, _ = request(rows=3, cols=64, codec="f16")
    d = desc_off(1)
    assert fault(patched(data, d, b"\x05")) in (FrameFault.TOO_MANY_DIMS,)
    assert fault(patched(data, d + 1, struct.pack("<I", 4))) is FrameFault.PAYLOAD_SIZE
    assert fault(patched(data, d + 1, struct.pack("<I", 0))) is FrameFault.BAD_DIMS
    assert fault(patched(data, d + 1, struct.pack("<I", 0xFFFFFFFF))) is FrameFault.PAYLOAD_SIZE
    # a tensor with codec "none"
    assert fault(patched(data, 52, b"\x00")) is FrameFault.BAD_DIMS
    # a response must carry a tensor; an error must not
    close = frames.encode_request(
        session=SESSION,
        step=0,
        position=0,
        segment=0,
        model_hash=MODEL_HASH,
        ops=[],
        tensor=None,
        flags=frames.Flags.CLOSE,
    )
    assert fault(patched(close, 5, bytes([FrameKind.RESPONSE]))) is FrameFault.BAD_DIMS
    assert fault(patched(data, 5, bytes([FrameKind.ERROR]))) is FrameFault.BAD_DIMS


def test_non_finite_payload_fails_when_decoded() -> None:
    data, _ = request(rows=1, cols=32, codec="q8_0")
    d = desc_off(1)
    payload_off = d + 1 + 8 + 4
    frame = frames.decode_frame(patched(data, payload_off, b"\x00\x7c"))  # float16 +inf block scale
    with pytest.raises(FrameError) as info:
        frame.tensor()
    assert info.value.reason is FrameFault.BAD_PAYLOAD


def test_error_payload_must_be_code_and_message() -> None:
    good = frames.encode_error("internal", "boom")
    d = desc_off(0)
    for payload in (b"\xff", b"[]", b'{"code":"x"}', b'{"code":1,"message":"m"}', b"not json"):
        raw = good[: d + 1] + struct.pack("<I", len(payload)) + payload + b"\0\0\0\0"
        assert fault(reseal(raw)) is FrameFault.BAD_ERROR_PAYLOAD


def test_model_hash_is_checked_when_given() -> None:
    data, _ = request()
    other = frames.model_hash_prefix("ab" * 32)
    assert fault(data, model_hash=other) is FrameFault.MODEL_MISMATCH
    assert frames.decode_frame(data).model_hash == MODEL_HASH  # always readable, e.g. to answer model_mismatch
    with pytest.raises(InvalidArgumentError):
        frames.model_hash_prefix(b"\0" * 16)


def test_size_limits() -> None:
    # Declared payload over 64 MiB: rejected from the length field, before anything is read.
    data, _ = request()
    d = desc_off(1)
    ndim = data[d]
    len_off = d + 1 + 4 * ndim
    assert fault(patched(data, len_off, struct.pack("<I", frames.MAX_PAYLOAD + 1))) is FrameFault.TOO_LARGE
    assert fault(b"SWSG" + bytes(frames.MAX_FRAME)) is FrameFault.TOO_LARGE
    big = np.zeros((frames.MAX_PAYLOAD // 4 + 1,), np.float32)
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        frames.encode_request(
            session=SESSION,
            step=0,
            position=0,
            segment=0,
            model_hash=MODEL_HASH,
            ops=[Op(OpKind.FFN, 0)],
            tensor=big,
            codec="f32",
        )
    # Exactly 64 MiB is allowed.
    edge = np.zeros((4, frames.MAX_PAYLOAD // 16), np.float32)
    frame = frames.decode_frame(
        frames.encode_request(
            session=SESSION,
            step=0,
            position=0,
            segment=0,
            model_hash=MODEL_HASH,
            ops=[Op(OpKind.FFN, 0)],
            tensor=edge,
            codec="f32",
        )
    )
    assert len(frame.payload) == frames.MAX_PAYLOAD


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data, _ = request()
    assert frames.decode_frame(bytearray(data)).dedup_key == frames.decode_frame(memoryview(data)).dedup_key
    with pytest.raises(FrameError):
        frames.decode_frame("SWSG")  # type: ignore[arg-type]


# --- fuzzing -----------------------------------------------------------------------------------

VALID_FRAMES = [
    request(OPS_BY_KIND[k][0], rows=2, cols=OPS_BY_KIND[k][1], codec=c)[0] for k in OpKind for c in codecs.CODECS
] + [frames.encode_error("internal", "boom")]
TOKEN_OPS = [Op(OpKind.LAYER, 29), Op(OpKind.LM_HEAD, 0)]
TOKEN_SAMPLING = Sampling(temperature=0.8, top_k=40, top_p=0.95, seed=(1 << 64) - 1, logprobs=3)
TOKEN_REQUEST = request(
    TOKEN_OPS, rows=1, cols=576, reply_codec=frames.TOKEN, sampling=TOKEN_SAMPLING, sample_index=11
)[0]
TOKEN_RESPONSE = frames.encode_response(
    frames.decode_frame(TOKEN_REQUEST), SampledToken(42, -0.25, ((42, -0.25), (7, -2.5), (9, -3.0)))
)
VALID_FRAMES += [TOKEN_REQUEST, TOKEN_RESPONSE]


def has_sampling_block(frame: bytes) -> bool:
    return frame[5] == FrameKind.REQUEST and frame[53] == 5


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        frames.decode_frame(data, n_layer=30, n_head=9, model_hash=MODEL_HASH)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_after_a_valid_prefix_raise_frame_error(tail: bytes) -> None:
    with pytest.raises(FrameError):
        frames.decode_frame(VALID_FRAMES[0][:56] + tail, n_layer=30, n_head=9)


@settings(max_examples=1000)
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_single_byte_corruption_is_always_detected(frame: bytes, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(frame) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != frame[i]))
    corrupt = frame[:i] + bytes([new]) + frame[i + 1 :]
    with pytest.raises(FrameError):
        frames.decode_frame(corrupt, n_layer=30, n_head=9)


@settings(max_examples=1000)
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_a_flipped_bit_outside_the_length_fields_is_a_crc_mismatch(frame: bytes, data: st.DataObject) -> None:
    n_ops = struct.unpack_from("<H", frame, 54)[0]
    d = desc_off(n_ops) + (28 if has_sampling_block(frame) else 0)
    ndim = frame[d]
    length_fields = {4, 54, 55, d, *range(d + 1 + 4 * ndim, d + 5 + 4 * ndim)}  # version, n_ops, ndim, length
    i = data.draw(st.integers(4, len(frame) - 1).filter(lambda j: j not in length_fields))
    bit = data.draw(st.integers(0, 7))
    corrupt = frame[:i] + bytes([frame[i] ^ (1 << bit)]) + frame[i + 1 :]
    if has_sampling_block(corrupt) != has_sampling_block(frame):
        # The kind or the reply codec decides whether a sampling block follows the ops: the layout moves.
        assert fault(corrupt) in (FrameFault.TRUNCATED, FrameFault.LENGTH_MISMATCH, FrameFault.TOO_MANY_DIMS)
    else:
        assert fault(corrupt) is FrameFault.CRC_MISMATCH


@settings(max_examples=300)
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_every_truncation_is_detected(frame: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(frame) - 1))
    assert fault(frame[:cut]) in (FrameFault.TRUNCATED, FrameFault.LENGTH_MISMATCH, FrameFault.TOO_LARGE)


# --- app ↔ device JSON --------------------------------------------------------------------------


def test_infer_request_prompt_and_defaults() -> None:
    req = app_messages.InferRequest.parse(b'{"prompt": "Hi"}')
    assert (req.prompt, req.max_tokens, req.temperature, req.seed, req.stream, req.plan) == (
        "Hi",
        None,  # the device's configured default
        0.0,
        None,
        False,
        None,
    )


def test_infer_request_full() -> None:
    doc = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 2048,
        "temperature": 2,
        "seed": 42,
        "stream": True,
        "plan": "heads:3",
        "reply_to": "app/replies/1",
        "request_id": "r-1",
    }
    req = app_messages.InferRequest.parse(json.dumps(doc))
    assert req.messages is not None and req.messages[1].role == "user"
    assert req.plan == "heads:3" and req.reply_to == "app/replies/1"
    inline = {"version": 1, "n_layer": 1, "n_head": 9, "layers": [], "lm_head": "edge"}
    assert app_messages.InferRequest.parse(json.dumps({"prompt": "x", "plan": inline})).plan == inline
    assert app_messages.InferRequest.parse(b'{"prompt": "x", "planner": "splitwise-dp"}').planner == "splitwise-dp"


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "a", "max_tokens": 0},
        {"prompt": "a", "max_tokens": 2049},
        {"prompt": "a", "max_tokens": True},
        {"prompt": "a", "max_tokens": 1.5},
        {"prompt": "a", "temperature": 2.01},
        {"prompt": "a", "temperature": -0.1},
        {"prompt": "a", "seed": -1},
        {"prompt": "é" * (16 * 1024 + 1)},
        {"messages": []},
        {"messages": [{"role": "tool", "content": "b"}]},
        {"messages": [{"role": "user", "content": "b", "name": "x"}]},
        {"prompt": "a", "unknown": 1},
        {"prompt": "a", "plan": "/etc/passwd"},
        {"prompt": "a", "plan": "heads"},
        {"prompt": "a", "planner": "splitwise_rl"},
        {"prompt": "a", "planner": "fixed"},
        {"prompt": "a", "plan": "edge-only", "planner": "layer-dp"},
        {"prompt": "a", "reply_to": "a/+/b"},
        {"prompt": "a", "reply_to": "$SYS/x"},
        {"prompt": "a", "reply_to": ""},
    ],
)
def test_infer_request_rejects(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        app_messages.InferRequest.parse(json.dumps(doc))


def test_device_limits_apply() -> None:
    doc = b'{"prompt": "abcd", "max_tokens": 300}'
    assert app_messages.InferRequest.parse(doc).max_tokens == 300
    with pytest.raises(ValidationError, match="exceeds the limit 256"):
        app_messages.InferRequest.parse(doc, max_tokens_limit=256)
    with pytest.raises(ValidationError, match="longer than 3 bytes"):
        app_messages.InferRequest.parse(doc, max_prompt_bytes=3)
    assert app_messages.InferRequest.parse(b'{"prompt": "' + b"a" * 40000 + b'"}', max_prompt_bytes=1 << 20).prompt


def test_prompt_limit_is_in_bytes() -> None:
    assert app_messages.InferRequest(prompt="a" * app_messages.MAX_PROMPT_BYTES).prompt is not None
    with pytest.raises(ValidationError):
        app_messages.InferRequest(
            messages=[app_messages.ChatMessage(role="user", content="a" * (app_messages.MAX_PROMPT_BYTES + 1))]
        )


def test_reply_builders() -> None:
    assert json.loads(mqtt_payload(app_messages.chunk_reply(0, "Hel"))) == {
        "type": "chunk",
        "index": 0,
        "text": "Hel",
    }
    final = app_messages.final_reply(
        text="Hello",
        prompt_tokens=5,
        completion_tokens=2,
        plan={"name": "edge-only"},
        timings={"total_s": 0.5},
        recovery=[{"event": "retry", "segment": 1}],
        stop_reason="eos",
        request_id="r-1",
    )
    assert json.loads(mqtt_payload(final)) == {
        "type": "final",
        "text": "Hello",
        "tokens": {"prompt": 5, "completion": 2},
        "plan": {"name": "edge-only"},
        "timings": {"total_s": 0.5},
        "recovery": [{"event": "retry", "segment": 1}],
        "stop_reason": "eos",
        "request_id": "r-1",
    }
    err = app_messages.error_reply(frames.ErrorCode.OVERLOADED, "queue full (8 waiting)")
    assert json.loads(mqtt_payload(err)) == {
        "type": "error",
        "error": {"code": "overloaded", "message": "queue full (8 waiting)"},
    }
    assert mqtt_payload({"t": "é"}) == '{"t":"é"}'.encode()


# --- worker profile topics and link probes --------------------------------------------------------


def test_profile_topics() -> None:
    assert topics.worker_profile_topic("eu", "w1") == "splitwise/v1/cloud/eu/profile/w1"
    assert topics.pool_profile_filter("eu") == "splitwise/v1/cloud/eu/profile/+"
    for bad in ("", "a+b", "a#", "a/b", "x" * 65):
        with pytest.raises(InvalidArgumentError):
            topics.worker_profile_topic("eu", bad)
        with pytest.raises(InvalidArgumentError):
            topics.worker_profile_topic(bad, "w1")
        with pytest.raises(InvalidArgumentError):
            topics.pool_profile_filter(bad)
    with pytest.raises(InvalidArgumentError, match="reserved"):
        topics.pool_profile_filter("worker")


def test_probe_round_trip_and_sizes() -> None:
    pid = uuid.uuid4()
    data = frames.encode_probe(size=1000, reply_size=70_000, probe_id=pid, attempt=2)
    assert len(data) == 1000 and data[5] == FrameKind.PROBE
    frame = frames.decode_frame(data, n_layer=30, n_head=9, model_hash=MODEL_HASH)  # model hash not checked
    assert (frame.kind, frame.session, frame.attempt, frame.probe_size) == (FrameKind.PROBE, pid, 2, 70_000)
    assert frame.ops == () and frame.codec is None and frame.shape == ()
    reply = frames.encode_probe_reply(frame, len(data))
    assert len(reply) == 70_000
    back = frames.decode_frame(reply)
    assert (back.kind, back.session, back.attempt, back.probe_size) == (FrameKind.PROBE_REPLY, pid, 2, 1000)
    smallest = frames.encode_probe()
    assert len(smallest) == frames.PROBE_MIN_SIZE == 69
    assert frames.decode_frame(smallest).probe_size == frames.PROBE_MIN_SIZE
    assert (
        len(frames.encode_probe(size=frames.MAX_PROBE_SIZE, reply_size=frames.MAX_PROBE_SIZE)) == frames.MAX_PROBE_SIZE
    )
    bad_sizes: list[dict[str, Any]] = [{"size": 68}, {"reply_size": 68}, {"size": frames.MAX_PROBE_SIZE + 1}]
    for kw in [*bad_sizes, {"reply_size": frames.MAX_PROBE_SIZE + 1}]:
        with pytest.raises(InvalidArgumentError):
            frames.encode_probe(**kw)
    with pytest.raises(InvalidArgumentError):
        frames.encode_probe_reply(back, 10)
    with pytest.raises(FrameError):
        _ = frames.decode_frame(request()[0]).probe_size


def test_probe_validation() -> None:
    data = frames.encode_probe(size=200, reply_size=500)
    size_off = HEADER_SIZE + 1 + 4  # no ops, ndim 0, payload length, then the u32 size field
    assert fault(patched(data, size_off, struct.pack("<I", frames.MAX_PROBE_SIZE + 1))) is FrameFault.TOO_LARGE
    assert fault(patched(data, size_off, struct.pack("<I", 68))) is FrameFault.BAD_PROBE
    assert fault(patched(data, 6, b"\x01\x00")) is FrameFault.BAD_FLAGS
    assert fault(patched(data, 24, b"\x01")) is FrameFault.BAD_PROBE  # step
    assert fault(patched(data, 28, b"\x01")) is FrameFault.BAD_PROBE  # position
    assert fault(patched(data, 32, b"\x01")) is FrameFault.BAD_PROBE  # segment
    assert fault(patched(data, 52, b"\x01")) is FrameFault.BAD_DIMS  # a codec without a tensor
    assert fault(patched(data, 53, b"\x01")) is FrameFault.BAD_DIMS  # a reply codec
    corrupt = bytearray(data)
    corrupt[100] ^= 0x10
    assert fault(bytes(corrupt)) is FrameFault.CRC_MISMATCH
    # A payload without the u32 size field.
    body = bytearray(data[: HEADER_SIZE + 1])
    body += struct.pack("<I", 2) + b"\x00\x00"
    assert fault(reseal(body + b"\x00" * 4)) is FrameFault.BAD_PROBE
    # With an op: probes carry none.
    with_op = bytearray(data[:HEADER_SIZE])
    with_op[54:56] = struct.pack("<H", 1)
    with_op += struct.pack("<BHQ", OpKind.FFN, 0, 0) + data[HEADER_SIZE:-4] + b"\x00" * 4
    assert fault(reseal(with_op)) is FrameFault.BAD_OP_SEQUENCE
    # A probe frame beyond MAX_PROBE_SIZE (but within the segment frame limits).
    big = bytearray(data[: HEADER_SIZE + 1])
    payload = struct.pack("<I", 100) + bytes(frames.MAX_PROBE_SIZE)
    big += struct.pack("<I", len(payload)) + payload + b"\x00" * 4
    assert fault(reseal(big)) is FrameFault.TOO_LARGE
    # A reply may name any received size, but must have the field.
    reply = frames.encode_probe_reply(frames.decode_frame(data), 0)
    assert frames.decode_frame(reply).probe_size == 0


@settings(max_examples=300)
@given(st.data())
def test_probe_corruption_is_always_detected(data: st.DataObject) -> None:
    frame = frames.encode_probe(size=120, reply_size=4096)
    i = data.draw(st.integers(0, len(frame) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != frame[i]))
    with pytest.raises(FrameError):
        frames.decode_frame(frame[:i] + bytes([new]) + frame[i + 1 :])


# --- sampled-token replies (reply codec token) ------------------------------------------------------


def test_a_token_request_carries_its_sampling_and_its_answer_the_token() -> None:
    frame = frames.decode_frame(TOKEN_REQUEST, n_layer=30, n_head=9, model_hash=MODEL_HASH)
    assert (frame.reply_codec, frame.sampling, frame.sample_index) == (frames.TOKEN, TOKEN_SAMPLING, 11)
    assert len(TOKEN_REQUEST) == len(request(TOKEN_OPS, rows=1, cols=576)[0]) + SAMPLING_BLOCK.size
    answer = frames.decode_frame(TOKEN_RESPONSE)
    assert (answer.kind, answer.codec, answer.shape) == (FrameKind.RESPONSE, frames.TOKEN, (1, 4))
    assert answer.sampled() == SampledToken(42, -0.25, ((42, -0.25), (7, -2.5), (9, -3.0)))
    assert len(TOKEN_RESPONSE) == 56 + 2 * OP_SIZE + 1 + 8 + 4 + 4 * 8 + 4  # vs 4 · vocab bytes of logits
    with pytest.raises(FrameError, match="without a tensor"):
        answer.tensor()
    with pytest.raises(FrameError, match="not token"):
        frames.decode_frame(request()[0]).sampled()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reply_codec": frames.TOKEN}, "sampling exactly when"),
        ({"sampling": Sampling()}, "sampling exactly when"),
        ({"ops": [Op(OpKind.LAYER, 3)], "reply_codec": frames.TOKEN, "sampling": Sampling()}, "ending in LM_HEAD"),
    ],
)
def test_token_requests_are_checked_when_encoded(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        request(**{"ops": TOKEN_OPS, "rows": 1, "cols": 576, **kwargs})


def _with_sampling_block(**fields: Any) -> bytes:
    """TOKEN_REQUEST with some sampling-block fields replaced, CRC recomputed."""
    off = desc_off(len(TOKEN_OPS))
    values = dict(
        zip(
            ("temperature", "top_p", "top_k", "index", "logprobs", "reserved8", "reserved16", "seed"),
            SAMPLING_BLOCK.unpack_from(TOKEN_REQUEST, off),
            strict=True,
        )
    )
    values.update(fields)
    block = SAMPLING_BLOCK.pack(*values.values())
    return reseal(TOKEN_REQUEST[:off] + block + TOKEN_REQUEST[off + SAMPLING_BLOCK.size :])


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": float("nan")},
        {"temperature": -1.0},
        {"temperature": 11.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("inf")},
        {"logprobs": MAX_LOGPROBS + 1},
        {"reserved8": 1},
        {"reserved16": 1},
    ],
)
def test_a_bad_sampling_block_is_refused(fields: dict[str, Any]) -> None:
    assert fault(_with_sampling_block(**fields)) is FrameFault.BAD_SAMPLING


def test_token_codec_is_refused_where_it_does_not_belong() -> None:
    # A sampled token answering a request that asked for a tensor, and the other way round.
    tensor_request = frames.decode_frame(request(TOKEN_OPS, rows=1, cols=576, reply_codec="f32")[0])
    with pytest.raises(InvalidArgumentError, match="not a sampled token"):
        frames.encode_response(tensor_request, SampledToken(1, -1.0))
    with pytest.raises(InvalidArgumentError, match="not a tensor"):
        frames.encode_response(frames.decode_frame(TOKEN_REQUEST), np.zeros((1, 49152), np.float32))
    # A response frame in codec token whose header says the request wanted f32.
    forged = bytearray(TOKEN_RESPONSE)
    forged[53] = frames.CODEC_IDS["f32"]
    assert fault(reseal(forged)) is FrameFault.BAD_DIMS
    # A token payload with a positive or NaN log-probability.
    decoded = frames.decode_frame(TOKEN_RESPONSE)
    for bad in (0.5, float("nan")):
        body = bytearray(TOKEN_RESPONSE)
        payload_at = len(TOKEN_RESPONSE) - 4 - len(decoded.payload)
        struct.pack_into("<If", body, payload_at, 42, bad)
        with pytest.raises(FrameError, match="NaN or above 0"):
            frames.decode_frame(reseal(body)).sampled()


def test_sampling_draws_depend_only_on_seed_and_index() -> None:
    logits = np.random.default_rng(5).normal(size=49152).astype(np.float32) * 3
    hot = Sampling(temperature=1.0, seed=9)
    draws = [sample(logits, hot, i).token for i in range(40)]
    assert draws == [sample(logits, hot, i).token for i in range(40)]  # reproducible, in any order
    assert draws[::-1] == [sample(logits, hot, i).token for i in reversed(range(40))]
    assert len(set(draws)) > 10  # and actually random
    assert sample(logits, Sampling(), 3).token == int(np.argmax(logits))
    top = sample(logits, Sampling(temperature=2.0, top_k=3, seed=1, logprobs=5), 0)
    assert top.token in {t for t, _ in top.top[:3]}
    assert [t for t, _ in top.top] == list(np.argsort(-logits)[:5])
    log_z = np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) + logits.max()
    assert top.logprob == pytest.approx(float(logits[top.token]) - log_z, abs=1e-5)
    # top_p 0.01 keeps only the most likely token.
    assert {sample(logits, Sampling(temperature=1.0, top_p=0.01, seed=s), 0).token for s in range(20)} == {
        int(np.argmax(logits))
    }


def test_app_requests_take_sampling_settings_and_get_logprobs_back() -> None:
    req = app_messages.InferRequest.parse(
        b'{"prompt": "hi", "temperature": 0.7, "top_k": 40, "top_p": 0.9, "logprobs": 3}'
    )
    assert (req.top_k, req.top_p, req.logprobs) == (40, 0.9, 3)
    for bad in ('"top_k": -1', '"top_k": 1001', '"top_k": 1.5', '"top_p": 0', '"top_p": 1.01', '"logprobs": 21'):
        with pytest.raises(ValidationError):
            app_messages.InferRequest.parse(('{"prompt": "hi", ' + bad + "}").encode())
    reply = app_messages.final_reply(
        text="x",
        prompt_tokens=1,
        completion_tokens=1,
        plan={},
        timings={},
        logprobs=[SampledToken(5, -0.5, ((5, -0.5),))],
    )
    assert reply["logprobs"] == [{"token": 5, "logprob": -0.5, "top": [{"token": 5, "logprob": -0.5}]}]
    assert "logprobs" not in app_messages.final_reply(
        text="x", prompt_tokens=1, completion_tokens=1, plan={}, timings={}
    )
