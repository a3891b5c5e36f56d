"""A ClientApp for tests: koala-fl's own, except that the node of partition 1 answers every train
message with a reply that cannot be decoded, a different kind each round (see KINDS), and the node of
partition 3 describes its partition with an id that is not a number."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from koala.engine.flower import client_app as koala_client

MISBEHAVING_PARTITION = 1
UNREADABLE_PARTITION = 3
app = ClientApp()


def _string_array(content: RecordDict) -> RecordDict:
    """The weights replaced by an array of strings."""
    arrays = ArrayRecord({name: Array(np.array(["not", "a", "tensor"])) for name in content.array_records["arrays"]})
    return RecordDict({**content, "arrays": arrays})


def _bytes_that_are_not_npy(content: RecordDict) -> RecordDict:
    """Every array's bytes replaced by bytes that are no .npy file."""
    arrays = ArrayRecord({name: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=b"\x00garbage\xff")
                          for name, a in content.array_records["arrays"].items()})
    return RecordDict({**content, "arrays": arrays})


def _missing_record(content: RecordDict) -> RecordDict:
    """No weights at all."""
    return RecordDict({key: value for key, value in content.items() if key != "arrays"})


KINDS = {1: _string_array, 2: _bytes_that_are_not_npy, 3: _missing_record}
"""Round number -> how partition 1 spoils its reply that round."""


@app.query()
def describe(message: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) == UNREADABLE_PARTITION:
        return Message(RecordDict({"partition": ConfigRecord({"partition-id": "three", "num-partitions": 4})}),
                       reply_to=message)
    return koala_client.describe(message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    reply = koala_client.train(message, context)
    if int(context.node_config["partition-id"]) != MISBEHAVING_PARTITION:
        return reply
    spoil = KINDS[int(message.content.config_records["task"]["round"])]
    return Message(spoil(reply.content), reply_to=message)
