"""Event files: CRC-32C check value, TFRecord framing, and scalars read back exactly, by our reader and by
TensorBoard's own (tensorboard is a test requirement)."""
import os

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
    """TensorBoard's own reader (its TFRecord framing, CRC checks and scalar handling), not ours."""
    from tensorboard.backend.event_processing import event_accumulator, event_file_loader

    w = tensorboard.EventWriter(str(tmp_path))
    written = {1: {"loss": 2.5, "lr": 1e-4}, 7: {"loss": 0.5, "grad_norm": 3.25}, 300: {"loss": 0.125}}
    for step, values in written.items():
        w.scalars(step, values)
    w.close()
    events = list(event_file_loader.LegacyEventFileLoader(w.path).Load())
    assert events[0].file_version == "brain.Event:2" and len(events) == 1 + len(written)
    acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = {tag for values in written.values() for tag in values}
    assert sorted(acc.Tags()["scalars"]) == sorted(tags)
    for tag in tags:
        want = [(step, np.float32(values[tag])) for step, values in written.items() if tag in values]
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(tag)] == want, tag
