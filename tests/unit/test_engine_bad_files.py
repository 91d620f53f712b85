"""Bad model files give a ModelFileError that names the file and the problem; never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from splitwise_core import errors
from splitwise_core.engine import Model
from splitwise_core.tokenizer import bundled_model_path


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return bundled_model_path().read_bytes()


def string_field(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack("<Q", len(encoded)) + encoded


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1, "patch target must be unique"
    return data.replace(old, new)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_file(tmp_path: Path, model_bytes: bytes) -> None:
    path = write(tmp_path, "truncated.gguf", model_bytes[: len(model_bytes) // 2])
    with pytest.raises(errors.ModelFileError, match=r"truncated\.gguf") as info:
        Model(str(path))
    assert "beyond" in str(info.value) or "truncated" in str(info.value).split(":", 1)[1]


def test_header_cut_short(tmp_path: Path, model_bytes: bytes) -> None:
    with pytest.raises(errors.ModelFileError, match=r"short\.gguf"):
        Model(str(write(tmp_path, "short.gguf", model_bytes[:1000])))


def test_wrong_magic(tmp_path: Path, model_bytes: bytes) -> None:
    with pytest.raises(errors.ModelFileError, match=r"magic\.gguf.*magic"):
        Model(str(write(tmp_path, "magic.gguf", b"GGML" + model_bytes[4:])))


def test_unsupported_architecture(tmp_path: Path, model_bytes: bytes) -> None:
    key = string_field("general.architecture") + struct.pack("<I", 8)
    data = patched(model_bytes, key + string_field("llama"), key + string_field("mamba"))
    expected = r"arch\.gguf.*\"mamba\" is not supported; supported: llama, qwen2, qwen3, gpt2"
    with pytest.raises(errors.ModelFileError, match=expected):
        Model(str(write(tmp_path, "arch.gguf", data)))


def test_unsupported_tensor_type(tmp_path: Path, model_bytes: bytes) -> None:
    # output_norm.weight: 1 dim of 576, type F32 (0) -> IQ4_NL (20), which the engine does not run.
    info = string_field("output_norm.weight") + struct.pack("<IQ", 1, 576)
    data = patched(model_bytes, info + struct.pack("<I", 0), info + struct.pack("<I", 20))
    with pytest.raises(errors.ModelFileError, match=r"type\.gguf.*(type|20)"):
        Model(str(write(tmp_path, "type.gguf", data)))


def test_missing_tensor(tmp_path: Path, model_bytes: bytes) -> None:
    name = string_field("blk.7.ffn_up.weight")
    data = patched(model_bytes, name, string_field("blk.7.ffn_xx.weight"))
    with pytest.raises(errors.ModelFileError, match=r"missing\.gguf.*blk\.7\.ffn_up"):
        Model(str(write(tmp_path, "missing.gguf", data)))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(errors.ModelFileError, match=r"absent\.gguf"):
        Model(str(tmp_path / "absent.gguf"))
    with pytest.raises(errors.ModelFileError):
        Model(str(tmp_path))


def test_gpt2_embedding_needs_positions_inside_its_context() -> None:
    """GPT-2 adds a learned embedding per position: without positions, or past the table, it refuses."""
    from evaluation import model_factory as mf

    model = Model(str(mf.cached_random_llama("gpt2_h6", "F32")))
    assert model.config["architecture"] == "gpt2"
    with pytest.raises(errors.InvalidArgumentError, match="embed needs the tokens' positions"):
        model.embed([1, 2])
    with pytest.raises(errors.InvalidArgumentError, match="length 1, expected 2"):
        model.embed([1, 2], [0])
    n_ctx = model.config["context_length"]
    with pytest.raises(errors.InvalidArgumentError, match=f"position {n_ctx} is past the model's context length"):
        model.embed([1], [n_ctx])
    first, second = model.embed([5, 5], [0, 1])
    assert not (first == second).all()  # the same token at two positions differs
