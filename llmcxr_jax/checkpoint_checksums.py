"""The checksums written with every checkpoint step: orbax item "checksums", one file per process
(checksums/process_<i>.json), saved inside the step's atomic commit, and their reader.

Each process records a zlib.crc32 of the C-order bytes of every array shard it owns (replica 0) with
the shard's global index ([start, stop) per axis), so any topology, one CPU process included, checks
them by slicing the full array; JSON items (metadata, a data position, grain's per-process iterator
state) get a crc32 of their canonical JSON. zlib.crc32 is in the standard library (no new package),
runs at ~2 GB/s per core and releases the GIL, so shards are summed on parallel threads. The step's
_CHECKPOINT_METADATA custom_metadata says {"checksums": FORMAT, "processes": n}: a step with neither
that nor checksum files was written before checksums.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future

CHECKSUMS = "checksums"
FORMAT = "llmcxr-checksums/1"
ALGORITHM = "crc32"  # zlib.crc32 (ISO-HDLC polynomial), over the raw bytes
STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step file that holds custom_metadata
_WRITE = True  # tests turn this off to write a checkpoint as the code before checksums did
THREADS = min(8, os.cpu_count() or 1)


class Damage(Exception):
    """What in a step is damaged, worded as the one-line error names it (e.g. "params.w fails its checksum")."""


def leaf_name(path) -> str:
    """A pytree path as orbax names the stored array: params.embed_in.embedding, opt.1.0.mu.params.w."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)


def crc32(a: np.ndarray) -> int:
    """crc32 of an array's C-order bytes (any dtype, bfloat16 included)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def canonical_json(value: Any) -> bytes:
    """The bytes a JSON item's checksum covers: independent of how a writer formatted the file."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def region(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    """A shard's index (slices) -> [[start, stop], ...] per axis of the global array."""
    return [list(s.indices(n)[:2]) for s, n in zip(index, shape)]


def as_slices(where: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in where)


# ---------------------------------------------------------------- writing

@dataclasses.dataclass
class _Pending:
    """What a save sums: per owned shard its crc32 (CPU) or a host copy to sum in the commit thread (accelerators)."""

    arrays: list[tuple[str, str, tuple[int, ...], str, list[list[int]], np.ndarray | int]]  # item, name, shape, ...
    json: list[tuple[str, str | None, bytes]]  # item, file (grain's per-process file) or None, canonical JSON


def _host_shards(item: str, tree: Any, out: list) -> None:
    """Every shard this process owns (replica 0) of the arrays of `tree`. The device state may be donated as soon
    as the save returns: a CPU shard is summed now over a zero-copy view (a copy costs more than the sum, and a
    view kept alive would stop the next step's donation); an accelerator shard is copied to host now (the
    transfers started together) and summed in the commit thread."""
    owned, cpu = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                if shard.replica_id == 0:
                    if shard.device.platform != "cpu":
                        shard.data.copy_to_host_async()
                    owned.append((leaf_name(path), leaf, shard))
        elif isinstance(leaf, np.ndarray) and jax.process_index() == 0:
            full = region(tuple(slice(None) for _ in leaf.shape), leaf.shape)
            out.append((item, leaf_name(path), leaf.shape, str(leaf.dtype), full, np.array(leaf)))
    for name, leaf, shard in owned:
        host = np.asarray(shard.data)  # a CPU shard: a view; else the transfer started above
        entry = (item, name, tuple(leaf.shape), str(leaf.dtype), region(shard.index, leaf.shape), host)
        (cpu if shard.device.platform == "cpu" else out).append(entry)
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        sums = list(pool.map(crc32, [e[-1] for e in cpu]))
    out += [(*e[:-1], c) for e, c in zip(cpu, sums)]


def iterator_state(iterator: Any) -> Any:
    """A grain iterator's state as the JSON its checkpoint file holds."""
    state = iterator.get_state()
    return json.loads(state.decode()) if isinstance(state, bytes) else state


