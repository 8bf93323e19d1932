"""The one-call encoder of plain commands gives the bytes the general encoder gives."""

from __future__ import annotations

import gc

import torch

from fedws.protocol import codec
from fedws.protocol.codec import ObjRef

# A command on pointers as the coordinator sends it: [kind, seq, op, args, kwargs, result ids,
# grad mode]. The bytes were produced by the general encoder before encode_plain existed.
GOLDEN_CMD = [4, 7, "Tensor.add", [ObjRef(123456789), 1.5, None, True, "x"], {"alpha": 2}, [42], False]
GOLDEN_HEX = (
    "31000000000000000000000000000000970407aa54656e736f722e61646495d70315cd5b0700000000cb3ff8"
    "000000000000c0c3a17881a5616c70686102912ac2"
)


def test_plain_command_matches_golden_bytes() -> None:
    assert codec.encode_plain(GOLDEN_CMD) == bytes.fromhex(GOLDEN_HEX)
    assert b"".join(codec.encode(GOLDEN_CMD)) == bytes.fromhex(GOLDEN_HEX)
    assert codec.decode(bytes.fromhex(GOLDEN_HEX)) == GOLDEN_CMD


def test_plain_matches_general_encoder_on_many_shapes() -> None:
    values = [
        [1, 2, [ObjRef(-5), ObjRef(2**62)], {"k": [ObjRef(1)]}, []],
        [6, 3, [9, 10], "fedws.x", None],
        {"a": b"raw bytes", "b": [1.0, -2, 2**63 - 1]},
        [],
    ]
    for value in values:
        assert codec.encode_plain(value) == b"".join(codec.encode(value))
        assert codec.encode_bytes(value) == b"".join(codec.encode(value))


def test_non_plain_values_take_the_general_path() -> None:
    for value in ([1, (2, 3)], [torch.float32], [slice(1, 2)], [True, 1 + 2j]):
        assert codec.encode_plain(value) is None
        assert codec.decode(codec.encode_bytes(value)) == value
    t = torch.arange(3.0)
    assert codec.encode_plain([t]) is None
    assert torch.equal(codec.decode(codec.encode_bytes([t]))[0], t)
    # the packer was reset: the next plain value encodes alone, without leftovers
    assert codec.encode_plain([ObjRef(3)]) == b"".join(codec.encode([ObjRef(3)]))


def test_a_refused_value_is_not_kept_alive() -> None:
    class Big:
        pass

    import weakref

    obj = Big()
    ref = weakref.ref(obj)
    assert codec.encode_plain([obj]) is None
    del obj
    gc.collect()
    assert ref() is None
