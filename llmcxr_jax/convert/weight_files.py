"""A HF directory's weight files, named as transformers names them: model.safetensors and / or
pytorch_model.bin (plain tensors, for stacks without the safetensors package), single or in numbered
shards with an index. Read tensor by tensor for import-hf (nothing in a .bin is run); written for export-hf."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from llmcxr_jax import user_files
from llmcxr_jax.errors import MissingInputError, UsageError

WEIGHT_FORMATS = ("safetensors", "bin", "both")


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How transformers names one format's files: a single file, or numbered shards plus an index."""

    single: str  # model.safetensors / pytorch_model.bin
    stem: str  # shard N of M is f"{stem}-{N:05d}-of-{M:05d}.{ext}"
    ext: str

    def names(self, total: int) -> list[str]:
        if total == 1:
            return [self.single]
        return [f"{self.stem}-{n:05d}-of-{total:05d}.{self.ext}" for n in range(1, total + 1)]

    @property
    def index(self) -> str:
        return self.single + ".index.json"


SAFETENSORS = WeightFormat("model.safetensors", "model", "safetensors")
TORCH_BIN = WeightFormat("pytorch_model.bin", "pytorch_model", "bin")  # what transformers 4.28 and 5.x name


def weight_formats(weights: str) -> list[WeightFormat]:
    """The formats --weights names; one with .bin files needs torch, checked here."""
    if weights not in WEIGHT_FORMATS:
        raise UsageError(f"--weights {weights!r} is not one of {WEIGHT_FORMATS}")
    formats = {"safetensors": [SAFETENSORS], "bin": [TORCH_BIN], "both": [SAFETENSORS, TORCH_BIN]}[weights]
    if TORCH_BIN in formats:
        from llmcxr_jax.convert.torch_files import require_torch
        require_torch(f"--weights {weights}")
    return formats


def _save_bin(tensors: dict[str, np.ndarray], path: str) -> None:
    """A state dict of plain torch tensors: torch.load(weights_only=True) reads it, and so does
    transformers without the safetensors package (LLM-CXR's environment has none)."""
    import torch  # weight_formats checked that it imports

    state = {}
    for key, a in tensors.items():
        if a.dtype == jnp.bfloat16:  # numpy has no bfloat16: hand torch the bits
            state[key] = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(a)
    torch.save(state, path)


def write_shards(items: Iterable[tuple[str, Callable[[], np.ndarray], int]], out_dir: str,
                 formats: list[WeightFormat], max_shard_bytes: int, *, write: bool = True,
                 progress: Callable[[str], None] | None = None) -> tuple[list[str], list[str]]:
    """(key, load, nbytes) tensors -> each format's files in out_dir, a new shard past max_shard_bytes;
    one shard's tensors are in host memory at a time. Every process must load (arrays may be gathered);
    only `write` ones write. Returns (the weight files, the same with each format's index when sharded)."""
    if SAFETENSORS in formats:
        from safetensors.numpy import save_file
    shards: list[list[tuple[str, Callable[[], np.ndarray], int]]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[2]
    total = len(shards)
    names = {fmt: fmt.names(total) for fmt in formats}
    for n, shard in enumerate(shards):
        tensors = {}
        for key, load, _ in shard:
            tensors[key] = load()
            if progress:
                progress(key)
        if write:
            for fmt in formats:
                path = os.path.join(out_dir, names[fmt][n])
                if fmt is SAFETENSORS:
                    save_file(tensors, path, metadata={"format": "pt"})
                else:
                    _save_bin(tensors, path)
        del tensors
    files = [name for fmt in formats for name in names[fmt]]
    if write and total > 1:
        for fmt in formats:
            index = {"metadata": {"total_size": sum(n for shard in shards for _, _, n in shard)},
                     "weight_map": {k: name for name, shard in zip(names[fmt], shards) for k, _, _ in shard}}
            with open(os.path.join(out_dir, fmt.index), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
    listed = [name for fmt in formats for name in names[fmt] + ([fmt.index] if total > 1 else [])]
    return files, listed


class HFCheckpointReader:
    """Tensor-by-tensor access to model.safetensors, sharded safetensors, or pytorch_model.bin."""

    def __init__(self, directory: str):
        self.directory = directory
        self._where: dict[str, str] = {}
        self._torch_cache: tuple[str, dict] | None = None
        st_index = os.path.join(directory, SAFETENSORS.index)
        bin_index = os.path.join(directory, TORCH_BIN.index)
        if os.path.isfile(st_index) or os.path.isfile(bin_index):
            index = st_index if os.path.isfile(st_index) else bin_index
            weight_map = user_files.read_json_object(index, "weight index", ("weight_map",))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UsageError(f"weight index {index}: its weight_map is not an object of tensor -> file names")
            self._where = {k: os.path.join(directory, v) for k, v in weight_map.items()}
            for path in sorted(set(self._where.values())):
                if not os.path.isfile(path):
                    raise MissingInputError(f"weight file {path} named by the index is missing")
                if path.endswith(".safetensors"):  # a cut or damaged shard is named before any tensor is read
                    user_files.check_safetensors(path, "HF weight file")
        elif os.path.isfile(os.path.join(directory, SAFETENSORS.single)):
            self._index_file(os.path.join(directory, SAFETENSORS.single))
        elif os.path.isfile(os.path.join(directory, TORCH_BIN.single)):
            self._index_file(os.path.join(directory, TORCH_BIN.single))
        else:
            raise MissingInputError(f"{directory} holds no model.safetensors, *.safetensors.index.json or "
                                    "pytorch_model.bin; give a HF GPT-NeoX directory")

    def _index_file(self, path: str) -> None:
        for k in self._file_keys(path):
            self._where[k] = path

    @staticmethod
    def _file_keys(path: str) -> list[str]:
        if path.endswith(".safetensors"):
            return list(user_files.check_safetensors(path, "HF weight file"))
        return list(_torch_load(path).keys())

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> np.ndarray:
        path = self._where[key]
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(path, framework="np") as f:
                    return np.asarray(f.get_tensor(key))
            except SafetensorError as e:  # what check_safetensors cannot see (a dtype this reader lacks)
                raise UsageError(f"HF weight file {path}: tensor {key} does not read ({e})") from None
        if self._torch_cache is None or self._torch_cache[0] != path:
            self._torch_cache = (path, _torch_load(path))
        return self._torch_cache[1][key].float().numpy()


def _torch_load(path: str) -> dict:
    from llmcxr_jax.convert.torch_files import read_torch_tensors  # only .bin checkpoints need torch

    return read_torch_tensors(path, what="HF weight shard", mmap=True)  # runs nothing in the file
