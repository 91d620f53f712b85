"""Activation codecs: byte-identical to gguf's quantizer, exact padding rules, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitwise_core import codecs, errors

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
BLOCK_CODECS = list(GGUF_TYPES)
F16_MAX = np.float32(65504.0)


def gguf_bytes(x: np.ndarray, codec: str) -> bytes:
    """What gguf produces, zero-padding to whole blocks first (our documented rule)."""
    padded = np.zeros(-(-x.size // 32) * 32, np.float32)
    padded[: x.size] = x.ravel()
    with np.errstate(all="ignore"):  # gguf warns on 1/denormal overflow; the bytes are still defined
        return quantize(padded, GGUF_TYPES[codec]).tobytes()


def adversarial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    tiny = np.finfo(np.float32).smallest_subnormal
    cases = {
        "zeros": np.zeros(96, np.float32),
        "negative zeros": np.full(64, -0.0, np.float32),
        "constant blocks": np.repeat(np.float32([1.0, -3.5, 0.25, 1e4]), 32),
        "huge but representable": rng.uniform(-5e5, 5e5, 256).astype(np.float32),
        "denormals only": (rng.integers(-50, 50, 128) * tiny).astype(np.float32),
        "denormals with one normal": np.concatenate([(rng.integers(1, 9, 31) * tiny), [1e-30]]).astype(np.float32),
        "min normal": np.full(32, np.finfo(np.float32).tiny, np.float32),
        "single spike": np.eye(1, 64, 17, dtype=np.float32).ravel() * 7.0,
        "ties between signs": np.tile(np.float32([-2.0, 2.0, 1.0, -1.0]), 8),
        "exact half steps": (np.arange(-64, 64, dtype=np.float32) + 0.5) / 4,
        "wide dynamic range": (rng.standard_normal(512) * 10.0 ** rng.integers(-30, 5, 512)).astype(np.float32),
        "activations": rng.standard_normal(576 * 4).astype(np.float32) * 3,
    }
    return cases


@pytest.mark.parametrize("codec", BLOCK_CODECS)
@pytest.mark.parametrize("case", list(adversarial_arrays()))
def test_bytes_match_gguf_quantizer(codec: str, case: str) -> None:
    x = adversarial_arrays()[case]
    if codec == "q4_0" and case == "huge but representable":
        x = x / 2  # q4_0's scale is max/8, so its range is 65520·8
    assert codecs.encode(x, codec) == gguf_bytes(x, codec)


@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_decode_matches_gguf_dequantizer(codec: str) -> None:
    x = np.random.default_rng(7).standard_normal(32 * 50).astype(np.float32)
    buf = codecs.encode(x, codec)
    expected = dequantize(np.frombuffer(buf, np.uint8), GGUF_TYPES[codec])
    np.testing.assert_array_equal(codecs.decode(buf, codec, x.size), expected)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(BLOCK_CODECS),
    x=hnp.arrays(
        np.float32,
        st.integers(1, 8).map(lambda blocks: blocks * 32),
        elements=st.floats(-60000, 60000, width=32, allow_subnormal=True),
    ),
)
def test_bytes_match_gguf_on_generated_data(codec: str, x: np.ndarray) -> None:
    assert codecs.encode(x, codec) == gguf_bytes(x, codec)


@pytest.mark.parametrize("codec", BLOCK_CODECS)
@pytest.mark.parametrize("n", [1, 31, 33, 63, 100, 577])
def test_lengths_not_multiple_of_32_are_zero_padded(codec: str, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    buf = codecs.encode(x, codec)
    assert len(buf) == codecs.codec_size(codec, n) == -(-n // 32) * (34 if codec == "q8_0" else 18)
    assert buf == gguf_bytes(x, codec)
    y = codecs.decode(buf, codec, n)
    assert y.shape == (n,)
    full = codecs.decode(buf, codec, -(-n // 32) * 32)
    np.testing.assert_array_equal(y, full[:n])
    np.testing.assert_array_equal(full[n:], 0.0)  # the padding decodes to zeros


def test_f16_and_f32_are_plain_little_endian() -> None:
    x = np.random.default_rng(3).standard_normal((3, 70)).astype(np.float32) * 100
    assert codecs.encode(x, "f32") == x.astype("<f4").tobytes()
    assert codecs.encode(x, "f16") == x.astype("<f2").tobytes()
    np.testing.assert_array_equal(codecs.decode(codecs.encode(x, "f32"), "f32", x.shape), x)
    np.testing.assert_array_equal(
        codecs.decode(codecs.encode(x, "f16"), "f16", x.shape), x.astype(np.float16).astype(np.float32)
    )


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_shapes_round_trip_and_accept_any_buffer(codec: str) -> None:
    x = np.random.default_rng(5).standard_normal((4, 3, 48)).astype(np.float32)
    buf = codecs.encode(x, codec)
    for view in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        y = codecs.decode(view, codec, [4, 3, 48])
        assert y.shape == (4, 3, 48) and y.dtype == np.float32
    err = np.abs(codecs.decode(buf, codec, x.shape) - x).max()
    assert err <= {"f32": 0.0, "f16": 0.01, "q8_0": 0.05, "q4_0": 0.9}[codec]


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (np.zeros(32, np.float64), errors.DTypeError),
        (np.zeros(32, np.int32), errors.DTypeError),
        ([0.0] * 32, errors.DTypeError),
        (b"\x00" * 128, errors.DTypeError),
        (np.zeros((32, 2), np.float32)[:, 0], errors.LayoutError),
        (np.zeros((8, 8), np.float32).T, errors.LayoutError),
    ],
)
def test_encode_rejects_wrong_types_and_layouts(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        codecs.encode(bad, "q8_0")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError | ValueError)


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite_with_index(codec: str, bad: float) -> None:
    x = np.ones(70, np.float32)
    x[41] = bad
    with pytest.raises(errors.NonFiniteInputError, match="index 41"):
        codecs.encode(x, codec)


@pytest.mark.parametrize(("codec", "value"), [("q8_0", 8.4e6), ("q4_0", 5.3e5), ("f16", 7e4), ("q8_0", 3e38)])
def test_encode_rejects_values_whose_scale_overflows_float16(codec: str, value: float) -> None:
    x = np.ones(64, np.float32)
    x[40] = value
    with pytest.raises(errors.CodecRangeError, match="index 40"):
        codecs.encode(x, codec)
    if codec != "f16":  # gguf would emit an infinite scale here, which decodes to inf/NaN
        scale = np.frombuffer(gguf_bytes(x, codec)[34 if codec == "q8_0" else 18 :][:2], np.float16)
        assert np.isinf(scale).all()


def test_unknown_codec() -> None:
    with pytest.raises(errors.UnknownCodecError, match="q5_k"):
        codecs.encode(np.zeros(32, np.float32), "q5_k")
    with pytest.raises(errors.UnknownCodecError):
        codecs.decode(b"", "bf16", 0)
    with pytest.raises(errors.UnknownCodecError):
        codecs.codec_size("Q8_0", 32)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_decode_rejects_buffer_shape_mismatch(codec: str) -> None:
    buf = codecs.encode(np.ones(64, np.float32), codec)
    with pytest.raises(errors.BufferSizeError, match=f"{len(buf) - 1}"):
        codecs.decode(buf[:-1], codec, 64)
    with pytest.raises(errors.BufferSizeError):
        codecs.decode(buf + b"\x00", codec, 64)
    with pytest.raises(errors.BufferSizeError):
        codecs.decode(buf, codec, (3, 64))
    with pytest.raises(errors.ShapeMismatchError):
        codecs.decode(buf, codec, (-1, 64))
    with pytest.raises(errors.ShapeMismatchError):
        codecs.decode(buf, codec, "64")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgumentError):
        codecs.codec_size(codec, -1)


def test_decode_rejects_non_buffers_and_non_finite_payloads() -> None:
    with pytest.raises(errors.DTypeError):
        codecs.decode([0] * 34, "q8_0", 32)  # type: ignore[arg-type]
    bad_scale = bytearray(codecs.encode(np.ones(64, np.float32), "q8_0"))
    bad_scale[34:36] = np.float16(np.inf).tobytes()
    with pytest.raises(errors.CorruptDataError, match="block 1"):
        codecs.decode(bytes(bad_scale), "q8_0", 64)
    with pytest.raises(errors.CorruptDataError):
        codecs.decode(np.float32([1, np.nan]).tobytes(), "f32", 2)
    with pytest.raises(errors.CorruptDataError):
        codecs.decode(np.float16([np.inf]).tobytes(), "f16", 1)


@settings(max_examples=500, deadline=None)
@given(
    codec=st.sampled_from(codecs.CODECS),
    data=st.binary(max_size=400),
    shape=st.lists(st.integers(-2, 80), max_size=3) | st.integers(-5, 400),
)
def test_decode_fuzz_never_crashes_or_returns_garbage(codec: str, data: bytes, shape: list[int] | int) -> None:
    try:
        y = codecs.decode(data, codec, shape)
    except errors.SplitwiseError as err:
        assert isinstance(err, ValueError | TypeError)
        return
    assert y.dtype == np.float32
    assert np.isfinite(y).all()
    assert y.size == int(np.prod(shape))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=34, max_size=34 * 4))
def test_decode_fuzz_valid_sizes_match_gguf(data: bytes) -> None:
    n_blocks = len(data) // 34
    data = data[: n_blocks * 34]
    scales = np.frombuffer(data, np.uint8).reshape(n_blocks, 34)[:, :2].copy().view(np.float16)
    if not np.isfinite(scales).all():
        with pytest.raises(errors.CorruptDataError):
            codecs.decode(data, "q8_0", n_blocks * 32)
        return
    expected = dequantize(np.frombuffer(data, np.uint8), GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(codecs.decode(data, "q8_0", n_blocks * 32), expected)


# --- checksum ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "crc"),
    [
        (b"123456789", 0xE3069283),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ],
)
def test_crc32c_known_vectors(data: bytes, crc: int) -> None:
    assert codecs.crc32c(data) == crc
    assert codecs.crc32c(bytearray(data)) == crc
    assert codecs.crc32c(memoryview(data)) == crc


def test_crc32c_detects_a_flipped_bit_and_rejects_non_buffers() -> None:
    frame = bytearray(codecs.encode(np.arange(64, dtype=np.float32), "q8_0"))
    before = codecs.crc32c(frame)
    frame[17] ^= 0x04
    assert codecs.crc32c(frame) != before
    with pytest.raises(errors.DTypeError):
        codecs.crc32c("text")  # type: ignore[arg-type]
