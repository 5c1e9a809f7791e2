"""One folder for PyTorch users: the LM as a transformers directory, its VQ-GAN in taming's layout (with
the YAML LLM-CXR's own scripts read) and as a diffusers VQModel, and a README that says how to load each,
how prompts and the vocabulary are laid out, and how to run LLM-CXR's demo on these files.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax

from llmcxr_jax.checkpoint import LoadedLM
from llmcxr_jax.convert import diffusers_vqgan, hf_gpt_neox, hf_model_card, taming_vqgan
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.vqgan import VQModel
from llmcxr_jax.vocab import END_KEY

HF, TAMING, DIFFUSERS, README = "hf", "taming", "diffusers", "README.md"
# What LLM-CXR's generate_interactive.py assumes: len(tokenizer) == 50281 (asserted), 256 image codes
# (asserted where images enter prompts), a 16 x 16 latent (its get_codebook_entry shape) and 256 px inputs.
DEMO_TEXT_SIZE, DEMO_LATENT, DEMO_RESOLUTION = 50281, 16, 256


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What write_bundle wrote (paths under `out`) and the vocabulary facts the README states."""

    out: str
    hf: str
    hf_files: tuple[str, ...]
    taming_config: str
    taming_ckpt: str
    diffusers: str
    readme: str
    text_size: int  # T
    image_codes: int  # K


def check_codebook(image_codes: int, codebook: int) -> None:
    """The LM's K image-token rows must be the VQ-GAN's codebook, code for code."""
    if image_codes != codebook:
        raise UsageError(f"the LM has K = {image_codes} image-token rows but the VQ-GAN's codebook has {codebook} "
                         "codes; give the VQ-GAN whose codes the LM was trained on")


def write_bundle(lm: LoadedLM, vqgan: VQModel, out: str, *, dtype: str = "float32", weights: str = "safetensors",
                 max_shard_bytes: int = 5 * 1024 ** 3, progress: Callable[[str], None] | None = None) -> Bundle:
    """Write OUT/hf (export_hf: `weights` and `dtype` as there), OUT/taming (configs/model.yaml,
    checkpoints/last.ckpt), OUT/diffusers and OUT/README.md. The LM's image codes must be the VQ-GAN's
    codebook; OUT must be new or empty. Every process must call it (export_hf gathers arrays)."""
    k = lm.layout.image_codes
    check_codebook(k, vqgan.cfg.n_embed)
    if os.path.isdir(out) and os.listdir(out):
        raise UsageError(f"--out {out} is not empty; give a new directory")
    hf_dir = os.path.join(out, HF)
    names = hf_gpt_neox.export_hf(lm.model, hf_dir, dtype=dtype, hf_config=lm.metadata.get("hf_config"),
                                  image_codes=k, tokenizer=lm.tokenizer, tokenizer_config=lm.tokenizer_config,
                                  special=lm.special, weights=weights, max_shard_bytes=max_shard_bytes,
                                  progress=progress)
    taming_dir, diffusers_dir = os.path.join(out, TAMING), os.path.join(out, DIFFUSERS)
    bundle = Bundle(out=out, hf=hf_dir, hf_files=tuple(names),
                    taming_config=os.path.join(taming_dir, taming_vqgan.LAYOUT_CONFIG),
                    taming_ckpt=os.path.join(taming_dir, taming_vqgan.LAYOUT_CKPT), diffusers=diffusers_dir,
                    readme=os.path.join(out, README), text_size=lm.layout.text_size, image_codes=k)
    if jax.process_index() != 0:
        return bundle
    taming_vqgan.export_taming(vqgan, taming_dir)
    diffusers_vqgan.export_diffusers(vqgan, diffusers_dir)
    with open(bundle.readme, "w") as f:
        f.write(readme(bundle, vqgan.cfg.latent_size, vqgan.cfg.resolution, has_tokenizer=lm.tokenizer is not None))
    return bundle


