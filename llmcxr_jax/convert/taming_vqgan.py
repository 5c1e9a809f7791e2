"""taming-transformers / LLM-CXR VQ-GAN checkpoints and model YAMLs <-> our Flax VQModel.

Our attribute paths ARE taming's key names, so the table is a rename of leaf names plus the
conv layout change (torch [out, in, kh, kw] <-> ours [kh, kw, in, out]). Lightning .ckpt files
are read by convert/torch_files.py, which never runs anything in the file. Exports use taming's
log layout (DIR/configs/model.yaml + DIR/checkpoints/last.ckpt) or FILE.ckpt with FILE.yaml beside it.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax.convert.torch_files import read_torch_state_dict, require_torch
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.dtypes import DTYPES
from llmcxr_jax.models.vqgan import VQGANConfig, VQModel, abstract_vqgan

# our leaf name -> (taming leaf name, torch-layout transform, inverse)
LEAVES = {
    "kernel": ("weight", lambda a: a.transpose(3, 2, 0, 1), lambda t: t.transpose(2, 3, 1, 0)),
    "scale": ("weight", lambda a: a, lambda t: t),
    "bias": ("bias", lambda a: a, lambda t: t),
    "embedding": ("embedding.weight", lambda a: a, lambda t: t),
}
# taming checkpoints carry the training loss (discriminator, LPIPS) under this prefix
LOSS_PREFIX = "loss."
# what a taming YAML names; DummyLoss has no parameters and downloads nothing (LPIPS would fetch VGG16)
VQMODEL_TARGET = "taming.models.vqgan.VQModel"
DUMMY_LOSS_TARGET = "taming.modules.losses.vqperceptual.DummyLoss"
# taming's log-folder layout (main.py writes configs/*-project.yaml and checkpoints/last.ckpt)
LAYOUT_CONFIG = os.path.join("configs", "model.yaml")
LAYOUT_CKPT = os.path.join("checkpoints", "last.ckpt")


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """{"encoder.down.0.block.1.conv1.kernel": array, ...} of a model's Params."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[".".join(str(p) for p in path)] = var.get_value()
    return out


def load_flat_params(model: nnx.Module, flat: dict[str, Any]) -> nnx.Module:
    """Write {path: array} into a (possibly abstract) model and return a concrete one."""
    graphdef, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(flat[".".join(str(p) for p in path)])
    return nnx.merge(graphdef, state)


def taming_key(path: str) -> str:
    head, leaf = path.rsplit(".", 1)
    if path == "quantize.embedding":
        return "quantize.embedding.weight"
    return f"{head}.{LEAVES[leaf][0]}"


def to_taming_state_dict_names(cfg: VQGANConfig) -> list[str]:
    """The taming keys a model of this config has (no arrays allocated)."""
    return [taming_key(p) for p in flat_params(abstract_vqgan(cfg))]


def to_taming_state_dict(model: VQModel) -> dict[str, np.ndarray]:
    """Our params -> taming VQModel state dict (numpy, torch layout, float32)."""
    out = {}
    for path, value in flat_params(model).items():
        leaf = path.rsplit(".", 1)[1]
        out[taming_key(path)] = np.ascontiguousarray(LEAVES[leaf][1](np.asarray(value, np.float32)))
    return out


def from_taming_state_dict(state_dict: dict[str, np.ndarray], cfg: VQGANConfig) -> tuple[VQModel, list[str]]:
    """taming state dict -> our model; loss.* keys are returned as ignored. Missing, extra or
    misshapen tensors are one-line errors."""
    abstract = abstract_vqgan(cfg)
    ignored = sorted(k for k in state_dict if k.startswith(LOSS_PREFIX))
    wanted = {taming_key(p): p for p in flat_params(abstract)}
    model_keys = set(state_dict) - set(ignored)
    missing = sorted(set(wanted) - model_keys)
    extra = sorted(model_keys - set(wanted))
    if missing:
        raise UsageError(f"VQ-GAN checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]}")
    if extra:
        raise UsageError(f"VQ-GAN checkpoint has {len(extra)} tensors this config does not use, e.g. {extra[0]}")
    shapes = {p: v.shape for p, v in flat_params(abstract).items()}
    flat = {}
    for key, path in wanted.items():
        leaf = path.rsplit(".", 1)[1]
        a = LEAVES[leaf][2](np.asarray(state_dict[key], np.float32))
        if a.shape != shapes[path]:
            raise UsageError(f"tensor {key} has shape {tuple(np.shape(state_dict[key]))}, "
                             f"the config implies {LEAVES[leaf][1](np.zeros(shapes[path])).shape}")
        flat[path] = jnp.asarray(a, DTYPES[cfg.param_dtype])
    return load_flat_params(abstract, flat), ignored


