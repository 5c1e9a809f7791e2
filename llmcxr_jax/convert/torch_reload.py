"""Run our exports in PyTorch: greedy generation with transformers from an exported HF directory,
and image decoding with diffusers from an exported VQModel directory; the checks that an export
works outside JAX. In generation image-token ids are suppressed, as our text mode masks them, so
both runtimes take the argmax over the same ids and must produce the same report."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmcxr_jax.convert.torch_files import require_torch


def torch_greedy(hf_dir: str, prompt_ids: Sequence[int], *, max_new_tokens: int, stop_ids: Sequence[int],
                 suppress_ids: Sequence[int]) -> list[int]:
    """-> the generated ids up to (not including) the first stop id."""
    torch = require_torch("reloading an export in transformers", "transformers")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=list(stop_ids), pad_token_id=int(stop_ids[0]),
                             suppress_tokens=list(suppress_ids))
    new = out[0, ids.shape[1]:].tolist()
    stop = next((i for i, t in enumerate(new) if t in set(stop_ids)), len(new))
    return new[:stop]


def diffusers_decode(vqmodel_dir: str, codes) -> np.ndarray:
    """Codes [n, h*w] -> images [n, H, W, C] (NHWC, about [-1, 1]) decoded by diffusers' VQModel."""
    torch = require_torch("decoding with diffusers", "diffusers")
    from diffusers import VQModel

    model = VQModel.from_pretrained(vqmodel_dir).eval()
    codes = torch.tensor(np.asarray(codes), dtype=torch.long)
    n, hw = codes.shape
    side = int(round(hw ** 0.5))
    with torch.no_grad():
        z = model.quantize.embedding(codes).reshape(n, side, side, -1).permute(0, 3, 1, 2)
        images = model.decode(z, force_not_quantize=True).sample
    return images.permute(0, 2, 3, 1).numpy()
