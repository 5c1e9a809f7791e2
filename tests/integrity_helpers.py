"""Damage as copies leave it, for the checkpoint-integrity tests: an array file cut in half, or bytes flipped
where orbax still reads the file (its zstd chunks carry no checksum of the data)."""
import glob
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def array_file(step_dir: str) -> str:
    """The largest OCDBT data file of the step's state: where the big arrays live."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def cut(step_dir: str) -> str:
    path = array_file(step_dir)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def _reads(state_dir: str) -> bool:
    """Whether orbax reads every array of a state item (to host numpy) without an error."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(state_dir)).tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        handler.restore(epath.Path(state_dir), args=ocp.args.PyTreeRestore(item=tree, restore_args=args))
        return True
    except Exception:  # noqa: BLE001 - tensorstore / zstd raise several kinds for an undecodable chunk
        return False
    finally:
        handler.close()


def flip_silently(step_dir: str) -> int:
    """Flip one byte of the step's array file at the first offset (from its middle on) after which every array
    still reads: the silent corruption the issue found. Returns the offset."""
    path = array_file(step_dir)
    with open(path, "rb") as f:
        original = f.read()
    for offset in range(len(original) // 2, len(original) - 64, 61):
        damaged = bytearray(original)
        damaged[offset] ^= 0x10
        with open(path, "wb") as f:
            f.write(bytes(damaged))
        if _reads(os.path.join(step_dir, "state")):
            return offset
    with open(path, "wb") as f:
        f.write(original)
    raise AssertionError(f"no single-byte flip of {path} left it readable")
