"""Images -> VQ-GAN codes, once, offline: a grain pipeline reads and preprocesses the image list,
a jitted encode sharded over the mesh's batch axes turns batches into codes, and finished shards
are committed to ArrayRecord files (format and readers: data/codes.py, re-exported here).

Resume: the image list is cut into fixed shards of `shard_size` images; a committed shard (file
renamed into place, then its sidecar) is never redone, so a killed run loses at most the shards
in flight. Multi-host: shard s belongs to process s % process_count; each process writes its own
shards and whichever process finds every shard committed writes index.json (any process may,
with the same result). read_codes merges the committed shards when index.json is not there yet.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from llmcxr_jax import sharding
from llmcxr_jax.data import codes as code_files
from llmcxr_jax.data.codes import (  # noqa: F401
    CodeTable,
    decode_code_record,
    encode_code_record,
    export_pickle,
    import_pickle,
    read_codes,
    write_index,
)
from llmcxr_jax.data.images import ImageError, load_image
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.vqgan import VQModel

BATCH_AXES = sharding.BATCH_AXES
DEFAULT_SHARD_SIZE = 4096


# ---------------------------------------------------------------- input pipeline

class LoadImage:
    """grain map: (list position, shard, dicom_id, path) -> preprocessed image, or a failure
    record (zeros image, ok False, reason) so one bad file never stops the run."""

    def __init__(self, size: int, channels: int):
        self.size, self.channels = size, channels

    def __call__(self, item):
        position, shard, dicom_id, path = item
        out = {"position": position, "shard": shard, "ok": True, "reason": "", "error": ""}
        try:
            out["image"] = load_image(path, self.size, self.channels)
        except ImageError as e:
            out.update(ok=False, error=str(e), reason="missing_file" if not os.path.exists(path)
                       else "unreadable_image")
            out["image"] = np.zeros((self.size, self.size, self.channels), np.float32)
        return out


def stack_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """grain batch_fn: images stacked [b, S, S, C]; bookkeeping kept as arrays / lists."""
    return {"image": np.stack([i["image"] for i in items]),
            "position": np.asarray([i["position"] for i in items], np.int64),
            "shard": np.asarray([i["shard"] for i in items], np.int64),
            "ok": np.asarray([i["ok"] for i in items], bool),
            "reason": [i["reason"] for i in items], "error": [i["error"] for i in items]}


def image_batches(items: Sequence[tuple[int, int, str, str]], size: int, channels: int, batch: int,
                  num_workers: int, num_threads: int):
    """grain: source -> LoadImage (threads; and worker processes if num_workers) -> batches of
    `batch` (the last one short). Order inside a shard does not matter: records are sorted
    by list position when a shard is written."""
    ds = (grain.MapDataset.source(list(items)).map(LoadImage(size, channels))
          .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                             prefetch_buffer_size=max(2 * batch, num_threads)))
          .batch(batch, batch_fn=stack_items))
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return ds


# ---------------------------------------------------------------- device side

@functools.lru_cache(maxsize=8)
def _encoder(graphdef, mesh: Mesh, param_specs: tuple) -> Callable:
    """jit(images -> uint16 codes) with params placed by the rules table and the batch split
    over (data, fsdp). Cached per model structure and mesh, so repeated runs compile once."""
    treedef, specs = param_specs
    param_sh = jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

    def encode(params, images):  # images [B, S, S, C] -> codes [B, h*w] uint16 (the stored dtype)
        return nnx.merge(graphdef, params).encode(images)[0].astype(jnp.uint16)

    return jax.jit(encode, in_shardings=(param_sh, batch_sh), out_shardings=batch_sh)


def _prepare_model(vqgan_dir_or_model, mesh: Mesh) -> tuple[VQModel, Any, Any, Callable, str | None]:
    if isinstance(vqgan_dir_or_model, VQModel):
        model, source = vqgan_dir_or_model, None
    else:
        from llmcxr_jax.checkpoint import load_vqgan  # orbax only when reading a checkpoint
        source = os.path.abspath(os.fspath(vqgan_dir_or_model))
        model, _ = load_vqgan(source, mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    flat, treedef = jax.tree.flatten(shardings)
    fn = _encoder(graphdef, mesh, (treedef, tuple(s.spec for s in flat)))
    return model, graphdef, params, fn, source


def vqgan_fingerprint(model: VQModel) -> str:
    """Which weights made the codes: sha256 of the codebook (resume refuses different weights)."""
    emb = model.quantize.embedding.get_value()
    if isinstance(emb, jax.Array) and not emb.is_fully_addressable:  # multi-host: gather the global value
        emb = multihost_utils.process_allgather(emb, tiled=True)
    return hashlib.sha256(np.asarray(emb).tobytes()).hexdigest()[:16]


def _local_rows(codes: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order it fed them."""
    if jax.process_count() == 1:
        return np.asarray(codes)
    return np.asarray(multihost_utils.global_array_to_host_local_array(codes, mesh, PartitionSpec(BATCH_AXES)))