def readme(b: Bundle, latent: int, resolution: int, *, has_tokenizer: bool) -> str:
    """The bundle's README.md: paths relative to the bundle, facts from the checkpoints."""
    def rel(path: str) -> str:
        return os.path.relpath(path, b.out)

    t, k, n = b.text_size, b.image_codes, latent * latent
    hf_files = ", ".join(f"`{f}`" for f in b.hf_files)
    tokenizer = ("its tokenizer (`tokenizer.json`)" if has_tokenizer else
                 "no tokenizer (the checkpoint recorded none: give the one the LM was trained with)")
    demo_ok = (t, latent, resolution) == (DEMO_TEXT_SIZE, DEMO_LATENT, DEMO_RESOLUTION)
    demo_note = (f"The demo assumes T = {DEMO_TEXT_SIZE} (it asserts `len(tokenizer) == {DEMO_TEXT_SIZE}`),\n"
                 f"{DEMO_LATENT * DEMO_LATENT} codes per image on a {DEMO_LATENT} x {DEMO_LATENT} latent and "
                 f"{DEMO_RESOLUTION} px images; " +
                 ("these files match." if demo_ok else
                  f"these files have T = {t},\n{n} codes on {latent} x {latent} and {resolution} px, so it "
                  "stops on them as they are."))
    return f"""# LLM-CXR model for PyTorch, exported by llmcxr-jax

`llmcxr export` wrote this folder: one GPT-NeoX language model and the VQ-GAN whose codes it reads and writes.
Paths are relative to this folder.

| path | what | load with |
| --- | --- | --- |
| `{HF}/` | the LM: {hf_files}, `config.json`, `generation_config.json`, {tokenizer}, \
a model card (`{HF}/README.md`) | transformers |
| `{rel(b.taming_config)}` | the VQ-GAN's taming model YAML (`VQModel`, with taming's DummyLoss) | OmegaConf + taming |
| `{rel(b.taming_ckpt)}` | the VQ-GAN's weights, `{{"state_dict": ...}}` with taming key names | `torch.load` |
| `{DIFFUSERS}/` | the same VQ-GAN as a diffusers `VQModel` (`config.json`, `{diffusers_vqgan.WEIGHTS}`) | diffusers |

## Vocabulary

Ids 0 .. {t - 1} are text tokens (T = {t} = `len(tokenizer)`); ids {t} .. {t + k - 1} are the K = {k} VQ-GAN codes
(code c is id T + c = {t} + c). An image is {latent} x {latent} = {n} codes in row-major order of the latent grid,
from a {resolution} x {resolution} RGB image scaled to [-1, 1].

## Prompt format

Dolly-style text, byte for byte (without an input, leave out the `Input:` line and the blank line after it;
a generation prompt ends right after `### Response:` and its newline, and the model ends its answer with
`{END_KEY}`):

```
{hf_model_card.template()}
```

An image in a prompt is the text `{hf_model_card.IMAGE_MARKER}`, whose middle token (`image`) is replaced by
the image's {n} tokens, so the image sits between `<` and `>`. `{HF}/README.md` shows whole examples.

## Loading

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

lm = AutoModelForCausalLM.from_pretrained("{HF}").eval()
tokenizer = AutoTokenizer.from_pretrained("{HF}")
```

```python
import torch
from diffusers import VQModel

vq = VQModel.from_pretrained("{DIFFUSERS}").eval()
codes = torch.tensor(image_ids) - {t}  # the {n} image ids of a response, minus T
z = vq.quantize.embedding(codes).reshape(1, {latent}, {latent}, -1).permute(0, 3, 1, 2)
pixels = vq.decode(z, force_not_quantize=True).sample  # [1, 3, {resolution}, {resolution}], about [-1, 1]
```

```python
import torch
from omegaconf import OmegaConf
from taming.models.vqgan import VQModel

config = OmegaConf.load("{rel(b.taming_config)}")
vq = VQModel(**config.model.params).eval()
vq.load_state_dict(torch.load("{rel(b.taming_ckpt)}", map_location="cpu")["state_dict"], strict=True)
_, _, (_, _, codes) = vq.encode(image)  # image: [1, 3, {resolution}, {resolution}] in [-1, 1]; codes: [{n}]
pixels = vq.decode(vq.quantize.get_codebook_entry(codes, shape=(1, {latent}, {latent}, -1)))
```

## LLM-CXR's own demo

LLM-CXR's `generate_interactive.py` takes three arguments: the model path, the VQ-GAN YAML and the VQ-GAN
checkpoint. From a clone of its code, with BUNDLE set to this folder:

```
python generate_interactive.py "$BUNDLE/{HF}" "$BUNDLE/{rel(b.taming_config)}" "$BUNDLE/{rel(b.taming_ckpt)}"
```

{demo_note}

The LM's weights here are {hf_files}; for a transformers without safetensors support, export again with
`--weights bin`.
"""
