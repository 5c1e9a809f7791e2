"""orbax checkpoints of the LM and the VQ-GAN: item "state" (params or a full train state), item "metadata"
(VocabLayout, model config, special tokens, mesh, HF config; for an LM read and checked by read_lm_metadata alone),
item "checksums" (checkpoint_checksums.py; every read is checked against it by checkpoint_integrity.py) and the
tokenizer under DIR/tokenizer/. DIR may be gs://... (arrays via tensorstore, other files via storage.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from llmcxr_jax import checkpoint_checksums, checkpoint_integrity, sharding, storage, vocab
from llmcxr_jax.checkpoint_checksums import CHECKSUMS, Damage
from llmcxr_jax.checkpoint_integrity import CheckpointDamaged
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM, abstract_model
from llmcxr_jax.models.vqgan import VQGANConfig, VQModel, abstract_vqgan
from llmcxr_jax.vocab import SpecialTokens, VocabLayout

STATE, METADATA, DATA_ITER = "state", "metadata", "data_iter"
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class LoadedLM:
    model: GPTNeoXForCausalLM
    config: GPTNeoXConfig
    layout: VocabLayout
    special: SpecialTokens | None
    tokenizer: Any
    tokenizer_config: dict[str, Any] | None
    metadata: dict[str, Any]
    step: int


def _manager(directory: str, options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(storage.path(directory), options=options,
                                 item_names=(STATE, DATA_ITER, METADATA, CHECKSUMS))


def _save(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any], args: dict[str, Any], **kwargs) -> None:
    """One orbax save of `args` (item -> save args of `items`' values), with the checksums item beside them."""
    extra, custom = checkpoint_checksums.save_args(items)
    mngr.save(step, args=ocp.args.Composite(**args, **extra), custom_metadata=custom, **kwargs)


class TrainCheckpointer:
    """A training run's checkpoints: items "state" (any pytree), "data_iter" (JSON iterator
    state) and "metadata"; keeps the newest `keep`; saves asynchronously."""

    def __init__(self, directory: str, keep: int):
        self.manager = _manager(directory, ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                        enable_async_checkpointing=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, metadata: dict[str, Any]) -> None:
        """data_iter: a JSON dict (one host position), or orbax args such as grain's
        CheckpointSave (one state file per process)."""
        _save(self.manager, step, {STATE: state, DATA_ITER: data_iter, METADATA: metadata}, {
            STATE: ocp.args.StandardSave(state), DATA_ITER: _json_or_args(data_iter, ocp.args.JsonSave),
            METADATA: ocp.args.JsonSave(metadata)}, force=True)

    def _restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, Any]:
        out = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA_ITER: data_iter if data_iter is not None else ocp.args.JsonRestore()}))
        restored = out[DATA_ITER]
        return out[STATE], (dict(restored) if data_iter is None else restored)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> tuple[Any, Any]:
        """abstract_state: jax.ShapeDtypeStruct leaves carrying the target shardings; data_iter:
        None (JSON) or restore args such as grain's CheckpointRestore(iterator). Checked against the
        step's checksums; CheckpointDamaged (one line) when it is damaged."""
        directory = str(self.manager.directory)
        problem, out = checkpoint_integrity.restore_and_check(
            directory, step, lambda: self._restore(step, abstract_state, data_iter), lambda o: o[0], "",
            (METADATA, DATA_ITER))
        if problem is not None:
            raise CheckpointDamaged(checkpoint_integrity.damaged_line(directory, step, problem, _hint(
                directory, step, self.manager.all_steps(), lambda _: True)))
        return out

    def restore_intact(self, abstract_state: Any, data_iter: Any = None, *,
                       move_aside: bool = True) -> tuple[int, Any, Any]:
        """Resume: (step, state, data_iter) of the newest step that passes its checks. Damaged newer steps are
        warned about once each and, with move_aside, moved to <step>.damaged/ (never deleted) so this run
        saves those steps anew; no intact step is a one-line CheckpointDamaged naming the directory."""
        directory = str(self.manager.directory)

        def attempt(step: int):
            return checkpoint_integrity.restore_and_check(
                directory, step, lambda: self._restore(step, abstract_state, data_iter), lambda o: o[0], "",
                (METADATA, DATA_ITER))

        step, (state, position), damaged = checkpoint_integrity.newest_passing(
            directory, self.manager.all_steps(), attempt, move_aside)
        if damaged:
            self.manager.reload()
        return step, state, position

    def metadata(self, step: int) -> dict[str, Any]:
        return read_metadata(str(self.manager.directory), step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _json_or_args(value: Any, json_cls):
    return json_cls(value) if isinstance(value, dict) else value


def lm_metadata(config: GPTNeoXConfig, layout: VocabLayout, special: SpecialTokens | None, mesh: Mesh,
                hf_config: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "model_config": config.to_dict(),
        "vocab": layout.to_dict(),
        "special_tokens": special.to_dict() if special is not None else None,
        "mesh": {name: int(size) for name, size in mesh.shape.items()},
        "hf_config": hf_config,
    }


def save_state(directory: str, state: dict[str, Any], metadata: dict[str, Any], *, step: int) -> None:
    """Item "state" (a pytree whose "params" entry holds the LM parameters) and item "metadata"."""
    if "params" not in state:
        raise UsageError("a checkpoint state needs a 'params' entry")
    with _manager(directory) as mngr:
        _save(mngr, step, {STATE: state, METADATA: metadata},
              {STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata)})
        mngr.wait_until_finished()


