"""HF transformers GPT-NeoX <-> our Flax GPT-NeoX, through one table used in both directions.

Import reads a HF directory tensor by tensor (safetensors, sharded safetensors, or
pytorch_model.bin) and places each tensor on the mesh, extending the vocabulary by K image
rows as HF resize_token_embeddings(T + K) would. Export writes config.json, (sharded)
model.safetensors and / or pytorch_model.bin, and the tokenizer, in forms that transformers 4.28 and
tokenizers 0.13 (LLM-CXR's pins) through today's read, with the table padding sliced off, plus
generation_config.json and a model card (convert/hf_model_card.py). The weight files themselves are
read and written by convert/weight_files.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llmcxr_jax import sharding, user_files, vocab
from llmcxr_jax.convert import hf_model_card, weight_files
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM, abstract_model
from llmcxr_jax.vocab import SpecialTokens, VocabLayout

Shape = Callable[[GPTNeoXConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: Flax path (per layer for 'layers.{i}.'), HF key, and how the layout differs.

    to Flax: (transpose if asked) then reshape to flax_shape; to HF: the inverse.
    vocab rows (embeddings and head) are resized to T + K and padded to the stored table size.
    """

    flax: str
    hf: str
    flax_shape: Shape
    hf_shape: Shape
    transpose: bool = False
    vocab_rows: bool = False
    needs_bias: bool = False  # present only when config.attention_bias
    hf_aliases: tuple[str, ...] = ()

    def per_layer(self) -> bool:
        return "{i}" in self.flax


def _e(c): return c.hidden_size
def _rows(c): return c.padded_vocab_size


RULES: tuple[Rule, ...] = (
    Rule("embed_in.embedding", "gpt_neox.embed_in.weight",
         lambda c: (_rows(c), _e(c)), lambda c: (c.vocab_size, _e(c)), vocab_rows=True),
    Rule("embed_out.kernel", "embed_out.weight",
         lambda c: (_e(c), _rows(c)), lambda c: (c.vocab_size, _e(c)), transpose=True, vocab_rows=True,
         hf_aliases=("lm_head.weight",)),
    Rule("final_layer_norm.scale", "gpt_neox.final_layer_norm.weight", lambda c: (_e(c),), lambda c: (_e(c),)),
    Rule("final_layer_norm.bias", "gpt_neox.final_layer_norm.bias", lambda c: (_e(c),), lambda c: (_e(c),)),
    Rule("layers.{i}.input_layernorm.scale", "gpt_neox.layers.{i}.input_layernorm.weight",
         lambda c: (_e(c),), lambda c: (_e(c),)),
    Rule("layers.{i}.input_layernorm.bias", "gpt_neox.layers.{i}.input_layernorm.bias",
         lambda c: (_e(c),), lambda c: (_e(c),)),
    Rule("layers.{i}.post_attention_layernorm.scale", "gpt_neox.layers.{i}.post_attention_layernorm.weight",
         lambda c: (_e(c),), lambda c: (_e(c),)),
    Rule("layers.{i}.post_attention_layernorm.bias", "gpt_neox.layers.{i}.post_attention_layernorm.bias",
         lambda c: (_e(c),), lambda c: (_e(c),)),
    # HF's fused rows are ordered (head, q/k/v, head_dim): a plain reshape recovers the heads.
    Rule("layers.{i}.attention.query_key_value.kernel", "gpt_neox.layers.{i}.attention.query_key_value.weight",
         lambda c: (_e(c), c.num_heads, 3, c.head_dim), lambda c: (3 * _e(c), _e(c)), transpose=True),
    Rule("layers.{i}.attention.query_key_value.bias", "gpt_neox.layers.{i}.attention.query_key_value.bias",
         lambda c: (c.num_heads, 3, c.head_dim), lambda c: (3 * _e(c),), needs_bias=True),
    Rule("layers.{i}.attention.dense.kernel", "gpt_neox.layers.{i}.attention.dense.weight",
         lambda c: (c.num_heads, c.head_dim, _e(c)), lambda c: (_e(c), _e(c)), transpose=True),
    Rule("layers.{i}.attention.dense.bias", "gpt_neox.layers.{i}.attention.dense.bias",
         lambda c: (_e(c),), lambda c: (_e(c),), needs_bias=True),
    Rule("layers.{i}.mlp.dense_h_to_4h.kernel", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
         lambda c: (_e(c), c.intermediate_size), lambda c: (c.intermediate_size, _e(c)), transpose=True),
    Rule("layers.{i}.mlp.dense_h_to_4h.bias", "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias",
         lambda c: (c.intermediate_size,), lambda c: (c.intermediate_size,)),
    Rule("layers.{i}.mlp.dense_4h_to_h.kernel", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
         lambda c: (c.intermediate_size, _e(c)), lambda c: (_e(c), c.intermediate_size), transpose=True),
    Rule("layers.{i}.mlp.dense_4h_to_h.bias", "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias",
         lambda c: (_e(c),), lambda c: (_e(c),)),
)