def grain_file() -> str:
    """The per-process file grain's orbax handler writes in the item directory."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def collect(items: dict[str, Any]) -> _Pending:
    """items: name -> what is saved under it: a pytree of arrays (StandardSave's), a JSON dict
    (JsonSave's) or orbax args holding a grain iterator (one state file per process)."""
    pending = _Pending([], [])
    for item, value in items.items():
        inner = getattr(value, "item", None)
        if inner is not None and hasattr(inner, "get_state"):
            pending.json.append((item, grain_file(), canonical_json(iterator_state(inner))))
        elif isinstance(value, dict) and not _has_arrays(value):
            if jax.process_index() == 0:
                pending.json.append((item, None, canonical_json(value)))
        else:
            _host_shards(item, value, pending.arrays)
    return pending


def _has_arrays(tree: Any) -> bool:
    return any(isinstance(x, jax.Array | np.ndarray) for x in jax.tree.leaves(tree))


def _body(pending: _Pending) -> dict[str, Any]:
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        sums = list(pool.map(lambda a: a if isinstance(a, int) else crc32(a), [a[-1] for a in pending.arrays]))
    arrays: dict[str, dict[str, Any]] = {}
    for (item, name, shape, dtype, where, _), c in zip(pending.arrays, sums):
        leaf = arrays.setdefault(item, {}).setdefault(name, {"shape": list(shape), "dtype": dtype, "shards": []})
        leaf["shards"].append({"index": where, "crc32": c})
    return {"format": FORMAT, "algorithm": ALGORITHM, "process": jax.process_index(),
            "processes": jax.process_count(), "arrays": arrays,
            "json": {item: {"file": file, "crc32": zlib.crc32(data)} for item, file, data in pending.json}}


def encode(body: dict[str, Any]) -> str:
    """A checksum file: its body plus a crc32 of the body's canonical JSON, so a damaged file is caught too."""
    return json.dumps({**body, "crc32": zlib.crc32(canonical_json(body))})


class ChecksumHandler(ocp.AsyncCheckpointHandler):
    """Writes this process's checksums/process_<i>.json: host copies are taken in the blocking part of the
    save, the sums and the file in its commit future, so orbax finalises no step without them."""

    async def async_save(self, directory: epath.Path, args: ChecksumSave) -> list:
        pending = collect(args.items)

        async def write() -> None:
            (directory / f"process_{jax.process_index()}.json").write_text(encode(_body(pending)))

        return [ocp_future.CommitFutureAwaitingContractedSignals(write(), name="llmcxr_checksums")]

    def save(self, directory: epath.Path, args: ChecksumSave) -> None:
        (directory / f"process_{jax.process_index()}.json").write_text(encode(_body(collect(args.items))))

    def restore(self, directory: epath.Path, args: Any = None) -> dict[str, Any]:
        found = read_files(directory.parent)
        return found.raw if found is not None else {}

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        return None


@ocp.args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(ocp.args.CheckpointArgs):
    """The items of a step (name -> what is saved under it), summed as ChecksumHandler saves them."""

    items: dict[str, Any]


@ocp.args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(ocp.args.CheckpointArgs):
    """orbax needs restore args for every handler; the checks read the files with read_files instead."""


def save_args(items: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(extra Composite items, custom_metadata) that add checksums to a save of `items`."""
    if not _WRITE:
        return {}, None
    return {CHECKSUMS: ChecksumSave(items)}, {CHECKSUMS: FORMAT, "processes": jax.process_count()}


# ---------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class LeafRecord:
    """One stored array's checksums, merged over the processes that wrote its shards."""

    shape: tuple[int, ...]
    dtype: str
    shards: tuple[tuple[tuple[slice, ...], int], ...]  # (global index, crc32) per owned shard

    def covers_whole(self) -> bool:
        size = math.prod(self.shape)
        regions = {tuple((s.start, s.stop) for s in idx) for idx, _ in self.shards}
        return sum(math.prod(b - a for a, b in r) for r in regions) == size


@dataclasses.dataclass(frozen=True)
class StepChecksums:
    """Every process's checksum file of one step, merged."""

    arrays: dict[str, dict[str, LeafRecord]]  # item -> stored array name -> record
    json: dict[str, list[tuple[str | None, int]]]  # item -> (grain's file or None, crc32), one per writer
    processes: int
    raw: dict[str, Any]


def _step_marker(step_dir: epath.Path) -> bool:
    """Whether orbax's step metadata says checksums were written (Damage when it cannot be read)."""
    path = step_dir / STEP_METADATA
    if not path.exists():
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise Damage(f"{STEP_METADATA} cannot be read (file cut short?)") from None
    return bool(isinstance(meta, dict) and isinstance(meta.get("custom_metadata"), dict)
                and meta["custom_metadata"].get(CHECKSUMS))


def _read_file(path: epath.Path) -> dict[str, Any]:
    where = f"{CHECKSUMS}/{path.name}"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Damage(f"{where} is missing") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise Damage(f"{where} cannot be read (file cut short?)") from None
    if not isinstance(data, dict) or "crc32" not in data:
        raise Damage(f"{where} is not a checksum file")
    body = {k: v for k, v in data.items() if k != "crc32"}
    if zlib.crc32(canonical_json(body)) != data["crc32"]:
        raise Damage(f"{where} fails its own checksum")
    if body.get("format") != FORMAT:
        raise Damage(f"{where} has format {body.get('format')!r}, this version reads {FORMAT!r}")
    return body


def read_files(step_dir: epath.Path) -> StepChecksums | None:
    """The step's checksums; None when it was written before checksums; Damage when they are missing
    (the step metadata says they were written), cut or altered."""
    folder = step_dir / CHECKSUMS
    first = folder / "process_0.json"
    if not folder.exists() or not first.exists():
        if _step_marker(step_dir):
            raise Damage(f"its checksum file {CHECKSUMS}/process_0.json is missing")
        if folder.exists() and any(folder.iterdir()):
            raise Damage(f"its checksum file {CHECKSUMS}/process_0.json is missing")
        return None
    bodies = [_read_file(first)]
    bodies += [_read_file(folder / f"process_{i}.json") for i in range(1, int(bodies[0]["processes"]))]
    arrays: dict[str, dict[str, dict]] = {}
    json_items: dict[str, list[tuple[str | None, int]]] = {}
    for body in bodies:
        for item, leaves in body["arrays"].items():
            for name, leaf in leaves.items():
                merged = arrays.setdefault(item, {}).setdefault(name, {"shape": leaf["shape"], "dtype": leaf["dtype"],
                                                                       "shards": []})
                merged["shards"] += [(as_slices(s["index"]), int(s["crc32"])) for s in leaf["shards"]]
        for item, rec in body["json"].items():
            json_items.setdefault(item, []).append((rec["file"], int(rec["crc32"])))
    records = {item: {name: LeafRecord(tuple(r["shape"]), r["dtype"], tuple(r["shards"])) for name, r in leaves.items()}
               for item, leaves in arrays.items()}
    return StepChecksums(records, json_items, len(bodies), {"files": bodies})