def save_params(directory: str, model: GPTNeoXForCausalLM, metadata: dict[str, Any], *, step: int = 0,
                tokenizer=None, tokenizer_config: dict[str, Any] | None = None) -> None:
    """A params-only checkpoint (what import-hf writes)."""
    save_state(directory, {"params": nnx.state(model, nnx.Param).to_pure_dict()}, metadata, step=step)
    if tokenizer is not None and jax.process_index() == 0:
        vocab.save_tokenizer(tokenizer, tokenizer_config or {}, os.path.join(directory, TOKENIZER_DIR))


def has_checkpoint(directory: str) -> bool:
    if not storage.path(directory).is_dir():
        return False
    with _manager(directory) as mngr:
        return mngr.latest_step() is not None


def latest_step(directory: str) -> int:
    if not storage.path(directory).is_dir():
        raise MissingInputError(f"checkpoint directory {directory} does not exist")
    with _manager(directory) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise MissingInputError(f"{directory} holds no orbax checkpoint; {_instead(directory)}")
    return step


def _instead(directory: str) -> str:
    """What to give in place of a directory without a checkpoint, judged from what it holds."""
    try:
        config = json.loads((storage.path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("_class_name") == "VQModel":
        return ("it is a diffusers VQModel directory: convert it with "
                f"`llmcxr import-vqgan --diffusers {directory} --out DIR`")
    if isinstance(config, dict) and "model_type" in config:
        return f"it is a Hugging Face model directory: convert it with `llmcxr import-hf --hf {directory} --out DIR`"
    return ("give a directory written by `llmcxr import-hf`, `import-vqgan`, `train` or `train-vqgan` (or their "
            "workdir)")


# Where a training workdir keeps the model each loader wants, in order of preference.
WORKDIR_MODELS = {"lm": ("checkpoints",), "vqgan": ("vqgan", "checkpoints")}


def model_dir(directory: str, kind: str) -> str:
    """A checkpoint directory as given, or the one a training workdir holds for `kind`: WORKDIR/checkpoints
    for the LM; the finished WORKDIR/vqgan, else the latest WORKDIR/checkpoints step, for the VQ-GAN."""
    if has_checkpoint(directory):
        return directory
    for name in WORKDIR_MODELS[kind]:
        inner = str(storage.path(directory) / name)
        if has_checkpoint(inner):
            return inner
    return directory


def read_metadata(directory: str, step: int | None = None) -> dict[str, Any]:
    """The step's "metadata" item, checked against its checksum (CheckpointDamaged when it fails)."""
    step = latest_step(directory) if step is None else step
    try:
        checkpoint_integrity.check_json_items(directory, step, checkpoint_integrity.checksums(directory, step),
                                              (METADATA,))
    except Damage as d:
        raise CheckpointDamaged(checkpoint_integrity.damaged_line(directory, step, str(d), _hint(
            directory, step, all_steps(directory), lambda _: True))) from None
    with _manager(directory) as mngr:
        return dict(mngr.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))[METADATA])