def active_rules(cfg: GPTNeoXConfig) -> list[Rule]:
    return [r for r in RULES if cfg.attention_bias or not r.needs_bias]


def expand(cfg: GPTNeoXConfig) -> Iterator[tuple[Rule, int | None, str, str]]:
    """(rule, layer, flax path, hf key) for every tensor of this config."""
    for rule in active_rules(cfg):
        layers = range(cfg.num_layers) if rule.per_layer() else [None]
        for i in layers:
            yield rule, i, rule.flax.format(i=i), rule.hf.format(i=i)


def count_tensors(config: GPTNeoXConfig | dict[str, Any]) -> int:
    """Tensors in a checkpoint of this model config (ours, or a HF config.json dict)."""
    if isinstance(config, dict):
        layers, bias = config["num_hidden_layers"], config.get("attention_bias", True)
    else:
        layers, bias = config.num_layers, config.attention_bias
    rules = [r for r in RULES if bias or not r.needs_bias]
    return sum(layers if r.per_layer() else 1 for r in rules)


def hf_to_flax(rule: Rule, cfg: GPTNeoXConfig, t: np.ndarray) -> np.ndarray:
    """One HF tensor (vocab rows already resized to T + K) -> Flax layout (rows padded)."""
    if rule.vocab_rows:
        t = np.concatenate([t, np.zeros((cfg.padded_vocab_size - t.shape[0],) + t.shape[1:], t.dtype)])
    if rule.transpose:
        t = t.T
    return t.reshape(rule.flax_shape(cfg))


def flax_to_hf(rule: Rule, cfg: GPTNeoXConfig, a: np.ndarray) -> np.ndarray:
    """One Flax tensor -> HF layout with the padded rows sliced off."""
    hf = rule.hf_shape(cfg)
    if rule.vocab_rows:
        hf = (cfg.padded_vocab_size,) + hf[1:]
    a = a.reshape(hf[::-1]).T if rule.transpose else a.reshape(hf)
    return a[: cfg.vocab_size] if rule.vocab_rows else a


# ---------------------------------------------------------------- reading HF directories


HF_CONFIG_NUMBERS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "layer_norm_eps")  # config.json keys the import cannot do without


def read_hf_config(directory: str) -> dict[str, Any]:
    if not os.path.isdir(directory):
        raise MissingInputError(f"HF model directory {directory} does not exist")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise MissingInputError(f"{directory} has no config.json; give a HF GPT-NeoX directory")
    hf = user_files.read_json_object(path, "HF config")
    if hf.get("model_type") != "gpt_neox":
        raise UsageError(f"{path} describes model_type {hf.get('model_type')!r}, not 'gpt_neox'")
    bad = [k for k in HF_CONFIG_NUMBERS if type(hf.get(k)) not in (int, float)]
    if bad:
        raise UsageError(f"{path} gives no number for {', '.join(bad)}; give a GPT-NeoX config.json")
    return hf


