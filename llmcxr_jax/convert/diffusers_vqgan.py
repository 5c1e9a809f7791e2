"""diffusers VQModel directories <-> our Flax VQModel, via taming key names.

One table of renames (taming key pattern <-> diffusers key pattern) serves both directions;
attention projections are 1x1 convs in taming and Linear layers in diffusers, and diffusers
numbers decoder levels from the lowest resolution up.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from llmcxr_jax import user_files
from llmcxr_jax.convert import taming_vqgan
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.vqgan import VQGANConfig, VQModel

WEIGHTS = "diffusion_pytorch_model.safetensors"

# (taming regex, diffusers template) and (diffusers regex, taming template); {L} = num_levels - 1
RENAMES = [
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"encoder\.down\.(\d+)\.attn\.(\d+)\.", r"encoder.down_blocks.\1.attentions.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.{UP\1}.resnets.\2."),
    (r"decoder\.up\.(\d+)\.attn\.(\d+)\.", r"decoder.up_blocks.{UP\1}.attentions.\2."),
    (r"decoder\.up\.(\d+)\.upsample\.conv\.", r"decoder.up_blocks.{UP\1}.upsamplers.0.conv."),
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]
# leaf renames inside blocks: taming -> diffusers
LEAF_RENAMES = [(r"\.nin_shortcut\.", ".conv_shortcut."), (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
                (r"(attentions\.\d+)\.q\.", r"\1.to_q."), (r"(attentions\.\d+)\.k\.", r"\1.to_k."),
                (r"(attentions\.\d+)\.v\.", r"\1.to_v."), (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0.")]
ATTENTION_LINEAR = re.compile(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _flip_up(key: str, levels: int) -> str:
    return re.sub(r"\{UP(\d+)\}", lambda m: str(levels - 1 - int(m.group(1))), key)


def diffusers_key(taming: str, levels: int) -> str:
    key = taming
    for pattern, template in RENAMES:
        key = re.sub(pattern, template, key)
    for pattern, template in LEAF_RENAMES:
        key = re.sub(pattern, template, key)
    return _flip_up(key, levels)


def to_diffusers_state_dict(model: VQModel) -> dict[str, np.ndarray]:
    levels = model.cfg.num_levels
    out = {}
    for key, t in taming_vqgan.to_taming_state_dict(model).items():
        dkey = diffusers_key(key, levels)
        out[dkey] = t[:, :, 0, 0] if ATTENTION_LINEAR.search(dkey) else t
    return out


def from_diffusers_state_dict(sd: dict[str, np.ndarray], cfg: VQGANConfig) -> VQModel:
    names = {diffusers_key(k, cfg.num_levels): k for k in taming_vqgan.to_taming_state_dict_names(cfg)}
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    if missing:
        raise UsageError(f"diffusers VQModel weights lack {len(missing)} tensors the config needs, e.g. {missing[0]}")
    if extra:
        raise UsageError(f"diffusers VQModel weights have {len(extra)} tensors this config does not use, "
                         f"e.g. {extra[0]}")
    taming = {}
    for dkey, tkey in names.items():
        t = np.asarray(sd[dkey], np.float32)
        taming[tkey] = t[:, :, None, None] if ATTENTION_LINEAR.search(dkey) and t.ndim == 2 else t
    model, _ = taming_vqgan.from_taming_state_dict(taming, cfg)
    return model


def diffusers_config(cfg: VQGANConfig) -> dict:
    down = ["AttnDownEncoderBlock2D" if cfg.level_has_attention(i) else "DownEncoderBlock2D"
            for i in range(cfg.num_levels)]
    up = ["AttnUpDecoderBlock2D" if cfg.level_has_attention(i) else "UpDecoderBlock2D"
          for i in reversed(range(cfg.num_levels))]
    return {
        "_class_name": "VQModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": down, "up_block_types": up, "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.z_channels,
        "sample_size": cfg.resolution, "num_vq_embeddings": cfg.n_embed, "norm_num_groups": 32,
        "vq_embed_dim": cfg.embed_dim, "norm_type": "group", "mid_block_add_attention": True,
        "lookup_from_codebook": False, "force_upcast": False, "scaling_factor": 1.0,
    }


# config.json keys config_from_diffusers reads without a default
CONFIG_KEYS = ("block_out_channels", "sample_size", "down_block_types", "in_channels", "out_channels",
               "layers_per_block", "latent_channels", "num_vq_embeddings")


def config_from_diffusers(d: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> VQGANConfig:
    if d.get("_class_name", "VQModel") != "VQModel":
        raise UsageError(f"diffusers config describes {d.get('_class_name')!r}, not 'VQModel'")
    if d.get("norm_type", "group") != "group" or d.get("norm_num_groups", 32) != 32:
        raise UsageError("only VQModels with GroupNorm(32) (taming's architecture) are supported")
    out = list(d["block_out_channels"])
    ch = out[0]
    if any(c % ch for c in out):
        raise UsageError(f"block_out_channels {out} are not multiples of the first; not a taming layout")
    res = d["sample_size"]
    attn = tuple(res // 2 ** i for i, t in enumerate(d["down_block_types"]) if t.startswith("Attn"))
    return VQGANConfig(resolution=res, in_channels=d["in_channels"], out_channels=d["out_channels"], ch=ch,
                       ch_mult=tuple(c // ch for c in out), num_res_blocks=d["layers_per_block"],
                       attn_resolutions=attn, z_channels=d["latent_channels"],
                       embed_dim=d.get("vq_embed_dim") or d["latent_channels"], n_embed=d["num_vq_embeddings"],
                       beta=0.25, dropout=0.0, legacy_loss=True, dtype=dtype, param_dtype=param_dtype)


def export_diffusers(model: VQModel, out_dir: str) -> None:
    """A directory that diffusers.VQModel.from_pretrained loads."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in to_diffusers_state_dict(model).items()},
              os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(diffusers_config(model.cfg), f, indent=2)


def import_diffusers(directory: str, *, dtype: str = "float32", param_dtype: str = "float32") -> VQModel:
    cfg_path, weights = os.path.join(directory, "config.json"), os.path.join(directory, WEIGHTS)
    for path in (cfg_path, weights):
        if not os.path.isfile(path):
            raise MissingInputError(f"{directory} has no {os.path.basename(path)}; give a diffusers VQModel directory")
    raw = user_files.read_json_object(cfg_path, "diffusers config", CONFIG_KEYS)
    cfg = config_from_diffusers(raw, dtype=dtype, param_dtype=param_dtype)
    return from_diffusers_state_dict(user_files.load_safetensors(weights, "diffusers weights"), cfg)
