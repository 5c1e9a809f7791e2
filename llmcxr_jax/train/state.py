"""Where an LM run starts and its train state {"params", "opt", "step"}: the resume order (start_source),
and the state created already sharded (eval_shape, then a jit whose out_shardings place every leaf).
No dropout in GPT-NeoX/Dolly, so the step needs no RNG.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax import checkpoint, sharding, storage, vocab
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.gpt_neox import ATTENTION_KEYS, GPTNeoXConfig, abstract_model, init_model
from llmcxr_jax.train import optim
from llmcxr_jax.vocab import SpecialTokens, VocabLayout


@dataclasses.dataclass
class Start:
    """What a run starts from: model shape, vocabulary, tokenizer, and initial params (or None)."""

    config: GPTNeoXConfig
    layout: VocabLayout
    tokenizer: Any
    special: SpecialTokens
    tokenizer_config: dict
    params: Any | None  # sharded pure dict when loaded from init_from; None = initialise or resume
    source: str  # "scratch" | "hf:DIR" | "checkpoint:DIR" | a resumed run's own source
    hf_config: dict | None = None
    resume_dir: str | None = None  # checkpoints/ of a run whose latest train state (and data position) to restore


def start_source(config: ml_collections.ConfigDict, ckpt_dir: str) -> tuple[str, str | None]:
    """Where this run starts, as (kind, checkpoint directory): decided, and a train.resume_from without
    checkpoints refused, before the workdir is claimed. ckpt_dir is the run's own WORKDIR/checkpoints."""
    t = config.train
    # 1. always resume an existing checkpoint of this workdir (a restarted or preempted run): state and data position
    # 2. else train.resume_from: continue another workdir's run from its latest checkpoint, state and data position
    # 3. else train.init_from: new optimizer state on the weights of a HF GPT-NeoX directory or an orbax LM
    #    checkpoint (import-hf output, or a train workdir, as stage 2 starts from stage 1)
    # 4. train from scratch with the configured shape and data.tokenizer
    if checkpoint.has_checkpoint(ckpt_dir):
        return "run", ckpt_dir
    elif t.resume_from:
        resume_dir = os.path.join(t.resume_from, "checkpoints")
        if not checkpoint.has_checkpoint(resume_dir):
            raise MissingInputError(f"train.resume_from {t.resume_from} holds no checkpoints/ of a run")
        return "run", resume_dir
    elif t.init_from:
        return "init", None
    else:
        return "scratch", None


def resolve_start(config: ml_collections.ConfigDict, mesh: Mesh, image_codes: int,
                  source: tuple[str, str | None]) -> Start:
    """The model shape, vocabulary and tokenizer (and, for init_from, the weights) of `start_source`'s choice."""
    kind, directory = source
    if kind == "run":
        start = _from_run(config, directory)
    else:
        start = _from_init(config, mesh, image_codes) if kind == "init" else _from_scratch(config, mesh, image_codes)
    # the attention kernel is how this run computes, not part of the weights: this run's model config decides
    kernel = {key: config.model[key] for key in ATTENTION_KEYS}
    return dataclasses.replace(start, config=start.config.replace(**kernel))


def _from_run(config: ml_collections.ConfigDict, ckpt_dir: str) -> Start:
    """Shape, vocabulary and tokenizer of a run being resumed (its params come with the state)."""
    m = config.model
    meta = checkpoint.read_lm_metadata(ckpt_dir, dtype=m.dtype, remat_policy=m.remat_policy)
    if meta.tokenizer is None:
        raise MissingInputError(f"{os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR)} has no tokenizer.json; a "
                                "training run saves its tokenizer there")
    return Start(meta.config, meta.layout, meta.tokenizer, meta.tokenizer_special, meta.tokenizer_config, None,
                 meta.metadata.get("source", "run"), meta.metadata.get("hf_config"), resume_dir=ckpt_dir)


def _tokenizer(directory: str):
    if not directory:
        raise UsageError("no tokenizer: set data.tokenizer to a HF tokenizer directory, or train.init_from to a "
                         "HF directory / checkpoint that holds one")
    if not vocab.has_tokenizer(directory):
        raise MissingInputError(f"{directory} has no tokenizer.json; give a HF fast-tokenizer directory")
    return vocab.load_tokenizer(directory)


