"""LLM-CXR instruction tuning (stages 1 and 2): one pure, jitted, sharded train step with gradient
accumulation, then the loop: resume order, metrics, held-out loss, checkpoints, SIGTERM, NaN stop.

Resume order: an existing run in the workdir > train.resume_from > train.init_from > scratch.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax import sharding, vocab
from llmcxr_jax.data import lm_batches
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model
from llmcxr_jax.train import checkpoint, lm_data, optim, preemption
from llmcxr_jax.train import state as state_lib
from llmcxr_jax.train.metrics import MetricsLog, claim_workdir

BATCH_AXES = sharding.BATCH_AXES
BATCH_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "modality")


class NonFiniteLoss(ValueError):
    """The loss became NaN/Inf; the message names the step, the batch and the last good checkpoint."""


# ---------------------------------------------------------------- the step

def token_losses(params, graphdef, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of masked next-token cross entropies and the sums behind the text / image split."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["positions"])
    logz = jax.nn.logsumexp(logits, axis=-1)  # [rows, length]
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    ce = logz - target_logit
    mask = batch["loss_mask"].astype(jnp.float32)
    image = (batch["modality"] == 1).astype(jnp.float32) * mask
    text = mask - image
    sums = {"tokens": jnp.sum(mask), "text_tokens": jnp.sum(text), "image_tokens": jnp.sum(image),
            "text_loss_sum": jnp.sum(ce * text), "image_loss_sum": jnp.sum(ce * image)}
    return jnp.sum(ce * mask), sums


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


SUM_KEYS = ("tokens", "text_tokens", "image_tokens", "text_loss_sum", "image_loss_sum")


def accumulate_gradients(params, graphdef, batch, grad_accum: int):
    """Gradient of the summed masked loss over grad_accum micro-batches (a lax.scan), divided by
    the total token count: the same mean-over-tokens gradient as one batch of all the rows."""
    grad_fn = jax.value_and_grad(token_losses, has_aux=True)
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, graphdef, batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)
        micro = jax.tree.map(lambda x: sharding.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2)),
                             micro)

        def body(carry, mb):
            g_acc, s_acc = carry
            (_, s), g = grad_fn(params, graphdef, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
        (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    scale = 1.0 / jnp.maximum(sums["tokens"], 1.0)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), sums


def make_train_step(graphdef, tx: optax.GradientTransformation, grad_accum: int,
                    schedule: optax.Schedule) -> Callable:
    """(state, batch) -> (state, metrics); loss = mean over every loss_mask token of the batch."""

    def train_step(state, batch):
        params = state["params"]
        grads, sums = accumulate_gradients(params, graphdef, batch, grad_accum)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        loss = _ratio(sums["text_loss_sum"] + sums["image_loss_sum"], sums["tokens"])
        metrics = {
            "loss": loss, "loss_text": _ratio(sums["text_loss_sum"], sums["text_tokens"]),
            "loss_image": _ratio(sums["image_loss_sum"], sums["image_tokens"]),
            "tokens": sums["tokens"], "learning_rate": schedule(state["step"]),
            "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(new_params),
            "update_norm": optax.global_norm(updates),
        }
        return {"params": new_params, "opt": opt, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef) -> Callable:
    def eval_step(params, batch):
        _, sums = token_losses(params, graphdef, batch)
        return sums

    return eval_step


# ---------------------------------------------------------------- accounting

def model_flops_per_token(cfg: GPTNeoXConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 x matmul parameters (embedding lookup
    excluded, LM head included) + 12 x layers x hidden x seq_len for attention scores and values."""
    params = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    n -= cfg.padded_vocab_size * cfg.hidden_size  # embed_in is a gather
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def peak_flops(t: ml_collections.ConfigDict) -> float:
    """Dense bf16 peak FLOP/s of one device (train.peak_flops, else the chip table); 0 = unknown."""
    from llmcxr_jax.train import topologies

    if t.peak_flops:
        return float(t.peak_flops)
    device = jax.devices()[0]
    if device.platform == "gpu":
        kind = topologies.gpu_type_of(device)
        return topologies.GPU_CHIPS[kind].peak_flops if kind else 0.0
    if device.platform == "tpu":
        for name, chip in topologies.TPU_CHIPS.items():
            label = {"v5e": "v5 lite", "v6e": "v6 lite"}.get(name, name)
            if label in device.device_kind.lower():
                return chip.peak_flops
    return 0.0


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.stages.Lowered:
    """The real train step lowered with abstract state and batch (no data, no allocation): what
    `llmcxr compile-check` compiles for a TPU/GPU topology. The vocabulary comes from
    model.text_size + model.image_codes."""
    t, d, m = config.train, config.data, config.model
    _check_batch(config, mesh)
    layout = vocab.VocabLayout.create(int(m.text_size), int(m.image_codes), mesh.shape["tensor"])
    cfg = GPTNeoXConfig.from_config(m, layout)
    tx = optim.make_optimizer(t, state_lib.abstract_params(cfg), layout)
    abstract, state_sh = state_lib.state_shardings(cfg, tx, mesh)
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    shape = (int(t.batch_size), int(d.seq_len))
    dtypes = {"input_ids": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32, "modality": jnp.int8}
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh) for k, dt in dtypes.items()}
    graphdef = nnx.graphdef(abstract_model(cfg))
    step = jax.jit(make_train_step(graphdef, tx, int(t.grad_accum), optim.learning_rate(t)),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    return step.lower(abstract, batch)


def step_flops(config: ml_collections.ConfigDict) -> tuple[int, float]:
    """(tokens per step, model FLOPs per step) of the configured shape at full rows."""
    m, t, d = config.model, config.train, config.data
    layout = vocab.VocabLayout.create(int(m.text_size), int(m.image_codes))
    tokens = int(t.batch_size) * int(d.seq_len)
    return tokens, tokens * model_flops_per_token(GPTNeoXConfig.from_config(m, layout), int(d.seq_len))


# ---------------------------------------------------------------- the loop

def _check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    t = config.train
    data = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size {t.batch_size} does not split into train.grad_accum {t.grad_accum} "
                         "micro-batches; make it a multiple")
    micro = t.batch_size // t.grad_accum
    if micro % data or t.batch_size % jax.process_count():
        raise ValueError(f"micro-batch of {micro} rows (train.batch_size / grad_accum) does not divide over {data} "
                         f"data x fsdp devices and {jax.process_count()} processes; make it a multiple of {data}")


