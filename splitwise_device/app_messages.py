"""The device's app API: what an app sends to ``splitwise/v1/device/{id}/infer`` and the replies
it gets (JSON; ``docs/protocol.md``). Validated with the device's limits; a planner is named from
the planners' registry."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from cloud_offload.protocol.frames import ErrorCode
from cloud_offload.protocol.topics import topic_name_problem
from policies.planners.registry import PLANNER_NAMES
from splitwise_core.sampling import MAX_LOGPROBS, SampledToken

__all__ = [
    "MAX_PROMPT_BYTES",
    "MAX_TEMPERATURE",
    "MAX_TOKENS",
    "MAX_TOP_K",
    "ChatMessage",
    "InferRequest",
    "chunk_reply",
    "error_reply",
    "final_reply",
]


MAX_PROMPT_BYTES = 32 * 1024
MAX_TOKENS = 2048
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1000
_NAMED_PLAN = re.compile(r"edge-only|cloud-only|layer-split:[0-9]{1,6}|heads:[0-9]{1,6}")


def _known_planner(name: str) -> str:
    if name not in PLANNER_NAMES:
        raise ValueError(f"unknown planner {name!r}; known: {', '.join(PLANNER_NAMES)}")
    return name


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class InferRequest(BaseModel):
    """App → device: `splitwise/v1/device/{device_id}/infer` (see docs/protocol.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)] | None = None
    # None: the device's configured default. The upper bound is checked in _check (configurable).
    max_tokens: Annotated[int, Field(ge=1, strict=True)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)] = 0.0
    seed: Annotated[int, Field(ge=0, lt=1 << 63, strict=True)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K, strict=True)] = 0  # 0: no limit
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    # Log-probabilities of the chosen token and of this many most likely ones, per token.
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] = 0
    stream: bool = False
    # A named plan, or an inline plan object (policies.plan JSON form). Never a file path: apps
    # must not make the device read its files.
    plan: str | dict[str, Any] | None = None
    # Or a planner the device runs for this request instead of its configured one.
    planner: Annotated[str, AfterValidator(_known_planner)] | None = None
    reply_to: str | None = None  # for MQTT 3.1.1 clients, which have no ResponseTopic
    request_id: Annotated[str, Field(max_length=128)] | None = None  # echoed in every reply

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> InferRequest:
        limits = info.context if isinstance(info.context, Mapping) else {}
        max_prompt = int(limits.get("max_prompt_bytes", MAX_PROMPT_BYTES))
        max_tokens = int(limits.get("max_tokens_limit", MAX_TOKENS))
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.plan is not None and self.planner is not None:
            raise ValueError("give at most one of plan or planner")
        if self.max_tokens is not None and self.max_tokens > max_tokens:
            raise ValueError(f"max_tokens {self.max_tokens} exceeds the limit {max_tokens}")
        text = self.prompt if self.prompt is not None else "".join(m.content for m in self.messages or ())
        if len(text.encode("utf-8")) > max_prompt:
            raise ValueError(f"prompt longer than {max_prompt} bytes")
        return self

    @field_validator("plan")
    @classmethod
    def _check_plan(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and _NAMED_PLAN.fullmatch(v) is None:
            raise ValueError("plan must be edge-only, cloud-only, layer-split:K, heads:N or a plan object")
        return v

    @field_validator("reply_to")
    @classmethod
    def _check_reply_to(cls, v: str | None) -> str | None:
        problem = None if v is None else topic_name_problem(v)
        if problem is not None:
            raise ValueError(f"reply_to is not a valid topic name: {problem}")
        return v

    @classmethod
    def parse(
        cls, payload: bytes | str, *, max_prompt_bytes: int = MAX_PROMPT_BYTES, max_tokens_limit: int = MAX_TOKENS
    ) -> InferRequest:
        """From an MQTT payload, under the device's limits; pydantic.ValidationError (a ValueError)
        on anything invalid. The prompt limit counts UTF-8 bytes of the prompt or all messages."""
        context = {"max_prompt_bytes": max_prompt_bytes, "max_tokens_limit": max_tokens_limit}
        return cls.model_validate_json(payload, context=context)


def _with_id(msg: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    if request_id is not None:
        msg["request_id"] = request_id
    return msg


def chunk_reply(index: int, text: str, *, request_id: str | None = None) -> dict[str, Any]:
    return _with_id({"type": "chunk", "index": index, "text": text}, request_id)


def final_reply(
    *,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    plan: Mapping[str, Any],
    timings: Mapping[str, float],
    recovery: Sequence[Mapping[str, Any]] = (),
    stop_reason: str | None = None,
    request_id: str | None = None,
    logprobs: Sequence[SampledToken] = (),
) -> dict[str, Any]:
    """`logprobs`: per generated token when the request asked for them (omitted otherwise)."""
    msg: dict[str, Any] = {
        "type": "final",
        "text": text,
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "plan": dict(plan),
        "timings": dict(timings),
        "recovery": [dict(r) for r in recovery],
    }
    if stop_reason is not None:
        msg["stop_reason"] = stop_reason
    if logprobs:
        msg["logprobs"] = [
            {"token": t.token, "logprob": t.logprob, "top": [{"token": i, "logprob": lp} for i, lp in t.top]}
            for t in logprobs
        ]
    return _with_id(msg, request_id)


def error_reply(code: ErrorCode | str, message: str, *, request_id: str | None = None) -> dict[str, Any]:
    return _with_id({"type": "error", "error": {"code": str(code), "message": message}}, request_id)
