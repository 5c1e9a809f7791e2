"""On-disk format of image codes: one ArrayRecord record per image, shards committed with a JSON
sidecar, an index.json merged from the sidecars, `read_codes` into a CodeTable, and LLM-CXR's
pickle (dict dicom_id -> list of ints) read through safe_pickle, which builds plain data and nothing else.

Layout of a codes directory (written by data/encode.py or `import_pickle`):
  codes-SSSSS-of-NNNNN.array_record   records of shard S (encode_code_record), in image-list order
  codes-SSSSS-of-NNNNN.json           its sidecar: count, sha256 of the file, ids digest, skipped
                                      images, VQ-GAN config. Written last: the shard's commit mark.
  index.json                          all sidecars merged; written once every shard is committed
"""
from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from llmcxr_jax import safe_pickle, user_files
from llmcxr_jax.errors import MissingInputError, UsageError

FORMAT = "llmcxr-codes-v1"
INDEX = "index.json"
_MAGIC = b"CXC1"
_HEAD = struct.Struct("<4sH")  # magic, byte length of the utf-8 dicom_id; then the id, then uint16 LE codes
_SHARD_RE = re.compile(r"^codes-(\d{5,})-of-(\d{5,})\.(array_record|json)$")
# LLM-CXR's constants (training/mimiccxr_vq_dataset.py checks exactly these): the default for its pickles.
LLMCXR_CODES_PER_IMAGE, LLMCXR_CODEBOOK_SIZE = 256, 1024
_CODES_GLOBALS = {**safe_pickle.DATA_GLOBALS, **safe_pickle.numpy_globals()}  # what a codes pickle may name


# ---------------------------------------------------------------- records