def config_from_state_dict(sd: dict[str, Any], *, resolution: int, dtype: str = "float32",
                           param_dtype: str = "float32") -> VQGANConfig:
    """Architecture from tensor shapes and key names (resolution is not stored in the weights)."""
    def shape(key):
        if key not in sd:
            raise UsageError(f"VQ-GAN checkpoint lacks {key}; is it a taming VQModel state dict?")
        return tuple(np.shape(sd[key]))

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    blocks = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m})
    if not levels or not blocks:
        raise UsageError("VQ-GAN checkpoint has no encoder.down.* blocks; is it a taming VQModel state dict?")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels)
    attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
    z_channels = shape("encoder.conv_out.weight")[0]
    if shape("decoder.conv_in.weight")[1] != z_channels:
        raise UsageError("encoder.conv_out and decoder.conv_in disagree on z_channels (double_z checkpoints "
                         "are KL autoencoders, not VQ-GANs)")
    n_embed, embed_dim = shape("quantize.embedding.weight")
    return VQGANConfig(resolution=resolution, in_channels=in_channels, out_channels=shape("decoder.conv_out.weight")[0],
                       ch=ch, ch_mult=ch_mult, num_res_blocks=len(blocks), attn_resolutions=attn,
                       z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed, beta=0.25, dropout=0.0,
                       legacy_loss=True, dtype=dtype, param_dtype=param_dtype)


DDCONFIG_KEYS = ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                 "z_channels")  # what config_from_yaml reads from model.params.ddconfig


def _read_yaml(path: str) -> Any:
    """A YAML file (safe_load: data only); malformed YAML is one line naming the file and the place."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise UsageError(f"taming config {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"taming config {path} is not valid YAML{where}: "
                         f"{getattr(e, 'problem', None) or e}") from None


def config_from_yaml(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> VQGANConfig:
    """A taming model YAML (model.params.ddconfig, n_embed, embed_dim)."""
    if not os.path.isfile(path):
        raise MissingInputError(f"taming config {path} does not exist")
    doc = _read_yaml(path)
    try:
        params = doc["model"]["params"]
        dd = params["ddconfig"]
    except (KeyError, TypeError):
        raise UsageError(f"{path} has no model.params.ddconfig; give a taming VQGAN YAML") from None
    missing = [f"ddconfig.{k}" for k in DDCONFIG_KEYS if k not in dd] + \
        [f"params.{k}" for k in ("embed_dim", "n_embed") if k not in params]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; give a taming VQGAN YAML")
    if dd.get("double_z", False):
        raise UsageError(f"{path} has double_z: true, a KL autoencoder, not a VQ-GAN")
    return VQGANConfig(resolution=dd["resolution"], in_channels=dd["in_channels"], out_channels=dd["out_ch"],
                       ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                       attn_resolutions=tuple(dd["attn_resolutions"]), z_channels=dd["z_channels"],
                       embed_dim=params["embed_dim"], n_embed=params["n_embed"], beta=0.25,
                       dropout=float(dd.get("dropout", 0.0)), legacy_loss=True, dtype=dtype,
                       param_dtype=param_dtype)  # taming's VQModel fixes beta at 0.25


def read_ckpt(path: str) -> dict[str, np.ndarray]:
    """A Lightning .ckpt ({"state_dict": ...}) or a bare state dict -> {key: float32 numpy}. Real
    Lightning 1.x files read as they are: callbacks keyed by class, hyper-parameters and optimizer
    states holding objects of pytorch_lightning / omegaconf become inert stand-ins (never imported)
    and are dropped; a file whose pickle would call code is refused (torch_files.read_torch_file)."""
    return read_torch_state_dict(path, what="taming checkpoint")


def write_ckpt(model: VQModel, path: str, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write {"state_dict": ...} that taming's VQModel loads (strict, minus its loss.* keys)."""
    torch = require_torch(f"writing taming checkpoint {path}")

    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_taming_state_dict(model).items()}
    sd.update({k: torch.from_numpy(np.array(v)) for k, v in (extra or {}).items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"state_dict": sd}, path)


