"""Reading PyTorch weight files safely: torch.load(weights_only=True), so nothing in a file
is ever executed; a file that needs arbitrary unpickling is refused with how to re-save it.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from llmcxr_jax.errors import MissingInputError, UsageError


def read_torch_state_dict(path: str, what: str = "torch state dict") -> dict[str, np.ndarray]:
    """torch.load(weights_only=True): a state dict (or {"state_dict": ...}) -> numpy; nothing in
    the file is executed, so a whole pickled model is refused with the way to re-save it."""
    import torch

    if not os.path.isfile(path):
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses any global but tensors and plain containers
        if "global" in str(e).lower():
            raise UsageError(f"{path} needs arbitrary unpickling ({_first_line(e)}); refused. Re-save its "
                             "weights with torch.save(model.state_dict(), path)") from None
        raise UsageError(f"{path} is not a readable torch file: {_first_line(e)}") from None
    except (RuntimeError, EOFError) as e:
        raise UsageError(f"{path} is not a readable torch file: {_first_line(e)}") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} holds no state dict of tensors")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    unsupported = [ln for ln in lines if "Unsupported" in ln or "global" in ln.lower()]
    return (unsupported or lines or [type(e).__name__])[0].strip()[:160]