def rotary_from_hf(hf: dict[str, Any]) -> tuple[float, float]:
    """(rotary_pct, rotary_base) from transformers 5 rope_parameters or 4.x rotary_pct/rotary_emb_base."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UsageError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported; only default RoPE")
    pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))  # HF's defaults when absent
    base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    return float(pct), float(base)


def model_config_from_hf(hf: dict[str, Any], layout: VocabLayout, *, dtype: str, param_dtype: str,
                         scan_layers: bool, remat_policy: str) -> GPTNeoXConfig:
    pct, base = rotary_from_hf(hf)
    return GPTNeoXConfig(
        vocab_size=layout.size, padded_vocab_size=layout.padded_size, hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], rotary_pct=pct, rotary_base=base,
        max_position_embeddings=hf["max_position_embeddings"], layer_norm_eps=hf["layer_norm_eps"],
        use_parallel_residual=hf.get("use_parallel_residual", True), attention_bias=hf.get("attention_bias", True),
        hidden_act=hf.get("hidden_act", "gelu"), initializer_range=hf.get("initializer_range", 0.02),
        dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy)


# config.json key of an export that records K, the image-token rows after the text rows: import-hf
# reads it back (a plain HF model cannot tell image rows from padding rows). transformers keeps it as
# an attribute of the config.
IMAGE_CODES_KEY = "llmcxr_image_codes"


def hf_config_from_model(cfg: GPTNeoXConfig, base: dict[str, Any] | None, dtype: str,
                         image_codes: int = 0) -> dict[str, Any]:
    """config.json for an export; readable by transformers 4.x and 5.x."""
    hf = dict(base or {})
    # The source's own bookkeeping does not describe the export: transformers writes its version,
    # a pipeline file named by custom_pipelines is not exported, and use_cache false is a leftover
    # of training with gradient checkpointing (a reloaded model would decode without a KV cache).
    for k in ("rope_scaling", "_name_or_path", "torch_dtype", IMAGE_CODES_KEY, "transformers_version",
              "custom_pipelines"):
        hf.pop(k, None)
    hf["use_cache"] = True
    if image_codes:
        hf[IMAGE_CODES_KEY] = int(image_codes)
    hf.update({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_pct},
        "max_position_embeddings": cfg.max_position_embeddings, "layer_norm_eps": cfg.layer_norm_eps,
        "use_parallel_residual": cfg.use_parallel_residual, "attention_bias": cfg.attention_bias,
        "initializer_range": cfg.initializer_range, "tie_word_embeddings": False, "dtype": dtype,
    })
    return hf


# ---------------------------------------------------------------- import


@dataclasses.dataclass
class ImportedLM:
    model: GPTNeoXForCausalLM
    config: GPTNeoXConfig
    layout: VocabLayout
    special: SpecialTokens | None
    tokenizer: Any  # tokenizers.Tokenizer or None
    tokenizer_config: dict[str, Any] | None
    hf_config: dict[str, Any]


NEW_ROW_INITS = ("normal", "mean")


def resize_vocab_rows(old: np.ndarray, rows: int, init: str, std: float, rng: np.random.Generator) -> np.ndarray:
    """HF resize_token_embeddings(rows): keep the first min(old, rows) rows, initialise the rest."""
    if init not in NEW_ROW_INITS:
        raise UsageError(f"new-row init {init!r} is not one of {NEW_ROW_INITS}")
    keep = min(old.shape[0], rows)
    extra = rows - keep
    if extra == 0:
        return old[:rows]
    if init == "normal":
        new = rng.normal(0.0, std, size=(extra, old.shape[1])).astype(np.float32)
    else:
        new = np.broadcast_to(old.astype(np.float64).mean(0), (extra, old.shape[1])).astype(np.float32)
    return np.concatenate([old[:keep].astype(np.float32), new])


def import_hf(directory: str, image_codes: int, *, mesh: Mesh, new_rows: str = "normal", seed: int = 0,
              dtype: str = "bfloat16", param_dtype: str = "float32", scan_layers: bool = False,
              remat_policy: str = "none", progress: Callable[[str], None] | None = None) -> ImportedLM:
    """A HF GPT-NeoX directory -> our model with K image rows, each tensor placed on `mesh`.

    An llmcxr export records its K in config.json (IMAGE_CODES_KEY); another K would keep its trained
    image rows as the first codes of a different codebook, so it is refused."""
    hf = read_hf_config(directory)
    marked = hf.get(IMAGE_CODES_KEY)
    if marked is not None and int(marked) != image_codes:
        raise UsageError(f"{directory} is an LLM-CXR export with {marked} image-token rows (config.json "
                         f"{IMAGE_CODES_KEY}); import it with {marked} image codes, not {image_codes}")
    reader = weight_files.HFCheckpointReader(directory)
    tok = special = tok_cfg = None
    if vocab.has_tokenizer(directory):
        tok, special, tok_cfg = vocab.load_tokenizer(directory)
        text_size = vocab.text_size(tok)
    else:
        text_size = int(hf["vocab_size"])
    table_rows = int(hf["vocab_size"])
    if tok is not None:
        _check_rows_past_text(directory, table_rows, text_size, image_codes)
    layout = VocabLayout.create(text_size, image_codes, mesh.shape["tensor"])
    cfg = model_config_from_hf(hf, layout, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                               remat_policy=remat_policy)
    rng = np.random.default_rng(seed)
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    shardings = sharding.param_shardings(params, mesh).to_pure_dict()
    pure = params.to_pure_dict()
    available = reader.keys()
    per_layer: dict[str, list[jax.Array]] = {}
    for rule, layer, flax_path, hf_key in expand(cfg):
        key = _find_key(hf_key, rule, available, hf)
        t = reader.get(key).astype(np.float32)
        expected = rule.hf_shape(cfg)
        if rule.vocab_rows:
            expected = (table_rows,) + expected[1:]
        if t.shape != expected:
            raise UsageError(f"tensor {key} has shape {t.shape}, config.json implies {expected}")
        if rule.vocab_rows:
            t = resize_vocab_rows(t, layout.size, new_rows, cfg.initializer_range, rng)
        a = hf_to_flax(rule, cfg, t).astype(cfg.weight_dtype)
        if layer is not None and cfg.scan_layers:
            path = rule.flax.replace("{i}.", "")
            sh = _get(shardings, path)
            per_sh = NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
            per_layer.setdefault(path, []).append(_place(a, per_sh))
            if len(per_layer[path]) == cfg.num_layers:
                _set(pure, path, _stack(per_layer.pop(path), sh))
        else:
            _set(pure, flax_path, _place(a, _get(shardings, flax_path)))
        if progress:
            progress(key)
    params.replace_by_pure_dict(pure)
    model = nnx.merge(graphdef, params)
    return ImportedLM(model=model, config=cfg, layout=layout, special=special, tokenizer=tok,
                      tokenizer_config=tok_cfg, hf_config=hf)


def _check_rows_past_text(directory: str, table_rows: int, text_size: int, image_codes: int) -> None:
    """The rows of a table past the tokenizer's T are a base model's padding or an LLM-CXR model's
    image rows; which one, config.json does not say. More of them than K would be cut: refused. Fewer
    become the first image codes: said on stderr, since a model trained with that many codes wants
    exactly that K."""
    extra = table_rows - text_size
    if extra > image_codes:
        raise UsageError(f"{directory}: config.json vocab_size {table_rows} has {extra} rows past the tokenizer's "
                         f"T = {text_size}; {image_codes} image codes would cut {extra - image_codes} of them. If it "
                         f"is an LLM-CXR model trained with {extra} codes, give --image-codes {extra}")
    if 0 < extra < image_codes:
        print(f"import-hf: note: {directory} has {extra} rows past the tokenizer's T = {text_size}; they become "
              f"image codes 0..{extra - 1} and {image_codes - extra} rows are new (a base model's padding rows; "
              f"for an LLM-CXR model trained with {extra} codes give --image-codes {extra})", file=sys.stderr)


def _find_key(hf_key: str, rule: Rule, available: set[str], hf: dict[str, Any]) -> str:
    for k in (hf_key,) + rule.hf_aliases:
        if k in available:
            return k
    if rule.flax.startswith("embed_out") and hf.get("tie_word_embeddings") and "gpt_neox.embed_in.weight" in available:
        return "gpt_neox.embed_in.weight"
    raise UsageError(f"checkpoint has no tensor {hf_key}; is it a GPTNeoXForCausalLM checkpoint?")


def _place(a: np.ndarray, sh: NamedSharding) -> jax.Array:
    """Host array -> global array; every process reads the same file, each keeps its shards."""
    return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])


def _stack(parts: list[jax.Array], sh: NamedSharding) -> jax.Array:
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sh)(*parts)


def _key(part: str):
    return int(part) if part.isdigit() else part


def _get(tree: dict, path: str):
    for p in path.split("."):
        tree = tree[_key(p)]
    return tree


def _set(tree: dict, path: str, value) -> None:
    parts = path.split(".")
    _get(tree, ".".join(parts[:-1]))[_key(parts[-1])] = value


# ---------------------------------------------------------------- export


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


def hf_tensors(model: GPTNeoXForCausalLM, dtype: str) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """(HF key, loader, bytes) per tensor; the loader converts to float32, then casts to `dtype`."""
    cfg = model.cfg
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    np_dtype = EXPORT_DTYPES[dtype]

    def loader(rule, layer, flax_path):
        def load():
            if layer is not None and cfg.scan_layers:
                a = _get(pure, rule.flax.replace("{i}.", ""))[layer]
            else:
                a = _get(pure, flax_path)
            a = _to_host(a).astype(np.float32)
            return np.ascontiguousarray(flax_to_hf(rule, cfg, a).astype(np_dtype))
        return load

    for rule, layer, flax_path, hf_key in expand(cfg):
        nbytes = int(np.prod(rule.hf_shape(cfg))) * np.dtype(np_dtype).itemsize
        yield hf_key, loader(rule, layer, flax_path), nbytes


def _to_host(a: jax.Array) -> np.ndarray:
    """The whole array on this host; across processes when it is spread over several."""
    if a.is_fully_addressable:
        return np.asarray(jax.device_get(a))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def export_hf(model: GPTNeoXForCausalLM, out_dir: str, *, dtype: str = "float32", hf_config: dict | None = None,
              image_codes: int = 0, tokenizer=None, tokenizer_config: dict | None = None,
              special: SpecialTokens | None = None, weights: str = "safetensors",
              max_shard_bytes: int = 5 * 1024 ** 3, progress: Callable[[str], None] | None = None) -> list[str]:
    """Write a HF GPT-NeoX directory that AutoModelForCausalLM.from_pretrained loads; returns its weight files.

    `weights` picks model.safetensors, pytorch_model.bin (for stacks without safetensors, such as
    LLM-CXR's transformers 4.28), or both. Past max_shard_bytes tensors go to numbered shards
    (model-0000N-of-0000M.safetensors, pytorch_model-0000N-of-0000M.bin) plus the format's index;
    one shard's tensors are in host memory at a time. Every process must call it (arrays are
    gathered); only process 0 writes.
    """
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"export dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    formats = weight_files.weight_formats(weights)
    os.makedirs(out_dir, exist_ok=True)
    files, listed = weight_files.write_shards(hf_tensors(model, dtype), out_dir, formats, max_shard_bytes,
                                              write=jax.process_index() == 0, progress=progress)
    if jax.process_index() != 0:
        return files
    config = hf_config_from_model(model.cfg, hf_config, dtype, image_codes)
    if special is not None:
        config.update(eos_token_id=special.eos_id, pad_token_id=special.pad_id)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        vocab.save_tokenizer(tokenizer, tokenizer_config or {}, out_dir)
    hf_model_card.write(out_dir, export_facts(model.cfg, config, dtype=dtype, image_codes=image_codes,
                                              weight_files=listed, special=special, tokenizer=tokenizer))
    return files


def export_facts(cfg: GPTNeoXConfig, config: dict[str, Any], *, dtype: str, image_codes: int,
                 weight_files: list[str], special: SpecialTokens | None, tokenizer) -> hf_model_card.ExportFacts:
    """What the model card and generation_config.json say about this export, from the model and config.json."""
    return hf_model_card.ExportFacts(
        text_size=cfg.vocab_size - image_codes, image_codes=image_codes, table_rows=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        parameters=sum(int(np.prod(rule.hf_shape(cfg))) for rule, *_ in expand(cfg)), dtype=dtype,
        weight_files=tuple(weight_files), special=special, has_tokenizer=tokenizer is not None,
        image_marker=hf_model_card.image_marker(tokenizer), config_eos=config.get("eos_token_id"),
        config_pad=config.get("pad_token_id"))
