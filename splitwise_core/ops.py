"""The op vocabulary shared by the planners (what a cloud segment asks for) and the offload
protocol (how it travels): one :class:`OpKind`, one :class:`Op`, one segment grammar and the frame
size constants the cost model counts bytes with.

A cloud segment is one request/response: one input tensor, an op list run in order on the worker,
one output tensor. Valid op lists (:func:`segment_problem`)::

    [ATTN_PART(l, heads)] | [FFN_DOWN(l)] | [FFN(l)] | [RESIDUAL_FFN(l)?, LAYER(l+1), ..., LM_HEAD?]

the last a non-empty run over consecutive layers. Only ``ATTN_PART`` carries heads.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "FRAME_HEADER",
    "FRAME_OP",
    "HEADER_SIZE",
    "OP_SIZE",
    "SAMPLING_BLOCK",
    "SINGLE_OPS",
    "TENSOR_OVERHEAD_BYTES",
    "Op",
    "OpKind",
    "frame_bytes",
    "segment_problem",
]


class OpKind(IntEnum):
    """What a worker computes for one op of a segment; the value is the op's id on the wire."""

    ATTN_PART = 1  # x_norm → the given heads' attention partial, through their slice of W_o
    FFN_DOWN = 2  # SwiGLU intermediate (T×n_ff) → its down projection
    FFN = 3  # h_norm → FFN output
    RESIDUAL_FFN = 4  # h → h + ffn(ffn_norm(h)): the rest of a layer whose attention ran elsewhere
    LAYER = 5  # x → the whole layer
    LM_HEAD = 6  # x → the last row's logits


SINGLE_OPS = (OpKind.ATTN_PART, OpKind.FFN_DOWN, OpKind.FFN)
"""Ops that make up a segment on their own."""


@dataclass(frozen=True, slots=True)
class Op:
    kind: OpKind
    layer: int = 0  # 0 for LM_HEAD (the frame's layer field is unused there)
    heads: tuple[int, ...] = ()  # ATTN_PART only

    @property
    def mask(self) -> int:
        m = 0
        for h in self.heads:
            m |= 1 << h
        return m


def segment_problem(ops: Sequence[Op]) -> str | None:
    """What makes `ops` not one valid cloud segment (the grammar in the module docstring), or None."""
    if not ops:
        return "empty op list"
    for i, op in enumerate(ops):
        if (op.kind is OpKind.ATTN_PART) != bool(op.heads):
            return f"ops[{i}]: {op.kind.name} with heads {op.heads} (only ATTN_PART has heads, and needs them)"
    if any(op.kind in SINGLE_OPS for op in ops):
        return None if len(ops) == 1 else f"{[op.kind.name for op in ops]}: ATTN_PART, FFN_DOWN, FFN stand alone"
    expected: int | None = None
    for i, op in enumerate(ops):
        if op.kind is OpKind.RESIDUAL_FFN and i:
            return f"ops[{i}]: RESIDUAL_FFN only opens a residual run"
        if op.kind is OpKind.LM_HEAD:
            if i != len(ops) - 1:
                return f"ops[{i}]: LM_HEAD only ends a residual run"
            continue
        if expected is not None and op.layer != expected:
            return f"ops[{i}]: layer {op.layer} after layer {expected - 1}; a run covers consecutive layers"
        expected = op.layer + 1
    return None


# --- frame layout (cloud_offload.protocol encodes and decodes it; the cost model counts it) --------

FRAME_HEADER = struct.Struct("<4sBBH16sIIHH16sBBH")
"""magic, version, kind, flags, session, step, position, segment, n_ops, model hash, codec, reply
codec, attempt; little-endian, no padding."""
FRAME_OP = struct.Struct("<BHQ")
"""op kind, layer, head mask."""
HEADER_SIZE = FRAME_HEADER.size  # 56
OP_SIZE = FRAME_OP.size  # 11
SAMPLING_BLOCK = struct.Struct("<ffIIBBHQ")
"""In a request whose reply codec is `token`, right after the ops: temperature, top_p, top_k,
index of the generated token, logprobs, two reserved fields (0), seed."""
TENSOR_OVERHEAD_BYTES = 1 + 4 + 4
"""After the ops: ndim (u8), then ndim u32 dims, payload length (u32), payload, CRC-32C (u32)."""


def frame_bytes(n_ops: int, ndim: int, payload_bytes: int) -> int:
    """The size of a frame with `n_ops` ops and an `ndim`-dimensional tensor of `payload_bytes`."""
    return HEADER_SIZE + OP_SIZE * n_ops + TENSOR_OVERHEAD_BYTES + 4 * ndim + payload_bytes
