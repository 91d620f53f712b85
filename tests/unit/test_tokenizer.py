"""Tokenizer from the GGUF vocabulary, and chat-template handling for `messages` input."""

from __future__ import annotations

import pytest

from splitwise_core import errors
from splitwise_core.tokenizer import Tokenizer, bundled_model_path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(bundled_model_path())


def test_round_trip_of_real_text(tokenizer: Tokenizer) -> None:
    text = "The GNU General Public License is a free, copyleft license — ünïcödé too."
    tokens = tokenizer.encode(text)
    assert len(tokens) > 10 and all(0 <= t < tokenizer.n_vocab for t in tokens)
    assert tokenizer.decode(tokens) == text


def test_chat_template_from_the_model(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is MQTT?"}])
    assert "<|im_start|>user\nWhat is MQTT?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    special = tokenizer.encode(text)
    assert tokenizer.encode("<|im_start|>")[-1] in special  # control tokens become single ids


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "hello",
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "x", "name": "y"}],
        ["user: hi"],
    ],
)
def test_bad_messages_are_rejected(tokenizer: Tokenizer, bad: object) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        tokenizer.apply_chat_template(bad)  # type: ignore[arg-type]


def test_missing_or_bad_model_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.ModelFileError, match="no such model file"):
        Tokenizer(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTAGGUF" * 100)
    with pytest.raises(errors.ModelFileError, match=r"junk\.gguf"):
        Tokenizer(junk)
