"""Reading the files a user hands us (JSON, text lists, safetensors headers) so that a damaged or
wrong file is one UsageError naming the file and what is wrong with it (cut short, not JSON, not
UTF-8 at line N, a header that does not fit the file), never a parser's traceback."""
from __future__ import annotations

import contextlib
import csv
import gzip
import json
import math
import os
import struct
import zlib
from typing import Any

from llmcxr_jax.errors import MissingInputError, UsageError

CUT_HINT = "an interrupted copy or a full disk leaves this; copy the file again"


def _read_bytes(path, what: str) -> bytes:
    from llmcxr_jax import storage  # a sibling base module; gs:// paths go through etils

    p = storage.path(path)
    if p.is_dir():
        raise UsageError(f"{what} {os.fspath(path)} is a folder, not a file")
    if not p.is_file():
        raise MissingInputError(f"{what} {os.fspath(path)} does not exist")
    return p.read_bytes()


def decode_utf8(data: bytes, path, what: str) -> str:
    """Bytes of a text file -> str; bytes that are not UTF-8 are an error naming the line and column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UsageError(f"{what} {os.fspath(path)} is not UTF-8 text: byte {column} of line {line} is "
                         f"0x{data[e.start]:02x} ({e.reason}); give a text file saved as UTF-8") from None


def parse_json(text: str, path, what: str) -> Any:
    """JSON text of a file -> the value; malformed JSON names the file, line and column, and says
    "cut short" when the text ends before the JSON does."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = "; the file ends before the JSON does, " + CUT_HINT if e.pos >= len(text.rstrip()) else ""
        raise UsageError(f"{what} {os.fspath(path)} is not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}{cut}") from None


def read_json(path, what: str) -> Any:
    """A UTF-8 JSON file (local or gs://) -> the value, or a one-line UsageError naming the file."""
    return parse_json(decode_utf8(_read_bytes(path, what), path, what), path, what)


def read_json_object(path, what: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """read_json for a file that must hold a JSON object with the `required` keys."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UsageError(f"{what} {os.fspath(path)} holds a JSON {type(value).__name__}, not an object")
    missing = [k for k in required if k not in value]
    if missing:
        raise UsageError(f"{what} {os.fspath(path)} lacks {', '.join(missing)}")
    return value


def text_lines(path, what: str) -> list[str]:
    """A UTF-8 text file -> its lines without line endings (\n, \r\n or \r, as Python's text files split
    them); a binary file is an error naming the line."""
    text = decode_utf8(_read_bytes(path, what), path, what)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


# ---------------------------------------------------------------- CSV

def check_columns(path, header: list[str], required, expected: str) -> None:
    """A CSV header that lacks a `required` column is an error naming the missing and the found columns."""
    missing = [c for c in required if c not in header]
    if missing:
        found = ", ".join(repr(" ".join(h.split())[:40]) for h in header[:30]) or "no header line"
        raise UsageError(f"{os.fspath(path)} lacks columns {missing} (found: {found[:300]}); expected {expected}")


@contextlib.contextmanager
def csv_faults(path):
    """Around reading a CSV (plain or .gz): bytes that are not UTF-8, a cut or corrupt gzip stream and
    rows the csv module rejects become one UsageError naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UsageError(f"{os.fspath(path)} is not UTF-8 text (a byte 0x{e.object[e.start]:02x}: {e.reason}); "
                         "give the CSV as it was published") from None
    except EOFError as e:  # gzip's stream ends before its end marker
        raise UsageError(f"{os.fspath(path)} is cut short ({e}); {CUT_HINT}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise UsageError(f"{os.fspath(path)} is not a readable gzip file ({e}); it is damaged, or not gzip") from None
    except csv.Error as e:
        raise UsageError(f"{os.fspath(path)} is not a readable CSV ({e})") from None


# ---------------------------------------------------------------- safetensors

# bytes per element of each safetensors dtype; a dtype not listed here is left to the library to judge
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                          "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                          "C64": 8}
SAFETENSORS_MAX_HEADER = 100_000_000  # what the safetensors library accepts


def check_safetensors(path, what: str) -> dict[str, Any]:
    """The header of a safetensors file ({name: {dtype, shape, data_offsets}}, "__metadata__" left out),
    after checking that it fits the file: the length field against the file size, the header as JSON,
    each tensor's byte range against its dtype and shape, and the data the tensors need against the
    bytes the file holds. Reads the header only. A file that fails is a UsageError naming it and the
    fault ("cut short: its tensors need N bytes of data, it holds M")."""
    name = f"{what} {os.fspath(path)}"
    if not os.path.isfile(path):
        raise MissingInputError(f"{name} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{name} is {size} bytes long, too short for a safetensors file; {CUT_HINT}")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER or n > size - 8:
            raise UsageError(f"{name} is not a safetensors file, or is cut short: its first 8 bytes give a {n}-byte "
                             f"header but {size - 8} bytes follow")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{name} has a damaged header ({type(e).__name__}: {e}); it is not a safetensors file or "
                         "was overwritten") from None
    if not isinstance(header, dict):
        raise UsageError(f"{name} has a damaged header (a JSON {type(header).__name__}, not an object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for key, entry in tensors.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and \
            isinstance(entry.get("shape"), list) and all(type(s) is int and s >= 0 for s in entry["shape"]) and \
            isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 and \
            all(type(o) is int and o >= 0 for o in entry["data_offsets"])
        if not ok or entry["data_offsets"][0] > entry["data_offsets"][1]:
            raise UsageError(f"{name} has a damaged header: tensor {key!r} lacks a dtype, shape or valid "
                             "data_offsets")
        begin, end = entry["data_offsets"]
        item = SAFETENSORS_ITEM_BYTES.get(entry["dtype"])
        if item is not None and math.prod(entry["shape"]) * item != end - begin:
            raise UsageError(f"{name} has a damaged header: tensor {key!r} ({entry['dtype']} {entry['shape']}) needs "
                             f"{math.prod(entry['shape']) * item} bytes but its data_offsets span {end - begin}")
        spans.append((begin, end, key))
    spans.sort()
    for (_, prev_end, prev), (begin, _, key) in zip([(0, 0, None), *spans], spans):
        if begin != prev_end:
            where = f"where {prev!r} ends" if prev else "at the start of the data"
            raise UsageError(f"{name} has a damaged header: tensor {key!r} does not start {where}")
    need, held = (spans[-1][1] if spans else 0), size - 8 - n
    if held < need:
        raise UsageError(f"{name} is cut short: its tensors need {need} bytes of data but it holds {held}; {CUT_HINT}")
    if held > need:
        raise UsageError(f"{name} holds {held - need} bytes past its last tensor; it is damaged (not one whole "
                         "safetensors file)")
    return tensors


def load_safetensors(path, what: str) -> dict[str, Any]:
    """check_safetensors, then every tensor as a numpy array; what the check cannot see (a dtype this
    safetensors lacks) is still one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    check_safetensors(path, what)
    try:
        return load_file(path)
    except SafetensorError as e:
        raise UsageError(f"{what} {os.fspath(path)} does not read: {e}") from None
