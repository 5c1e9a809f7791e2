"""Checks of a checkpoint step against its checksums (checkpoint_checksums.py): in memory after a
sharded restore (each process sums the shards it holds), or on the host by reading every array to
numpy (`llmcxr verify`, and the failure path that names the damaged array and the newest intact
step). Also: the one-line error, the once-only notice for steps written before checksums, moving a
damaged step aside, and the agreement of all processes on what is damaged.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llmcxr_jax import storage
from llmcxr_jax.checkpoint_checksums import (
    THREADS,
    Damage,
    LeafRecord,
    StepChecksums,
    canonical_json,
    crc32,
    leaf_name,
    read_files,
)
from llmcxr_jax.errors import UsageError

STATE = "state"
CUT = "cannot be read (file cut short?)"
HOST_READ_BYTES = 512 * 1024 ** 2  # arrays read to host numpy per orbax call when verifying on the host
_NOTICED: set[tuple[str, int]] = set()


class CheckpointDamaged(UsageError):
    """A checkpoint step whose files fail their checksums or cannot be read."""


def quiet_failed_reads() -> None:
    """When one read of an orbax restore fails (a cut file), orbax leaves its other reads pending; as their event
    loop closes they end as "Event loop is closed" errors and never-finished read coroutines, which
    sys.unraisablehook prints as dozens of tracebacks. Those, and only those, are dropped (installed once), so
    a damaged checkpoint stays one line."""
    previous = sys.unraisablehook
    if getattr(previous, "llmcxr_quiet", False):
        return

    def hook(u) -> None:
        code = getattr(getattr(u.object, "cr_code", None), "co_name", "")
        if code == "_read_array_index_and_device_put" or (
                isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            return
        previous(u)

    hook.llmcxr_quiet = True
    sys.unraisablehook = hook


def step_dir(directory: str, step: int) -> epath.Path:
    return storage.path(directory) / str(step)


def damaged_line(directory: str, step: int, what: str, hint: str) -> str:
    return f"checkpoint step {step} in {directory} is damaged: {what}; {hint}"


def checksums(directory: str, step: int) -> StepChecksums | None:
    """The step's checksums, or None (with a once-only notice) for a step written before checksums."""
    found = read_files(step_dir(directory, step))
    if found is None and (directory, step) not in _NOTICED:
        _NOTICED.add((directory, step))
        if jax.process_index() == 0:
            print(f"checkpoint step {step} in {directory} carries no checksums (written before checksums); "
                  "it is loaded unchecked", file=sys.stderr)
    return found


# ---------------------------------------------------------------- JSON items

def check_json_items(directory: str, step: int, sums: StepChecksums | None, items: tuple[str, ...]) -> None:
    """Damage when a JSON item of `items` (metadata, a data position, every process's grain file) cannot be
    read or fails its checksum; read from their files, which are small."""
    folder = step_dir(directory, step)
    for item in items:
        if not (folder / item).exists():
            if sums is not None and item in sums.json:
                raise Damage(f"its {item} item is missing")
            continue
        if sums is None:  # written before checksums: every JSON file of the item must still parse
            for file in sorted(p.name for p in (folder / item).iterdir() if p.name.endswith(".json")):
                _read_json(folder / item, file, item)
            if (folder / item / "metadata").exists():
                _read_json(folder / item, None, item)
            continue
        for file, expected in sums.json.get(item, []):
            value = _read_json(folder / item, file, item)
            if zlib.crc32(canonical_json(value)) != expected:
                raise Damage(f"{item}{'/' + file if file else ''} fails its checksum")