def encode_code_record(dicom_id: str, codes) -> bytes:
    """(dicom_id, integer codes [h*w]) -> bytes: b"CXC1", uint16 id length, utf-8 id, uint16 LE codes."""
    ident = str(dicom_id).encode("utf-8")
    if not ident or len(ident) > 0xFFFF:
        raise UsageError(f"dicom_id {dicom_id!r} must be a non-empty string of at most 65535 bytes")
    arr = np.asarray(codes)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UsageError(f"codes for {dicom_id} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise UsageError(f"codes for {dicom_id} must lie in [0, 65536) to be stored as uint16")
    return _HEAD.pack(_MAGIC, len(ident)) + ident + arr.astype("<u2").tobytes()


def decode_code_record(record: bytes) -> tuple[str, np.ndarray]:
    """bytes from encode_code_record -> (dicom_id, np.uint16 [h*w])."""
    if len(record) < _HEAD.size or record[:4] != _MAGIC:
        raise UsageError("not an image-code record (bad magic); was this file written by encode-images?")
    _, n = _HEAD.unpack_from(record)
    body = record[_HEAD.size + n:]
    if len(record) < _HEAD.size + n or len(body) % 2:
        raise UsageError("truncated image-code record")
    ident = record[_HEAD.size:_HEAD.size + n].decode("utf-8")
    return ident, np.frombuffer(body, "<u2").astype(np.uint16)


# ---------------------------------------------------------------- shards

def shard_name(shard: int, num_shards: int, ext: str = "array_record") -> str:
    return f"codes-{shard:05d}-of-{num_shards:05d}.{ext}"


def ids_digest(ids: Iterable[str]) -> str:
    """What a shard was made from: sha256 of its dicom_ids in order (resume refuses a changed list)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def temp_prefix(out_dir: str, shard: int, num_shards: int) -> str:
    return os.path.join(out_dir, "." + shard_name(shard, num_shards))


def remove_temp_files(out_dir: str, shard: int, num_shards: int) -> None:
    """Leftovers of a killed writer of this shard (only ever under a dot-name, never the final one)."""
    for p in glob.glob(glob.escape(temp_prefix(out_dir, shard, num_shards)) + ".tmp-*"):
        os.remove(p)


def write_shard(out_dir: str, shard: int, num_shards: int, records: Sequence[tuple[str, np.ndarray]],
                meta: dict[str, Any]) -> dict[str, Any]:
    """Write a shard under a temp name, rename it into place, then commit it with its sidecar.

    A process killed at any point leaves either nothing under the final names, or a complete
    .array_record without a sidecar, which counts as not done and is rewritten on resume.
    """
    final = os.path.join(out_dir, shard_name(shard, num_shards))
    tmp = f"{temp_prefix(out_dir, shard, num_shards)}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # group 1: cheap random access for grain readers
    try:
        for dicom_id, codes in records:
            writer.write(encode_code_record(dicom_id, codes))
    finally:
        writer.close()
    sidecar = {"format": FORMAT, "shard": shard, "num_shards": num_shards, "file": os.path.basename(final),
               "count": len(records), "sha256": _file_sha256(tmp), **meta}
    os.replace(tmp, final)
    _write_json_atomic(os.path.join(out_dir, shard_name(shard, num_shards, "json")), sidecar)
    return sidecar


def read_sidecar(out_dir: str, shard: int, num_shards: int) -> dict[str, Any] | None:
    """The committed sidecar of a shard whose file is present and intact, else None."""
    side = os.path.join(out_dir, shard_name(shard, num_shards, "json"))
    data = os.path.join(out_dir, shard_name(shard, num_shards))
    if not (os.path.isfile(side) and os.path.isfile(data)):
        return None
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT or _file_sha256(data) != meta.get("sha256"):
        return None  # corrupted or replaced after commit: redo it
    return meta


_TEMP_RE = re.compile(r"^\.?(.*?)(\.tmp-\d+)?$")


def check_codes_dir(out_dir: str) -> None:
    """out_dir is new, empty or a codes directory (shards, sidecars, index.json and the temporary files
    of their writers); a directory holding anything else is refused rather than mixed into."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    finals = {n: _TEMP_RE.match(n).group(1) for n in names}  # a temporary file's final name
    foreign = sorted(n for n, final in finals.items() if not (_SHARD_RE.match(final) or final == INDEX))
    if foreign:
        raise UsageError(f"{out_dir} holds files that are not codes (e.g. {foreign[0]}); give a new directory "
                         "or a codes directory to resume")


def shard_counts(out_dir: str) -> dict[int, set[int]]:
    """num_shards -> shard indices with any file (committed or not) in out_dir."""
    found: dict[int, set[int]] = collections.defaultdict(set)
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
        m = _SHARD_RE.match(name)
        if m:
            found[int(m.group(2))].add(int(m.group(1)))
    return found


def committed_sidecars(out_dir: str) -> tuple[list[dict[str, Any]], list[int], int]:
    """(sidecars of committed shards, missing shard indices, num_shards) from whatever is present."""
    counts = shard_counts(out_dir)
    if len(counts) > 1:
        raise UsageError(f"{out_dir} mixes shard sets of {sorted(counts)} shards; keep one run per directory")
    if not counts:
        return [], [], 0
    (num_shards,) = counts
    metas, missing = [], []
    for s in range(num_shards):
        meta = read_sidecar(out_dir, s, num_shards)
        (metas.append(meta) if meta is not None else missing.append(s))
    return metas, missing, num_shards


def write_index(out_dir: str) -> dict[str, Any] | None:
    """Merge every shard's sidecar into index.json (atomic); None while some shard is missing.

    Any process may call it at any time: the content depends only on the committed shards, so
    two processes racing to write it write the same file.
    """
    metas, missing, num_shards = committed_sidecars(out_dir)
    if missing or not metas:
        return None
    skipped_items = [item for m in metas for item in m.get("skipped", [])]
    first = metas[0]
    index = {
        "format": FORMAT,
        "codes_per_image": first["codes_per_image"],
        "codebook_size": first["codebook_size"],
        "vqgan": first.get("vqgan"),
        "vqgan_fingerprint": first.get("vqgan_fingerprint"),
        "shard_size": first.get("shard_size"),
        "num_images": sum(m["count"] for m in metas) + len(skipped_items),
        "num_codes": sum(m["count"] for m in metas),
        "shards": [{"file": m["file"], "count": m["count"]} for m in metas],
        "skipped": dict(sorted(collections.Counter(i["reason"] for i in skipped_items).items())),
        "skipped_items": skipped_items,
    }
    _write_json_atomic(os.path.join(out_dir, INDEX), index)
    return index


# ---------------------------------------------------------------- reading

class CodeTable(Mapping[str, np.ndarray]):
    """dicom_id -> np.uint16 codes [codes_per_image] (read-only rows of one [n, L] array).

    skipped: Counter reason -> n of entries left out; skipped_items: [(dicom_id, reason)].
    metadata: the index (or merged sidecars) of a codes directory, {} for a pickle.
    missing_shards: shard indices not (yet) committed in a directory being written.
    """

    def __init__(self, ids: list[str], codes: np.ndarray, codes_per_image: int, codebook_size: int | None,
                 skipped: collections.Counter, skipped_items: list[tuple[str, str]],
                 metadata: dict[str, Any] | None = None, missing_shards: Sequence[int] = ()):
        self.ids, self.codes = ids, codes  # [n, codes_per_image] uint16
        self.codes.setflags(write=False)
        self._row = {i: r for r, i in enumerate(ids)}
        self.codes_per_image, self.codebook_size = codes_per_image, codebook_size
        self.skipped, self.skipped_items = skipped, skipped_items
        self.metadata = metadata or {}
        self.missing_shards = list(missing_shards)

    def __getitem__(self, dicom_id: str) -> np.ndarray:
        return self.codes[self._row[dicom_id]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _as_codes(value) -> np.ndarray | None:
    """An integer array from an integer ndarray or a list/tuple of ints; None for anything else."""
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)  # C-speed type check: ints -> int64, anything else another kind
        except (ValueError, OverflowError):  # ragged, or an int too large for int64
            return None
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return value
    return None


def _collect(entries: Iterable[tuple[Any, Any]], codes_per_image: int, codebook_size: int | None,
             metadata: dict[str, Any] | None = None, missing_shards: Sequence[int] = ()) -> CodeTable:
    """Validate (dicom_id, codes) pairs into a CodeTable; bad ones are counted and listed."""
    upper = min(codebook_size, 1 << 16) if codebook_size is not None else 1 << 16
    ids: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    skipped: collections.Counter = collections.Counter()
    items: list[tuple[str, str]] = []

    def skip(ident, reason):
        skipped[reason] += 1
        items.append((str(ident), reason))

    for ident, value in entries:
        arr = _as_codes(value)
        if not isinstance(ident, str) or not ident:
            skip(ident, "bad_dicom_id")
        elif ident in seen:
            skip(ident, "duplicate")
        elif arr is None:
            skip(ident, "not_integer_codes")
        elif arr.ndim != 1 or arr.shape[0] != codes_per_image:
            skip(ident, "wrong_length")
        elif arr.size and (int(arr.min()) < 0 or int(arr.max()) >= upper):
            skip(ident, "code_out_of_range")
        else:
            seen.add(ident)
            ids.append(ident)
            rows.append(arr.astype(np.uint16))
    codes = np.stack(rows) if rows else np.zeros((0, codes_per_image), np.uint16)
    return CodeTable(ids, codes, codes_per_image, codebook_size, skipped, items, metadata, missing_shards)


def _read_dir(path: str, codes_per_image: int | None, codebook_size: int | None) -> CodeTable:
    index_path = os.path.join(path, INDEX)
    if os.path.isfile(index_path):
        meta = user_files.read_json_object(index_path, "codes index")
        if meta.get("format") != FORMAT:
            raise UsageError(f"{index_path} is not a {FORMAT} index")
        files, missing = [s["file"] for s in meta["shards"]], []
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise MissingInputError(f"{path} lacks {name} listed in its index.json; re-run encode-images")
    else:  # a run still in progress, or processes that have not all finished: use what is committed
        metas, missing, _ = committed_sidecars(path)
        if not metas:
            raise MissingInputError(f"{path} holds no committed code shards; run `llmcxr encode-images` into it")
        files = [m["file"] for m in metas]
        meta = {k: metas[0].get(k) for k in ("format", "codes_per_image", "codebook_size", "vqgan",
                                             "vqgan_fingerprint", "shard_size")}
        meta["shards"] = [{"file": m["file"], "count": m["count"]} for m in metas]
        meta["skipped_items"] = [i for m in metas for i in m.get("skipped", [])]

    def entries():
        for name in files:
            reader = ArrayRecordReader(os.path.join(path, name))
            try:
                for rec in reader.read_all():
                    yield decode_code_record(rec)
            finally:
                reader.close()

    length = codes_per_image if codes_per_image is not None else int(meta["codes_per_image"])
    k = codebook_size if codebook_size is not None else int(meta["codebook_size"])
    return _collect(entries(), length, k, meta, missing)


def read_codes(path: str, codes_per_image: int | None = None, codebook_size: int | None = None) -> CodeTable:
    """An encode-images output directory or an LLM-CXR pickle -> CodeTable.

    Entries of another length than codes_per_image or with a code outside [0, codebook_size)
    are skipped, counted and listed. Defaults: a directory's index (or sidecars); for a pickle,
    LLM-CXR's own constants (256 codes, codebook 1024), the same check its training code does.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_dir(path, codes_per_image, codebook_size)
    if not os.path.isfile(path):
        raise MissingInputError(f"no codes at {path}; give an encode-images output directory or an LLM-CXR pickle")
    data = load_llmcxr_pickle(path)
    return _collect(data.items(), codes_per_image or LLMCXR_CODES_PER_IMAGE,
                    codebook_size or LLMCXR_CODEBOOK_SIZE)


# ---------------------------------------------------------------- LLM-CXR pickles

def load_llmcxr_pickle(path: str) -> dict[str, Any]:
    """LLM-CXR's encode_cxr_all.py output {dicom_id: [codes]} -> dict, without running pickle code:
    safe_pickle builds containers, numbers, strings and numpy arrays/scalars only, and refuses any
    other global (os.system, builtins.eval, ...) before it could be called."""
    try:
        with open(path, "rb") as f:
            data = safe_pickle.load(f, allowed=_CODES_GLOBALS, stand_ins=False)
    except FileNotFoundError:
        raise
    except safe_pickle.RefusedGlobal as e:
        raise UsageError(f"{path} is not a safe LLM-CXR codes pickle: {e}; nothing in it was run") from None
    except safe_pickle.MALFORMED as e:
        raise UsageError(f"{path} is not a readable LLM-CXR codes pickle: {safe_pickle.describe(e)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, not LLM-CXR's dict of dicom_id -> codes")
    for value in data.values():  # object arrays could only hold what the unpickler built, but never pass them on
        if isinstance(value, np.ndarray) and value.dtype.kind not in "iu":
            raise UsageError(f"{path} holds a {value.dtype} array; codes must be integers")
    return data


def import_pickle(pkl_path: str, out_dir: str, *, codes_per_image: int = LLMCXR_CODES_PER_IMAGE,
                  codebook_size: int = LLMCXR_CODEBOOK_SIZE, shard_size: int = 4096) -> dict[str, Any]:
    """LLM-CXR pickle -> a codes directory (shards + index.json). Invalid entries are left out and
    listed in the index. Returns the index."""
    check_codes_dir(out_dir)
    table = read_codes(pkl_path, codes_per_image, codebook_size)
    if not len(table):
        reasons = collections.Counter(r for _, r in table.skipped_items)
        raise UsageError(f"{pkl_path} has no entry of {codes_per_image} codes in [0, {codebook_size}) (skipped: "
                         f"{dict(reasons)}); give the codes per image and codebook size it was made with "
                         "(--codes-per-image, --codebook-size)")
    os.makedirs(out_dir, exist_ok=True)
    if shard_counts(out_dir) or os.path.exists(os.path.join(out_dir, INDEX)):
        raise UsageError(f"{out_dir} already holds codes; import into an empty directory")
    if shard_size < 1:
        raise UsageError(f"shard_size must be positive, got {shard_size}")
    num_shards = max(1, -(-len(table) // shard_size))
    skipped = [{"dicom_id": i, "path": os.path.abspath(pkl_path), "reason": r} for i, r in table.skipped_items]
    for s in range(num_shards):
        ids = table.ids[s * shard_size:(s + 1) * shard_size]
        write_shard(out_dir, s, num_shards, [(i, table[i]) for i in ids], {
            "codes_per_image": codes_per_image, "codebook_size": codebook_size, "vqgan": None,
            "vqgan_fingerprint": None, "shard_size": shard_size, "first": s * shard_size,
            "ids_sha256": ids_digest(ids), "skipped": skipped if s == 0 else []})
    return write_index(out_dir)  # type: ignore[return-value]


def export_pickle(codes_dir: str, pkl_path: str) -> int:
    """A codes directory -> {dicom_id: [int, ...]} pickle that LLM-CXR's training code loads as is.
    Returns the number of entries."""
    table = read_codes(codes_dir)
    data = {i: table[i].tolist() for i in table}  # plain Python ints, as encode_cxr_all.py stores
    os.makedirs(os.path.dirname(os.path.abspath(pkl_path)), exist_ok=True)
    tmp = f"{pkl_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=4)
    os.replace(tmp, pkl_path)
    return len(data)