def global_batch(host: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    return sharding.global_batch({k: host[k] for k in BATCH_FIELDS}, mesh, PartitionSpec(BATCH_AXES))


def _describe(pipe, example_ids: np.ndarray) -> list[str]:
    out = []
    for i in example_ids.ravel():
        if i >= 0:
            ref = pipe.describe(int(i))
            out.append(f"{ref.task}:{ref.dicom_id or ref.source_index}")
    return out


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          echo: bool = True) -> dict[str, Any]:
    """Train (or resume) in `workdir` until train.steps. stop_after simulates an interruption
    after that many steps of this call. Returns a summary dict."""
    t, d = config.train, config.data
    mesh = sharding.make_mesh(t.mesh)
    _check_batch(config, mesh)
    sources = lm_data.read_sources(d)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resume_dir = None
    if checkpoint.has_checkpoint(ckpt_dir):
        resume_dir = ckpt_dir
    elif t.resume_from:
        resume_dir = os.path.join(t.resume_from, "checkpoints")
        if not checkpoint.has_checkpoint(resume_dir):
            raise FileNotFoundError(f"train.resume_from {t.resume_from} holds no checkpoints/ of a run")
    claim_workdir(workdir, config, {"model": "model config", "data.stage": "data stage"})
    with jax.set_mesh(mesh):
        if resume_dir is not None:
            start = _start_from_run(config, mesh, resume_dir, sources.codebook_size)
        else:
            start = state_lib.resolve_start(config, mesh, sources.codebook_size)
        if start.layout.image_codes != sources.codebook_size:
            raise ValueError(f"the model has {start.layout.image_codes} image rows but data.codes uses a codebook "
                             f"of {sources.codebook_size}")
        schedule = optim.learning_rate(t)
        tx = optim.make_optimizer(t, state_lib.abstract_params(start.config), start.layout)
        abstract, state_sh = state_lib.state_shardings(start.config, tx, mesh)
        shapes = abstract_model(start.config)
        placement = sharding.check_param_sharding(shapes, mesh)
        graphdef = nnx.graphdef(shapes)
        data_iter, pipes = lm_data.train_iterator(sources, start.tokenizer, start.special, start.layout, d,
                                                  t.batch_size)
        train_pipe = pipes[0]  # any shard's pipeline maps example ids back to examples
        # validated once; each evaluation reads its first eval_batches from a fresh iterator
        eval_pipe = lm_data.make_batches(sources, "held_out", start.tokenizer, start.special, start.layout, d,
                                         t.batch_size) if t.eval_every else None
        ckpt = checkpoint.TrainCheckpointer(ckpt_dir, keep=t.keep_checkpoints)
        if resume_dir is not None:
            src = checkpoint.TrainCheckpointer(resume_dir, keep=t.keep_checkpoints) if resume_dir != ckpt_dir else ckpt
            step0 = src.latest_step()
            state, _ = src.restore(step0, abstract, lm_batches.checkpoint_args(data_iter, restore=True))
            if src is not ckpt:
                src.close()
        else:
            state = state_lib.create_state(start, tx, mesh, t.seed)
        metadata = checkpoint.lm_metadata(start.config, start.layout, start.special, mesh, start.hf_config)
        metadata.update(stage=int(d.stage), source=start.source, param_bytes_per_device=placement["bytes_per_device"])
        if jax.process_index() == 0:
            vocab.save_tokenizer(start.tokenizer, start.tokenizer_config or {},
                                 os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR))
        batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
        step_fn = jax.jit(make_train_step(graphdef, tx, t.grad_accum, schedule),
                          in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
        eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(state_sh["params"], batch_sh))
        return _loop(config, workdir, state, data_iter, train_pipe, eval_pipe, step_fn, eval_fn, ckpt, metadata,
                     batch_sh, start, stop_after, echo)