def _read_json(folder: epath.Path, file: str | None, item: str) -> Any:
    where = f"{item}/{file}" if file else item
    try:
        if file is None:
            return ocp.JsonCheckpointHandler().restore(folder)
        return json.loads((folder / file).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise Damage(f"{where} {CUT}") from None


# ---------------------------------------------------------------- arrays in memory

def _normal(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _readers(arr: jax.Array | np.ndarray, rec: LeafRecord) -> list[tuple[Callable[[], np.ndarray], int]] | None:
    """(read this process's block, expected crc32) for each recorded shard this process checks: the
    lowest-numbered device whose shard contains the shard's region checks it. None when some region lies
    across shards of another process's devices (then the array is checked by a host read)."""
    if isinstance(arr, np.ndarray):
        return [(lambda w=where: arr[w], c) for where, c in rec.shards]
    held = sorted(((d.process_index, d.id, d, _normal(idx, arr.shape))
                   for d, idx in arr.sharding.devices_indices_map(arr.shape).items()), key=lambda h: h[:2])
    exact: dict[tuple, tuple] = {}
    for h in held:  # the common case, a restore onto the saving layout, needs no search over the devices
        exact.setdefault(tuple((s.start, s.stop) for s in h[3]), h)
    local = {s.device: s for s in arr.addressable_shards}
    out = []
    for where, c in rec.shards:
        holder = exact.get(tuple((w.start, w.stop) for w in where)) or next(
            (h for h in held if all(o.start <= w.start and w.stop <= o.stop for o, w in zip(h[3], where))), None)
        if holder is None:
            if not arr.is_fully_addressable:
                return None
            out.append((lambda w=where: np.asarray(arr)[w], c))
        elif holder[0] == jax.process_index():
            shard, outer = local[holder[2]], holder[3]
            inner = tuple(slice(w.start - o.start, w.stop - o.start) for o, w in zip(outer, where))
            out.append((lambda s=shard, i=inner: np.asarray(s.data)[i], c))
    return out


def check_restored(records: dict[str, LeafRecord], tree: Any, prefix: str) -> tuple[str | None, list[str]]:
    """Sum this process's share of the shards of a restored pytree (names `prefix`.<path>) against `records`.
    -> (the first damage found, in name order, or None; the names only a host read can check)."""
    jobs, on_host, problems = [], [], []
    for path, arr in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(filter(None, (prefix, leaf_name(path))))
        rec = records.get(name)
        if rec is None:
            problems.append(f"{name} has no checksum")
        elif not rec.covers_whole():
            problems.append(f"{name} has no checksum for part of it")
        elif tuple(arr.shape) != rec.shape or str(arr.dtype) != rec.dtype:
            on_host.append(name)  # restored as another dtype: only the stored bytes can be summed
        elif (readers := _readers(arr, rec)) is None:
            on_host.append(name)
        else:
            jobs += [(name, read, c) for read, c in readers]
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        sums = list(pool.map(lambda job: crc32(job[1]()), jobs))
    problems += [f"{name} fails its checksum" for (name, _, c), got in zip(jobs, sums) if got != c]
    return (min(problems) if problems else None), on_host


def agree(problem: str | None) -> str | None:
    """The first process's problem when any has one, the same on every process (each checked its shards)."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils

    width = 1024
    mine = np.frombuffer((problem or "").encode()[:width].ljust(width, b"\0"), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    found = [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every.reshape(-1, width)]
    return next((p for p in found if p), None)


# ---------------------------------------------------------------- arrays on the host

def _state_tree(folder: epath.Path) -> dict[str, Any]:
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return dict(getattr(handler.metadata(folder), "tree", {}))
    finally:
        handler.close()


def read_host(folder: epath.Path, names: list[str], tree: dict[str, Any] | None = None):
    """Yield (name, numpy array or Damage) for the stored arrays `names` of a state item, read in groups of
    about HOST_READ_BYTES; a group that fails is read array by array to name the one that cannot be read."""
    tree = _state_tree(folder) if tree is None else tree
    meta = {leaf_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
    group, size = [], 0
    for name in names:
        m = meta[name]
        group.append(name)
        size += math.prod(getattr(m, "shape", ()) or (1,)) * np.dtype(getattr(m, "dtype", np.float32)).itemsize
        if size >= HOST_READ_BYTES:
            yield from _read_group(folder, tree, group)
            group, size = [], 0
    if group:
        yield from _read_group(folder, tree, group)


def _read_group(folder: epath.Path, tree: dict[str, Any], group: list[str]):
    try:
        got = _restore_numpy(folder, tree, set(group))
    except Exception:  # noqa: BLE001 - tensorstore raises many kinds for a cut file; each array is retried alone
        if len(group) == 1:
            yield group[0], Damage(f"{group[0]} {CUT}")
            return
        for name in group:
            yield from _read_group(folder, tree, [name])
        return
    yield from ((name, got[name]) for name in group)


def _restore_numpy(folder: epath.Path, tree: dict[str, Any], wanted: set[str]) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)
    names = [leaf_name(p) for p, _ in flat[0]]
    item = jax.tree_util.tree_unflatten(flat[1], [m if n in wanted else ocp.PLACEHOLDER
                                                  for n, (_, m) in zip(names, flat[0])])
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        out = handler.restore(folder, args=ocp.args.PyTreeRestore(item=item, restore_args=args))
    finally:
        handler.close()
    return {n: np.asarray(a) for n, a in zip(names, jax.tree.leaves(out, is_leaf=lambda x: x is ocp.PLACEHOLDER))
            if n in wanted}


def check_on_host(directory: str, step: int, sums: StepChecksums | None, select: Callable[[str], bool],
                  names: list[str] | None = None) -> None:
    """Damage when a selected stored array of the step's state cannot be read in full or fails its checksum."""
    quiet_failed_reads()
    folder = step_dir(directory, step) / STATE
    if not folder.exists():
        raise Damage(f"its {STATE} item is missing")
    try:
        tree = _state_tree(folder)
    except Exception:  # noqa: BLE001 - a cut _METADATA fails in json, tensorstore or orbax
        raise Damage(f"{STATE}/_METADATA {CUT}") from None
    stored = [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    records = sums.arrays.get(STATE, {}) if sums is not None else {}
    if sums is not None:
        missing = sorted(n for n in records if select(n) and n not in stored)
        if missing:
            raise Damage(f"{missing[0]} is missing from {STATE}/_METADATA")
    wanted = names if names is not None else [n for n in stored if select(n)]
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        for name, got in read_host(folder, wanted, tree):
            if isinstance(got, Damage):
                raise got
            if sums is None:
                continue
            rec = records.get(name)
            if rec is None:
                raise Damage(f"{name} has no checksum")
            if tuple(got.shape) != rec.shape or str(got.dtype) != rec.dtype:
                raise Damage(f"{name} is stored as {got.dtype}{list(got.shape)}, its checksums say "
                             f"{rec.dtype}{list(rec.shape)}")
            if not rec.covers_whole():
                raise Damage(f"{name} has no checksum for part of it")
            if list(pool.map(lambda s, a=got: crc32(a[s[0]]), rec.shards)) != [c for _, c in rec.shards]:
                raise Damage(f"{name} fails its checksum")


# ---------------------------------------------------------------- whole steps

@dataclasses.dataclass(frozen=True)
class StepStatus:
    """What a host check of one step found: "intact", "unchecked" (no checksums, reads in full) or "damaged"."""

    step: int
    state: str
    what: str = ""

    def line(self) -> str:
        if self.state == "damaged":
            return f"step {self.step}: damaged: {self.what}"
        if self.state == "unchecked":
            return f"step {self.step}: no checksums (written before checksums); every array reads in full"
        return f"step {self.step}: intact"


def verify_step(directory: str, step: int, select: Callable[[str], bool] = lambda _: True,
                items: tuple[str, ...] = ("metadata", "data_iter")) -> StepStatus:
    """Read every selected array of the step to host numpy (no device, no mesh) and check it and the JSON
    `items` against the step's checksums."""
    try:
        sums = read_files(step_dir(directory, step))
        check_json_items(directory, step, sums, items)
        check_on_host(directory, step, sums, select)
    except Damage as d:
        return StepStatus(step, "damaged", str(d))
    return StepStatus(step, "intact" if sums is not None else "unchecked")


def intact_hint(directory: str, step: int, steps: list[int], select: Callable[[str], bool],
                items: tuple[str, ...]) -> str:
    """"step N is intact" for the newest older step that passes a host check, else "no intact step"."""
    for older in sorted((s for s in steps if s < step), reverse=True):
        status = verify_step(directory, older, select, items)
        if status.state == "intact":
            return f"step {older} is intact"
        if status.state == "unchecked":
            return f"step {older} reads in full (it carries no checksums)"
    return "no intact step"


def set_aside(directory: str, step: int) -> str:
    """Move a damaged step to <dir>/<step>.damaged (a numbered suffix when that exists); never deletes."""
    base = storage.path(directory)
    target = base / f"{step}.damaged"
    n = 1
    while target.exists():
        target = base / f"{step}.damaged.{n}"
        n += 1
    (base / str(step)).rename(target)
    return str(target)


# ---------------------------------------------------------------- loads

def restore_and_check(directory: str, step: int, restore: Callable[[], Any], tree_of: Callable[[Any], Any],
                      prefix: str, items: tuple[str, ...]) -> tuple[str | None, Any]:
    """Run restore() (a sharded orbax restore of the step) and check what it read: the JSON `items` and the
    checksum files first, then the restored arrays tree_of(result) (stored names `prefix`.<path>) in memory,
    each process its own shards. -> (the damage every process agrees on, or None; the result). A restore
    that raises is checked on the host: damage is reported, anything else re-raised as it was."""
    out = None
    quiet_failed_reads()
    select = (lambda n: n == prefix or n.startswith(prefix + ".")) if prefix else (lambda _: True)
    try:
        sums = checksums(directory, step)
        check_json_items(directory, step, sums, items)
        try:
            out = restore()
        except UsageError:
            raise
        except Exception:  # noqa: BLE001 - a cut file fails inside tensorstore with many exception types
            check_on_host(directory, step, sums, select)
            raise
        problem = None
        if sums is not None:
            problem, on_host = check_restored(sums.arrays.get(STATE, {}), tree_of(out), prefix)
            if problem is None and on_host:
                check_on_host(directory, step, sums, select, names=on_host)
    except Damage as d:
        problem = str(d)
    return agree(problem), out


def damage_or_raise(directory: str, step: int, error: Exception, steps: list[int]) -> CheckpointDamaged:
    """For a read of the step that raised `error`: the one-line CheckpointDamaged when a host check finds
    damage; else `error` itself is raised again."""
    status = verify_step(directory, step)
    if status.state != "damaged":
        raise error
    return CheckpointDamaged(damaged_line(directory, step, status.what,
                                          intact_hint(directory, step, steps, lambda _: True, JSON_ITEMS)))


JSON_ITEMS = ("metadata", "data_iter")


def newest_passing(directory: str, steps: list[int], attempt: Callable[[int], tuple[str | None, Any]],
                   move_aside: bool) -> tuple[int, Any, list[tuple[int, str]]]:
    """The newest step whose attempt(step) reports no damage (every process agrees), with its result and
    the damaged newer steps [(step, damage)]; these are warned about once and, when `move_aside`, moved to
    <step>.damaged only once an intact step is found. CheckpointDamaged (one line) when none is."""
    damaged: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        problem, out = attempt(step)
        if problem is None:
            for bad, what in damaged:
                where = "left in place (another run's checkpoints)"
                if move_aside:
                    where = f"moved to {_set_aside_everywhere(directory, bad)}"
                if jax.process_index() == 0:
                    print(f"checkpoint step {bad} in {directory} is damaged: {what}; {where}; resuming from step "
                          f"{step}", file=sys.stderr)
            return step, out, damaged
        damaged.append((step, problem))
    listed = "; ".join(f"step {s}: {w}" for s, w in damaged)
    raise CheckpointDamaged(f"{directory} holds no intact checkpoint step ({listed}); copy intact checkpoints "
                            "back, or start in a new workdir")


def _set_aside_everywhere(directory: str, step: int) -> str:
    """Process 0 moves the step; every process waits until it has (the next step's save must not find it)."""
    target = set_aside(directory, step) if jax.process_index() == 0 else f"{directory}/{step}.damaged"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"llmcxr set aside step {step}")
    return target
