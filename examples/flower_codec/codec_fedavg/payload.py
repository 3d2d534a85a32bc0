"""fibec codec payloads inside Flower messages, invisible to the strategy and to the training code.

Each ArrayRecord of float32/float16 arrays in a message travels as an ArrayRecord holding one
uint8 Array: `fibec.codec.encode` of its tensors (pickle-free, checksummed, "fp32" lossless or
smaller lossy value formats). The receiver decodes it back into an ArrayRecord with the same
names, shapes and dtypes. A ClientApp gets this from `payload_mod`; a ServerApp wraps its Grid in
`PayloadGrid`, so a stock strategy configures and aggregates plain decoded tensors.

    app = ClientApp(mods=[payload_mod])                      # client side
    strategy.start(grid=PayloadGrid(grid, values="fp32"), ...)  # server side
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid

from fibec import codec
from fibec.federated.flower import GridWrapper

PAYLOAD_KEY = "fibec-payload"
# What fibec.codec encodes and an ArrayRecord can hold (numpy has no bfloat16).
_PACKED_DTYPES = ("float32", "float16")


def pack(content: RecordDict, values: str = "fp32") -> RecordDict:
    """A copy of `content` whose float ArrayRecords are each one uint8 payload Array.

    values: fibec.codec's value format ("fp32", "fp16", "bf16", "int8"). ArrayRecords holding
    other dtypes (e.g. integer buffers) and every other record are kept as they are.
    """
    packed = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and record and all(a.dtype in _PACKED_DTYPES for a in record.values()):
            payload = codec.encode(record.to_torch_state_dict(), values=values)
            record = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(payload, dtype=np.uint8))})
        packed[key] = record
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """A copy of `content` with each payload ArrayRecord decoded back into its tensors."""
    unpacked = RecordDict()
    for key, record in content.items():
        if isinstance(record, ArrayRecord) and list(record) == [PAYLOAD_KEY]:
            record = ArrayRecord(torch_state_dict=codec.decode(record[PAYLOAD_KEY].numpy()))
        unpacked[key] = record
    return unpacked


def payload_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: unpack the incoming message, pack the reply with the run config's "values"."""
    message.content = unpack(message.content)
    reply = call_next(message, context)
    if reply.has_content():
        reply.content = pack(reply.content, values=str(context.run_config.get("values", "fp32")))
    return reply


class PayloadGrid(GridWrapper):
    """`grid` with every message it sends packed and every reply it returns unpacked."""

    def __init__(self, grid: Grid, values: str = "fp32") -> None:
        super().__init__(grid)
        self._values = values

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages([self._packed(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._unpacked(m) for m in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self._grid.send_and_receive([self._packed(m) for m in messages], timeout=timeout)
        return [self._unpacked(m) for m in replies]

    def _packed(self, message: Message) -> Message:
        message.content = pack(message.content, self._values)
        return message

    @staticmethod
    def _unpacked(message: Message) -> Message:
        if message.has_content():
            message.content = unpack(message.content)
        return message