def _start_from_run(config, mesh, ckpt_dir: str, image_codes: int) -> state_lib.Start:
    """Shape, vocabulary and tokenizer of a run being resumed (its params come with the state)."""
    meta = checkpoint.read_metadata(ckpt_dir)
    m = config.model
    cfg = GPTNeoXConfig.from_dict(meta["model_config"]).replace(dtype=m.dtype, remat_policy=m.remat_policy)
    layout = vocab.VocabLayout.from_dict(meta["vocab"])
    tok, special, tok_cfg = vocab.load_tokenizer(os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR))
    return state_lib.Start(cfg, layout, tok, special, tok_cfg, None, meta.get("source", "run"), meta.get("hf_config"))


def _evaluate(pipe, eval_batches: int, eval_fn, params, batch_sh) -> dict[str, float]:
    totals: dict[str, float] = {}
    for n, host in enumerate(pipe.iterator(num_epochs=1)):
        if n >= eval_batches:
            break
        sums = jax.device_get(eval_fn(params, global_batch(host, batch_sh.mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        return {}
    loss = (totals["text_loss_sum"] + totals["image_loss_sum"]) / max(totals["tokens"], 1.0)
    out = {"eval_loss": loss}
    if totals["text_tokens"]:
        out["eval_loss_text"] = totals["text_loss_sum"] / totals["text_tokens"]
    if totals["image_tokens"]:
        out["eval_loss_image"] = totals["image_loss_sum"] / totals["image_tokens"]
    return out


def _loop(config, workdir, state, data_iter, pipe, eval_pipe, step_fn, eval_fn, ckpt, metadata, batch_sh, start,
          stop_after, echo) -> dict[str, Any]:
    t, d = config.train, config.data
    log = MetricsLog(workdir, t.steps)
    board = _board(workdir)
    flops_token = model_flops_per_token(start.config, d.seq_len)
    peak = peak_flops(t) * jax.device_count()
    step = int(jax.device_get(state["step"]))
    last_saved = ckpt.latest_step()
    done_here, t_last, tokens_since = 0, time.perf_counter(), 0.0
    stop = preemption.StopAgreement(step)
    try:
        while step < t.steps:
            host = next(data_iter)
            state, metrics = step_fn(state, global_batch(host, batch_sh.mesh))
            step += 1
            done_here += 1
            loss = float(metrics["loss"])  # one sync per step: a bad step never reaches a checkpoint
            if not np.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss} at step {step}; batch examples {_describe(pipe, host['example_ids'])[:8]}; "
                    f"last good checkpoint: {os.path.join(ckpt.manager.directory, str(last_saved)) if last_saved is not None else 'none'}")
            tokens_since += float(metrics["tokens"])
            preempted = stop.reached(step)  # the same step in every process: the save below is collective
            last = step == t.steps or (stop_after is not None and done_here >= stop_after) or preempted
            if step % t.log_every == 0 or step == 1 or last:
                now = time.perf_counter()
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                values["step_time_s"] = (now - t_last) / max(step % t.log_every or t.log_every, 1)
                if peak:
                    values["mfu"] = values["tokens_per_s"] * flops_token / peak
                values["dropped_too_long"] = float(sum(data_iter.dropped.values()))
                log.write(step, values, echo=echo)
                _board_write(board, step, values)
                t_last, tokens_since = time.perf_counter(), 0.0
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                values = _evaluate(eval_pipe, t.eval_batches, eval_fn, state["params"], batch_sh)
                if values:
                    log.write(step, values, echo=echo)
                    _board_write(board, step, values)
            if step % t.checkpoint_every == 0 or last:
                ckpt.save(step, state, lm_batches.checkpoint_args(data_iter), metadata)
                last_saved = step
            if last:
                break
    finally:
        ckpt.close()
        stop.close()
        if board is not None:
            board.close()
    return {"step": step, "checkpoints": str(ckpt.manager.directory), "preempted": stop.stopped,
            "metrics": log.path, "source": start.source}


def _board(workdir: str):
    """TensorBoard event files under WORKDIR/tensorboard (process 0)."""
    if jax.process_index() != 0:
        return None
    from llmcxr_jax.train.tensorboard import EventWriter

    return EventWriter(os.path.join(workdir, "tensorboard"))


def _board_write(board, step: int, values: dict[str, float]) -> None:
    if board is not None:
        board.scalars(step, values)
