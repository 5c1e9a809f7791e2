"""Event files: CRC-32C check value, TFRecord framing, and scalars read back exactly; tensorboard's
own parser reads them when it is installed."""
import os
import struct

import numpy as np
import pytest

from llmcxr_jax.train import tensorboard


def test_crc32c_check_value():
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert tensorboard.crc32c(b"") == 0


def test_scalars_round_trip(tmp_path):
    w = tensorboard.EventWriter(str(tmp_path))
    w.scalars(1, {"loss": 2.5, "lr": 1e-4})
    w.scalars(300, {"loss": 0.125})
    w.close()
    got = tensorboard.read_scalars(w.path)
    assert [(s, t) for s, t, _ in got] == [(1, "loss"), (1, "lr"), (300, "loss")]
    np.testing.assert_allclose([v for *_, v in got], [2.5, np.float32(1e-4), 0.125])
    assert os.path.basename(w.path).startswith("events.out.tfevents.")


def test_corruption_is_detected(tmp_path):
    w = tensorboard.EventWriter(str(tmp_path))
    w.scalars(1, {"loss": 1.0})
    w.close()
    data = bytearray(open(w.path, "rb").read())
    data[-6] ^= 0xFF
    open(w.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        tensorboard.read_scalars(w.path)


def test_tensorboard_reads_our_files(tmp_path):
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    w = tensorboard.EventWriter(str(tmp_path))
    w.scalars(7, {"loss": 0.5})
    w.close()
    data = open(w.path, "rb").read()
    events, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 16 + n
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7 and events[1].summary.value[0].tag == "loss"
    assert events[1].summary.value[0].simple_value == 0.5