# ---------------------------------------------------------------- the job

def _check_list(image_list) -> list[tuple[str, str]]:
    items = []
    seen = set()
    for n, entry in enumerate(image_list):
        if len(entry) != 2:
            raise UsageError(f"image_list entry {n} is {entry!r}; give (dicom_id, image_path) pairs")
        dicom_id, path = str(entry[0]), os.fspath(entry[1])
        if not dicom_id:
            raise UsageError(f"image_list entry {n} has an empty dicom_id")
        if dicom_id in seen:
            raise UsageError(f"dicom_id {dicom_id} appears twice in the image list; ids must be unique")
        seen.add(dicom_id)
        items.append((dicom_id, path))
    if not items:
        raise UsageError("the image list is empty; nothing to encode")
    return items


def _check_batch(batch_size: int, mesh: Mesh) -> int:
    devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    procs = jax.process_count()
    if batch_size < 1 or batch_size % devices or batch_size % procs:
        raise UsageError(f"batch_size {batch_size} must be a positive multiple of the {devices} devices on the "
                         f"mesh's data x fsdp axes and of the {procs} processes")
    return batch_size // procs


def _plan(out_dir: str, items, owned: list[int], shard_size: int, num_shards: int,
          fingerprint: str) -> tuple[list[int], list[int]]:
    """(shards to encode, committed shards to keep) among this process's shards."""
    pending, reused = [], []
    for s in owned:
        ids = [i for i, _ in items[s * shard_size:(s + 1) * shard_size]]
        meta = code_files.read_sidecar(out_dir, s, num_shards)
        if meta is None:
            code_files.remove_temp_files(out_dir, s, num_shards)
            pending.append(s)
        elif meta.get("ids_sha256") != code_files.ids_digest(ids) or meta.get("vqgan_fingerprint") != fingerprint:
            raise UsageError(f"{out_dir}: shard {s} was made from another image list or VQ-GAN; "
                             "use a new --out directory")
        else:
            reused.append(s)
    return pending, reused