def taming_config(cfg: VQGANConfig) -> dict[str, Any]:
    """The taming YAML document for this architecture: `VQModel(**doc["model"]["params"])` builds it.
    Training-only settings have no place in it: taming fixes beta at 0.25, DummyLoss stands in for the
    loss, dtypes are ours; encoding and decoding do not depend on them."""
    ddconfig = {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
                "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
                "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": list(cfg.attn_resolutions),
                "dropout": float(cfg.dropout)}
    return {"model": {"target": VQMODEL_TARGET,
                      "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": ddconfig,
                                 "lossconfig": {"target": DUMMY_LOSS_TARGET}}}}


def write_yaml(cfg: VQGANConfig, path: str) -> None:
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(taming_config(cfg), f, sort_keys=False, default_flow_style=None)


@dataclasses.dataclass(frozen=True)
class TamingFiles:
    """Where a taming VQ-GAN lives: its Lightning-style .ckpt and (when known) its model YAML."""

    ckpt: str
    config: str | None


def export_taming(model: VQModel, out: str) -> TamingFiles:
    """FILE.ckpt -> FILE.ckpt + FILE.yaml; any other path is a folder in taming's log layout
    (configs/model.yaml, checkpoints/last.ckpt)."""
    if out.endswith(".ckpt"):
        files = TamingFiles(ckpt=out, config=out[:-len(".ckpt")] + ".yaml")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give FILE.ckpt or a folder for the taming layout")
    else:
        files = TamingFiles(ckpt=os.path.join(out, LAYOUT_CKPT), config=os.path.join(out, LAYOUT_CONFIG))
    write_ckpt(model, files.ckpt)
    write_yaml(model.cfg, files.config)
    return files


def find_taming_files(path: str, config: str | None = None) -> TamingFiles:
    """A taming source as import-vqgan takes it: a folder in taming's log layout (checkpoints/last.ckpt,
    the one configs/*.yaml with a model section), or a .ckpt file with FILE.yaml beside it if present.
    A `config` given explicitly replaces the one found."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise MissingInputError(f"taming checkpoint {path} does not exist")
        beside = os.path.splitext(path)[0] + ".yaml"
        return TamingFiles(ckpt=path, config=config or (beside if os.path.isfile(beside) else None))
    ckpt = os.path.join(path, LAYOUT_CKPT)
    if not os.path.isfile(ckpt):
        raise MissingInputError(f"{path} has no {LAYOUT_CKPT}; give a taming log folder or a .ckpt file")
    if config:
        return TamingFiles(ckpt=ckpt, config=config)
    models = []
    for candidate in sorted(glob.glob(os.path.join(path, "configs", "*.yaml"))):
        doc = _read_yaml(candidate)
        if isinstance(doc, dict) and isinstance(doc.get("model"), dict):  # *-lightning.yaml has none
            models.append(candidate)
    if len(models) > 1:
        raise UsageError(f"{path}/configs has {len(models)} model YAMLs ({', '.join(map(os.path.basename, models))}); "
                         "choose one with --taming-config")
    if not models:
        raise MissingInputError(f"{path}/configs has no model YAML; give one with --taming-config")
    return TamingFiles(ckpt=ckpt, config=models[0])