def _from_init(config: ml_collections.ConfigDict, mesh: Mesh, image_codes: int) -> Start:
    """train.init_from: a HF GPT-NeoX directory or an orbax LM checkpoint (or a train workdir)."""
    t, d, m = config.train, config.data, config.model
    source = t.init_from
    runtime = dict(dtype=m.dtype, remat_policy=m.remat_policy, scan_layers=m.scan_layers)
    where = storage.path(source)  # an orbax checkpoint may be in a bucket (gs://); a HF directory is local
    if not where.exists():
        raise MissingInputError(f"train.init_from {source} does not exist; give a HF GPT-NeoX directory or an "
                                "orbax LM checkpoint (import-hf output or a train workdir)")
    ckpt_dir = checkpoint.model_dir(source, "lm")  # a train workdir stands for its checkpoints/
    if (where / "config.json").is_file() and not (where / "checkpoints").is_dir() \
            and not checkpoint.has_checkpoint(ckpt_dir):
        return _from_hf(config, mesh, image_codes, runtime)
    lm = checkpoint.load_lm(ckpt_dir, mesh, dtype=m.dtype, remat_policy=m.remat_policy)
    if lm.config.scan_layers != m.scan_layers:
        raise UsageError(f"{source} stores layers with scan_layers={lm.config.scan_layers}; set "
                         f"model.scan_layers={lm.config.scan_layers}")
    if lm.layout.image_codes != image_codes:
        raise UsageError(f"{source} has {lm.layout.image_codes} image rows but the codes use a codebook of "
                         f"{image_codes}; encode with the matching VQ-GAN")
    tok, special, tok_cfg = _tokenizer(d.tokenizer or os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR))
    _check_text_size(tok, lm.layout, source)
    params = nnx.state(lm.model, nnx.Param).to_pure_dict()
    return Start(lm.config, lm.layout, tok, special, tok_cfg, params, f"checkpoint:{source}",
                 lm.metadata.get("hf_config"))


def _from_scratch(config: ml_collections.ConfigDict, mesh: Mesh, image_codes: int) -> Start:
    """The configured model shape over data.tokenizer's vocabulary plus the image codes."""
    tok, special, tok_cfg = _tokenizer(config.data.tokenizer)
    layout = VocabLayout.create(vocab.text_size(tok), image_codes, mesh.shape["tensor"])
    return Start(GPTNeoXConfig.from_config(config.model, layout), layout, tok, special, tok_cfg, None, "scratch")


def _from_hf(config, mesh, image_codes, runtime) -> Start:
    from llmcxr_jax.convert import hf_gpt_neox

    t, d, m = config.train, config.data, config.model
    imp = hf_gpt_neox.import_hf(t.init_from, image_codes, mesh=mesh, new_rows=t.new_rows, seed=t.seed,
                                dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                                remat_policy=m.remat_policy)
    tok, special, tok_cfg = (_tokenizer(d.tokenizer) if d.tokenizer else
                             (imp.tokenizer, imp.special, imp.tokenizer_config))
    if tok is None:
        raise UsageError(f"{t.init_from} has no tokenizer.json; set data.tokenizer")
    _check_text_size(tok, imp.layout, t.init_from)
    params = nnx.state(imp.model, nnx.Param).to_pure_dict()
    return Start(imp.config, imp.layout, tok, special, tok_cfg, params, f"hf:{t.init_from}", imp.hf_config)


def _check_text_size(tok, layout: VocabLayout, where: str) -> None:
    if vocab.text_size(tok) != layout.text_size:
        raise UsageError(f"the tokenizer has {vocab.text_size(tok)} tokens but {where} has T = {layout.text_size} "
                         "text rows; use the tokenizer saved with that model")


def param_shardings(cfg: GPTNeoXConfig, mesh: Mesh) -> Any:
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sharding.param_shardings(state, mesh).to_pure_dict()


def abstract_params(cfg: GPTNeoXConfig) -> Any:
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict())


def opt_state_shardings(abstract_opt: Any, params_sh: Any, mesh: Mesh) -> Any:
    """Optimizer leaves that mirror a parameter (Adam's mu and nu) take its sharding; the rest
    (counts, scalars, masks) are replicated."""
    by_path = {optim.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sh)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        for n in range(len(path)):
            sub = optim.path_name(path[n:])
            if sub in by_path and by_path[sub].shard_shape(leaf.shape) is not None:
                return by_path[sub]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(cfg: GPTNeoXConfig, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[Any, Any]:
    """-> (abstract state with shardings, sharding tree)."""
    params_sh = param_shardings(cfg, mesh)
    abstract = abstract_params(cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    sh = {"params": params_sh, "opt": opt_state_shardings(abstract_opt, params_sh, mesh),
          "step": NamedSharding(mesh, PartitionSpec())}
    shapes = {"params": abstract, "opt": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)
    return with_sh, sh


def create_state(start: Start, tx: optax.GradientTransformation, mesh: Mesh, seed: int) -> dict[str, Any]:
    """Initial state placed by the sharding tree: params from `start` or a jitted init."""
    _, sh = state_shardings(start.config, tx, mesh)
    cfg = start.config

    def init(params):
        if params is None:
            params = nnx.state(init_model(cfg, seed), nnx.Param).to_pure_dict()
        return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if start.params is None:
        return jax.jit(lambda: init(None), out_shardings=sh)()
    return jax.jit(init, in_shardings=(sh["params"],), out_shardings=sh, donate_argnums=(0,))(start.params)
