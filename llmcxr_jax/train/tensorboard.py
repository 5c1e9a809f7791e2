"""TensorBoard scalar event files written directly (TFRecord framing + the few protobuf fields of
Event / Summary.Value), so logging needs neither TensorFlow nor torch. A reader is included for
tests and for `launch/sweep.py report`-style tools. Local or gs:// log directories (llmcxr_jax.storage).
"""
from __future__ import annotations

import os
import socket
import struct
import time

from llmcxr_jax import storage
from llmcxr_jax.errors import UsageError

_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5{value=1{tag=1, simple_value=2}}}."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def frame(record: bytes) -> bytes:
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", _masked(length)) + record + struct.pack("<I", _masked(record))


class EventWriter:
    """One events.out.tfevents.* file per writer; `scalars(step, {tag: value})` appends (and is on disk, or in
    the bucket, when it returns)."""

    def __init__(self, logdir: str):
        storage.path(logdir).mkdir(parents=True, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = storage.AppendOnlyFile(self.path, binary=True)
        self._file.append(frame(encode_event(0, time.time(), file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.append(frame(encode_event(step, time.time(), values)))

    def close(self) -> None:
        """Nothing is held open between appends; kept so writers can be closed like files."""


# ---------------------------------------------------------------- reading

def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise UsageError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file; a checksum mismatch is an error."""
    out = []
    data = storage.path(path).read_bytes()
    i = 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(data[i:i + 8]):
            raise UsageError(f"{path}: corrupt record length at byte {i}")
        record = data[i + 12:i + 12 + length]
        if struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] != _masked(record):
            raise UsageError(f"{path}: corrupt record at byte {i}")
        i += 16 + length
        step = 0
        for number, value in _fields(record):
            if number == 2:
                step = value
            elif number == 5:
                for vnum, v in _fields(value):
                    if vnum != 1:
                        continue
                    tag, simple = "", None
                    for fnum, fv in _fields(v):
                        if fnum == 1:
                            tag = fv.decode()
                        elif fnum == 2:
                            simple = struct.unpack("<f", fv)[0]
                    if simple is not None:
                        out.append((step, tag, simple))
    return out
