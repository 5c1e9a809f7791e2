"""Whether exported weight files read in full (`llmcxr verify` on a HF export, a diffusers VQModel folder or a
taming .ckpt): a safetensors file's header against the file's size and every tensor's byte range, then every
byte read; a torch file rebuilt by torch_files' safe reader (nothing in it is run; every storage is read).
"""
from __future__ import annotations

import os

from llmcxr_jax import user_files
from llmcxr_jax.errors import UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"
_CHUNK = 64 << 20


def weight_files(path: str) -> list[str]:
    """The weight files a path names: itself, or those a folder holds at any depth (an HF export, a diffusers
    folder, a taming folder's checkpoints/last.ckpt)."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                  if n.endswith(WEIGHT_SUFFIXES))


def missing_shards(directory: str) -> list[str]:
    """Files a sharded export's *.index.json lists that the folder lacks."""
    missing = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(INDEX_SUFFIX):
            try:
                index = user_files.read_json_object(os.path.join(directory, name), "weight index", ("weight_map",))
                listed = set(dict(index["weight_map"]).values())
            except (UsageError, TypeError, ValueError):  # unreadable, or a weight_map that is not an object
                missing.append(f"{name} (unreadable index)")
                continue
            missing += [n for n in sorted(listed) if not os.path.isfile(os.path.join(directory, n))]
    return missing


def check_safetensors(path: str) -> str | None:
    """What is wrong with a .safetensors file (user_files' header checks: cut short, a bad header, a tensor past
    the end), or None once every byte has also been read (a bad disk or a lazily fetched copy fails there)."""
    what = "weights file"
    try:
        user_files.check_safetensors(path, what)
    except UsageError as e:
        return str(e).removeprefix(f"{what} {path} ")
    with open(path, "rb") as f:
        while f.read(_CHUNK):
            pass
    return None


def check_torch(path: str) -> str | None:
    """What is wrong with a torch file (.bin, taming / Lightning .ckpt), read in full by the safe reader."""
    from llmcxr_jax.convert import torch_files

    try:
        torch_files.read_torch_file(path, "weights file")
    except UsageError as e:
        return str(e).replace(f"{path} ", "", 1) if str(e).startswith(path) else str(e)
    return None


def check_file(path: str) -> str | None:
    """None when every tensor of the weight file reads in full; else what is wrong."""
    try:
        return check_safetensors(path) if path.endswith(".safetensors") else check_torch(path)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