def set_aside_damaged_items(directory: str) -> None:
    """Before a resumed run reads its newest step's metadata: newer steps whose checksum files or JSON items
    (metadata, data position) are damaged are moved aside, as TrainCheckpointer.restore_intact does for their
    arrays (which it checks when it restores them)."""
    def attempt(step: int):
        try:
            checkpoint_integrity.check_json_items(directory, step, checkpoint_checksums.read_files(
                checkpoint_integrity.step_dir(directory, step)), (METADATA, DATA_ITER))
        except Damage as d:
            return checkpoint_integrity.agree(str(d)), None
        return checkpoint_integrity.agree(None), None

    checkpoint_integrity.newest_passing(directory, all_steps(directory), attempt, move_aside=True)


def all_steps(directory: str) -> list[int]:
    """The finalised steps of a checkpoint directory, oldest first (a step moved to <step>.damaged is not one)."""
    with _manager(directory) as mngr:
        return sorted(mngr.all_steps())


def checkpoint_dirs(directory: str) -> list[str]:
    """The orbax checkpoint directories a path stands for: itself, or those a training workdir holds."""
    if has_checkpoint(directory):
        return [directory]
    names = dict.fromkeys(n for kind in WORKDIR_MODELS.values() for n in kind)
    return [str(storage.path(directory) / n) for n in names if has_checkpoint(str(storage.path(directory) / n))]


def _hint(directory: str, step: int, steps, select: Callable[[str], bool]) -> str:
    """Which older step is intact, for the one-line error about a damaged one (reads them: failure path only)."""
    return checkpoint_integrity.intact_hint(directory, step, list(steps), select, (METADATA, DATA_ITER))


@dataclasses.dataclass(frozen=True)
class LMMetadata:
    """What an LM checkpoint step says about itself, read and checked by read_lm_metadata."""

    step: int
    config: GPTNeoXConfig  # the saved model config, dtype / remat_policy as the reader asked
    layout: VocabLayout  # text rows, image rows and padding of the embedding tables
    special: SpecialTokens | None  # the special-token ids recorded in the metadata (None in old imports)
    tokenizer: Any  # the tokenizer saved in DIR/tokenizer/, or None when the checkpoint holds none
    tokenizer_special: SpecialTokens | None  # that tokenizer's special tokens, as vocab.load_tokenizer reads them
    tokenizer_config: dict[str, Any] | None  # that tokenizer's tokenizer_config.json
    metadata: dict[str, Any]  # the whole "metadata" item


def read_lm_metadata(directory: str, step: int | None = None, *, dtype: str | None = None,
                     remat_policy: str | None = None) -> LMMetadata:
    """The one reader of an LM checkpoint's metadata (load_lm and a resumed training run both use it):
    model config, VocabLayout, special tokens and the saved tokenizer, whose size must equal the
    layout's text rows. dtype / remat_policy replace the saved ones when given. No array is read."""
    step = latest_step(directory) if step is None else step
    meta = read_metadata(directory, step)
    if "model_config" not in meta:
        raise UsageError(f"{directory} is not a language-model checkpoint (its metadata has no model_config)")
    config = GPTNeoXConfig.from_dict(meta["model_config"])
    config = config.replace(dtype=dtype or config.dtype, remat_policy=remat_policy or config.remat_policy)
    layout = VocabLayout.from_dict(meta["vocab"])
    tok = tok_special = tok_cfg = None
    tok_dir = os.path.join(directory, TOKENIZER_DIR)
    if vocab.has_tokenizer(tok_dir):
        tok, tok_special, tok_cfg = vocab.load_tokenizer(tok_dir)
        if vocab.text_size(tok) != layout.text_size:
            raise UsageError(f"tokenizer in {tok_dir} has {vocab.text_size(tok)} tokens but the checkpoint's "
                             f"vocabulary has T = {layout.text_size}; use the tokenizer saved with this checkpoint")
    special = SpecialTokens.from_dict(meta["special_tokens"]) if meta.get("special_tokens") else None
    return LMMetadata(step=step, config=config, layout=layout, special=special, tokenizer=tok,
                      tokenizer_special=tok_special, tokenizer_config=tok_cfg, metadata=meta)