def encode_images(vqgan_dir_or_model, image_list, out_dir: str, *, batch_size: int, mesh: Mesh | str,
                  num_workers: int = 0, process_index: int | None = None, process_count: int | None = None,
                  progress: bool = True, shard_size: int = DEFAULT_SHARD_SIZE, num_threads: int = 8,
                  on_shard_done: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode (dicom_id, image_path) pairs into `out_dir` (resumable); returns a summary dict.

    batch_size is global (all JAX processes). process_index / process_count choose this
    process's shards (default: JAX's); giving them lets independent single-host jobs split one
    list. on_shard_done(shard) runs after each shard is committed (progress hooks, tests).
    """
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
    items = _check_list(image_list)
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise UsageError(f"process_index {pi} must lie in [0, process_count {pc})")
    if shard_size < 1:
        raise UsageError(f"shard_size must be positive, got {shard_size}")
    local_batch = _check_batch(batch_size, mesh)
    code_files.check_codes_dir(out_dir)
    num_shards = -(-len(items) // shard_size)
    others = set(code_files.shard_counts(out_dir)) - {num_shards}
    if others:
        raise UsageError(f"{out_dir} holds shards of another run ({sorted(others)[0]} shards, not {num_shards}); "
                         "use a new --out or the same image list and shard_size")
    model, graphdef, params, encode, source = _prepare_model(vqgan_dir_or_model, mesh)
    cfg = model.cfg
    if cfg.n_embed > 1 << 16:
        raise UsageError(f"codebook of {cfg.n_embed} codes does not fit the uint16 code records")
    fingerprint = vqgan_fingerprint(model)
    os.makedirs(out_dir, exist_ok=True)
    owned = [s for s in range(num_shards) if s % pc == pi]
    pending, reused = _plan(out_dir, items, owned, shard_size, num_shards, fingerprint)
    work = [(p, s, items[p][0], items[p][1]) for s in pending
            for p in range(s * shard_size, min((s + 1) * shard_size, len(items)))]
    steps = -(-len(work) // local_batch)
    if jax.process_count() > 1:  # every process runs the same number of SPMD steps
        steps = int(np.max(multihost_utils.process_allgather(np.asarray([steps]))))
    size, channels = cfg.resolution, cfg.in_channels
    shard_meta = {"codes_per_image": cfg.codes_per_image, "codebook_size": cfg.n_embed,
                  "vqgan": {**cfg.to_dict(), "source": source}, "vqgan_fingerprint": fingerprint,
                  "shard_size": shard_size}
    remaining = {s: min((s + 1) * shard_size, len(items)) - s * shard_size for s in pending}
    records: dict[int, list[tuple[int, str, np.ndarray]]] = {s: [] for s in pending}
    skipped: dict[int, list[dict[str, str]]] = {s: [] for s in pending}
    stats = {"images_encoded": 0, "skipped": 0}
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    global_shape = (batch_size, size, size, channels)
    bar = tqdm(total=len(work), unit="img", file=sys.stderr, disable=not progress, desc="encode-images",
               smoothing=0.1)

    def finish(batch: dict[str, Any] | None, codes: jax.Array) -> None:
        """Host side of one step: route codes and failures to their shards, commit full shards."""
        if batch is None:
            return
        rows = _local_rows(codes, mesh)
        for j, position in enumerate(batch["position"]):
            s, dicom_id, path = int(batch["shard"][j]), items[position][0], items[position][1]
            if batch["ok"][j]:
                records[s].append((int(position), dicom_id, rows[j]))
                stats["images_encoded"] += 1
            else:
                skipped[s].append({"dicom_id": dicom_id, "path": path, "reason": batch["reason"][j],
                                   "error": batch["error"][j]})
                stats["skipped"] += 1
            remaining[s] -= 1
            if remaining[s] == 0:
                recs = sorted(records.pop(s))
                code_files.write_shard(out_dir, s, num_shards, [(i, c) for _, i, c in recs], {
                    **shard_meta, "first": s * shard_size,
                    "ids_sha256": code_files.ids_digest([i for i, _ in items[s * shard_size:(s + 1) * shard_size]]),
                    "skipped": skipped[s]})
                if on_shard_done is not None:
                    on_shard_done(s)
        bar.update(len(batch["position"]))
        bar.set_postfix(skipped=stats["skipped"], refresh=False)

    it = iter(image_batches(work, size, channels, local_batch, num_workers, num_threads)) if work else iter(())
    in_flight: tuple[dict[str, Any] | None, jax.Array] | None = None
    try:
        with jax.set_mesh(mesh):
            for _ in range(steps):
                batch = next(it, None)
                host = np.zeros((local_batch, size, size, channels), np.float32)
                if batch is not None:  # the last batch is short: pad it, drop the padding's codes after
                    host[:len(batch["position"])] = batch["image"]
                codes = encode(params, jax.make_array_from_process_local_data(batch_sh, host, global_shape))
                if in_flight is not None:  # host work of the previous step overlaps this step's compute
                    finish(*in_flight)
                in_flight = (batch, codes)
            if in_flight is not None:
                finish(*in_flight)
    finally:
        bar.close()
        if hasattr(it, "close"):
            it.close()
    if remaining and any(remaining.values()):
        raise RuntimeError(f"encode-images: shards {[s for s, n in remaining.items() if n]} were not completed")

    if jax.process_count() > 1:  # all processes' shards are committed before anyone merges the index
        multihost_utils.sync_global_devices("encode-images: shards committed")
    index = write_index(out_dir)
    seconds = time.perf_counter() - t0
    reasons: dict[str, int] = {}
    for s in pending:
        for item in skipped[s]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    return {
        "out_dir": os.path.abspath(out_dir), "process_index": pi, "process_count": pc,
        "num_images": len(items), "num_shards": num_shards, "shards_owned": owned,
        "shards_encoded": pending, "shards_reused": reused,
        "images_encoded": stats["images_encoded"], "images_skipped": stats["skipped"], "skipped": reasons,
        "skipped_items": [item for s in pending for item in skipped[s]],
        "index_written": index is not None, "seconds": seconds,
        "images_per_s": (stats["images_encoded"] + stats["skipped"]) / seconds if seconds > 0 else 0.0,
        "codes_per_image": cfg.codes_per_image, "codebook_size": cfg.n_embed,
    }