def _state_tree(directory: str, step: int) -> dict[str, Any]:
    """The saved state's tree of array metadata (shapes and dtypes; no array is read)."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(storage.path(directory) / str(step) / STATE)
    except Exception as e:  # noqa: BLE001 - a cut _METADATA fails in json or orbax; damage_or_raise tells
        raise checkpoint_integrity.damage_or_raise(directory, step, e, all_steps(directory)) from None
    return dict(getattr(meta, "tree", meta))


def restore_module(directory: str, step: int, abstract: nnx.Module, mesh: Mesh, key: str = "params",
                   saved: dict[str, Any] | None = None) -> nnx.Module:
    """Fill an abstract module's Params from item state[key], each placed by the rules table.

    Works on params-only and full train-state checkpoints (the rest of the state is not read). A
    parameter the checkpoint does not hold is an error, not a silently abstract leaf. `saved`: the
    state's metadata tree when the caller has read it already.
    """
    saved = _state_tree(directory, step) if saved is None else saved
    if key not in saved:
        raise UsageError(f"{directory} step {step} holds no '{key}' weights (its state has "
                         f"{', '.join(sorted(saved))}); give a model checkpoint")
    graphdef, params = nnx.split(abstract, nnx.Param)
    shardings = sharding.param_shardings(params, mesh)
    target = {key: jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                params.to_pure_dict(), shardings.to_pure_dict())}

    def restore() -> dict[str, Any]:
        with _manager(directory) as mngr:
            restored = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)}))[STATE]
        missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored[key])
                   if not isinstance(leaf, jax.Array)]
        if missing:
            raise UsageError(f"{directory} step {step} lacks {len(missing)} of this model's parameters under "
                             f"'{key}' (first {missing[0]}); it was written for another architecture")
        return restored[key]

    problem, weights = checkpoint_integrity.restore_and_check(directory, step, restore, lambda w: w, key, ())
    if problem is not None:
        raise CheckpointDamaged(checkpoint_integrity.damaged_line(directory, step, problem, _hint(
            directory, step, all_steps(directory), lambda n: n.startswith(key + "."))))
    params.replace_by_pure_dict(weights)
    return nnx.merge(graphdef, params)


def save_vqgan(directory: str, model: VQModel, *, step: int = 0, extra_metadata: dict[str, Any] | None = None) -> None:
    meta = {"vqgan_config": model.cfg.to_dict(), **(extra_metadata or {})}
    save_state(directory, {"params": nnx.state(model, nnx.Param).to_pure_dict()}, meta, step=step)


def load_vqgan(directory: str, mesh: Mesh, *, step: int | None = None) -> tuple[VQModel, dict[str, Any]]:
    """A VQ-GAN from an import-vqgan or finished train-vqgan checkpoint, or from any train-vqgan step."""
    directory = model_dir(directory, "vqgan")
    step = latest_step(directory) if step is None else step
    meta = read_metadata(directory, step)
    if "vqgan_config" not in meta:
        raise UsageError(f"{directory} is not a VQ-GAN checkpoint (its metadata has no vqgan_config)")
    cfg = VQGANConfig.from_dict(meta["vqgan_config"])
    saved = _state_tree(directory, step)
    return restore_module(directory, step, abstract_vqgan(cfg), mesh, vqgan_weights(saved), saved), meta


def vqgan_weights(saved: dict[str, Any]) -> str:
    """Which weights of a saved VQ-GAN state tree to load: "params" (import-vqgan, or train-vqgan's
    finished WORKDIR/vqgan), else those of a train-vqgan WORKDIR/checkpoints step: its EMA when the run
    keeps one, the generator otherwise (what train-vqgan exports when it finishes)."""
    if "params" in saved or "gen" not in saved:
        return "params"
    return "ema" if saved.get("ema") else "gen"


def load_lm(directory: str, mesh: Mesh, *, step: int | None = None, dtype: str | None = None,
            remat_policy: str | None = None) -> LoadedLM:
    """Restore params (from a params-only or full train-state checkpoint, or a train workdir's latest)
    sharded onto `mesh`; the metadata as read_lm_metadata reads and checks it."""
    directory = model_dir(directory, "lm")
    meta = read_lm_metadata(directory, step, dtype=dtype, remat_policy=remat_policy)
    meta.layout.check_tensor_parallelism(mesh.shape["tensor"])
    model = restore_module(directory, meta.step, abstract_model(meta.config), mesh)
    return LoadedLM(model=model, config=meta.config, layout=meta.layout, special=meta.special,
                    tokenizer=meta.tokenizer, tokenizer_config=meta.tokenizer_config, metadata=meta.metadata,
                    step=meta.step)
