"""LLM-CXR instruction tuning (stages 1 and 2): the pure train step with gradient accumulation, jit_train_step
(the one sharded jax.jit that training runs and compile-check lowers) and the loop: metrics, held-out loss,
checkpoints, SIGTERM, NaN stop. Where a run starts (the resume order): state.start_source.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmcxr_jax import checkpoint, sharding, vocab
from llmcxr_jax.data import lm_batches, packing
from llmcxr_jax.errors import UsageError
from llmcxr_jax.models.gpt_neox import GPTNeoXConfig, abstract_model, model_flops_per_token
from llmcxr_jax.train import chunked_loss, lm_data, lm_samples, optim, preemption, profiling, tensorboard, topologies
from llmcxr_jax.train import state as state_lib
from llmcxr_jax.train.metrics import MetricsLog, claim_workdir

BATCH_AXES = sharding.BATCH_AXES


class NonFiniteLoss(UsageError):
    """The loss became NaN/Inf; the message names the step, the batch and the last good checkpoint."""


# ---------------------------------------------------------------- the step

def token_losses(params, graphdef, batch, logits_chunk: int = 0,
                 predictions: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum of masked next-token cross entropies and the sums behind the text / image split.
    logits_chunk (train.logits_chunk): 0 = the whole rows' logits at once; N = N positions at a time.
    predictions (the held-out evaluation): the dict also holds "predictions", the argmax next tokens [rows, length]."""
    model = nnx.merge(graphdef, params)
    x = model.hidden_states(batch["input_ids"], segment_ids=batch["segment_ids"], position_ids=batch["positions"])
    ce = chunked_loss.token_cross_entropy(model.head_logits, x, batch["targets"], logits_chunk, predictions)
    ce, argmax = ce if predictions else (ce, None)  # [rows, length] each
    mask = batch["loss_mask"].astype(jnp.float32)
    image = (batch["modality"] == 1).astype(jnp.float32) * mask
    text = mask - image
    sums = {"tokens": jnp.sum(mask), "text_tokens": jnp.sum(text), "image_tokens": jnp.sum(image),
            "text_loss_sum": jnp.sum(ce * text), "image_loss_sum": jnp.sum(ce * image)}
    if predictions:
        sums["predictions"] = argmax
    return jnp.sum(ce * mask), sums


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)


SUM_KEYS = ("tokens", "text_tokens", "image_tokens", "text_loss_sum", "image_loss_sum")


def accumulate_gradients(params, graphdef, batch, grad_accum: int, logits_chunk: int = 0):
    """Gradient of the summed masked loss over grad_accum micro-batches (a lax.scan), divided by
    the total token count: the same mean-over-tokens gradient as one batch of all the rows."""
    grad_fn = jax.value_and_grad(lambda p, g, b: token_losses(p, g, b, logits_chunk), has_aux=True)
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
                    schedule: optax.Schedule, logits_chunk: int = 0) -> Callable:
    """(state, batch) -> (state, metrics); loss = mean over every loss_mask token of the batch."""

    def train_step(state, batch):
        params = state["params"]
        grads, sums = accumulate_gradients(params, graphdef, batch, grad_accum, logits_chunk)
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


def make_eval_step(graphdef, logits_chunk: int = 0) -> Callable:
    """(params, batch) -> (the loss sums of token_losses, the batch's first row with its argmax predictions: the
    lm_samples.ROW_KEYS fields and "predictions", [length] each)."""
    def eval_step(params, batch):
        _, sums = token_losses(params, graphdef, batch, logits_chunk, predictions=True)
        row = {k: batch[k][0] for k in lm_samples.ROW_KEYS} | {"predictions": sums.pop("predictions")[0]}
        return sums, row

    return eval_step


# ---------------------------------------------------------------- the jitted step

@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted train step and what its arguments look like; built only by jit_train_step."""

    fn: Callable  # jax.jit of make_train_step: (state, batch) -> (state, metrics), the state donated
    tx: optax.GradientTransformation  # the optimizer whose state is state["opt"]
    abstract_state: Any  # ShapeDtypeStruct leaves of {"params", "opt", "step"}, each with its sharding
    state_shardings: Any  # the NamedSharding tree of the state (in and out)
    batch_sharding: NamedSharding  # every batch array: rows over the data x fsdp axes
    graphdef: Any  # the model's nnx graphdef (the eval step merges params into it too)


def jit_train_step(config: ml_collections.ConfigDict, model_config: GPTNeoXConfig, layout: vocab.VocabLayout,
                   mesh: Mesh) -> TrainStep:
    """The one jax.jit of the train step, its shardings and donation: what train() runs and
    lower_train_step (compile-check) lowers, so a compile check proves what training runs."""
    t = config.train
    tx = optim.make_optimizer(t, state_lib.abstract_params(model_config), layout)
    abstract, state_sh = state_lib.state_shardings(model_config, tx, mesh)
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    graphdef = nnx.graphdef(abstract_model(model_config))
    fn = jax.jit(make_train_step(graphdef, tx, int(t.grad_accum), optim.learning_rate(t), int(t.logits_chunk)),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
    return TrainStep(fn, tx, abstract, state_sh, batch_sh, graphdef)


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding: NamedSharding) -> dict[str, Any]:
    """The global batch of train.batch_size rows of data.seq_len as packing.BATCH_SPEC lays it out."""
    shape = (int(config.train.batch_size), int(config.data.seq_len))
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding) for k, dt in packing.BATCH_SPEC.items()}


def lower_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.stages.Lowered:
    """jit_train_step lowered with abstract state and batch (no data, no allocation): what
    `llmcxr compile-check` compiles for a TPU/GPU topology. The vocabulary comes from
    model.text_size + model.image_codes."""
    m = config.model
    _check_batch(config, mesh)
    layout = vocab.VocabLayout.create(int(m.text_size), int(m.image_codes), mesh.shape["tensor"])
    step = jit_train_step(config, GPTNeoXConfig.from_config(m, layout), layout, mesh)
    return step.fn.lower(step.abstract_state, abstract_batch(config, step.batch_sharding))


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
        raise UsageError(f"train.batch_size {t.batch_size} does not split into train.grad_accum {t.grad_accum} "
                         "micro-batches; make it a multiple")
    chunked_loss.check_chunk(int(config.data.seq_len), int(t.logits_chunk))
    micro = t.batch_size // t.grad_accum
    if micro % data or t.batch_size % jax.process_count():
        raise UsageError(f"micro-batch of {micro} rows (train.batch_size / grad_accum) does not divide over {data} "
                         f"data x fsdp devices and {jax.process_count()} processes; make it a multiple of {data}")


def global_batch(host: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of the batch's packing.BATCH_SPEC arrays -> global arrays over `mesh`."""
    return sharding.global_batch({k: host[k] for k in packing.BATCH_SPEC}, mesh, PartitionSpec(BATCH_AXES))


def _describe(pipe, example_ids: np.ndarray) -> list[str]:
    out = []
    for i in example_ids.ravel():
        if i >= 0:
            ref = pipe.describe(int(i))
            out.append(f"{ref.task}:{ref.dicom_id or ref.source_index}")
    return out


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """What the training loop reads besides the train state (which every step replaces)."""

    config: ml_collections.ConfigDict  # the run's config: train.* cadences and steps, data.seq_len
    workdir: str  # metrics.jsonl and tensorboard/ are written here
    start: state_lib.Start  # the model config (for MFU) and the source named in the summary
    data_iter: Any  # this process's checkpointable iterator of host batches (lm_data.train_iterator)
    pipe: lm_batches.LmBatches  # maps example ids back to examples for the non-finite-loss message
    eval_pipe: lm_batches.LmBatches | None  # held-out batches; None when train.eval_every is 0
    step_fn: Callable  # jit_train_step's fn: (state, batch) -> (state, metrics), the state donated
    eval_fn: Callable  # make_eval_step's (params, batch) -> (loss sums, first row with predictions), replicated
    ckpt: checkpoint.TrainCheckpointer  # WORKDIR/checkpoints; the loop closes it
    metadata: dict[str, Any]  # the "metadata" item saved with every checkpoint
    mesh: Mesh  # batches are laid out over its data x fsdp axes
    stop_after: int | None  # stop after this many steps of this call (a simulated interruption); None: run on
    echo: bool  # print a progress line at each logged step
    graphdef: Any = None  # the model's graph (with params: the model the sampler gets)
    samples: Callable | None = None  # model -> (markdown, grid rows) at each eval step (infer/train_samples.py)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          echo: bool = True, sampler: Callable | None = None) -> dict[str, Any]:
    """Train (or resume) in `workdir` until train.steps. stop_after simulates an interruption
    after that many steps of this call. sampler(config, start, sources, mesh) -> None or a function of the model
    giving (markdown, grid rows) to log at each eval step (the CLI passes infer/train_samples.sampler: this
    layer cannot import infer/). Returns a summary dict."""
    t, d = config.train, config.data
    mesh = sharding.make_mesh(t.mesh, num_slices=t.num_slices)
    _check_batch(config, mesh)
    profiling.parse_profile_steps(t.profile_steps, t.steps)  # a bad spec fails before any work
    sources = lm_data.read_sources(d)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    source = state_lib.start_source(config, ckpt_dir)
    if source == ("run", ckpt_dir):  # newer steps whose metadata is damaged are moved aside before it is read
        checkpoint.set_aside_damaged_items(ckpt_dir)
    claim_workdir(workdir, config, {"model": "model config", "data.stage": "data stage"})
    with jax.set_mesh(mesh):
        start = state_lib.resolve_start(config, mesh, sources.codebook_size, source)
        if start.layout.image_codes != sources.codebook_size:
            raise UsageError(f"the model has {start.layout.image_codes} image rows but data.codes uses a codebook "
                             f"of {sources.codebook_size}")
        step = jit_train_step(config, start.config, start.layout, mesh)
        placement = sharding.check_param_sharding(abstract_model(start.config), mesh)
        data_iter, pipes = lm_data.train_iterator(sources, start.tokenizer, start.special, start.layout, d,
                                                  t.batch_size)
        # validated once; each evaluation reads its first eval_batches from a fresh iterator
        eval_pipe = lm_data.make_batches(sources, "held_out", start.tokenizer, start.special, start.layout, d,
                                         t.batch_size) if t.eval_every else None
        ckpt = checkpoint.TrainCheckpointer(ckpt_dir, keep=t.keep_checkpoints)
        if start.resume_dir is not None:
            src = (checkpoint.TrainCheckpointer(start.resume_dir, keep=t.keep_checkpoints)
                   if start.resume_dir != ckpt_dir else ckpt)
            # the newest intact step; damaged newer ones of this run are moved aside (warned once)
            _, state, _ = src.restore_intact(step.abstract_state, lm_batches.checkpoint_args(data_iter, restore=True),
                                             move_aside=src is ckpt)
            if src is not ckpt:
                src.close()
        else:
            state = state_lib.create_state(start, step.tx, mesh, t.seed)
        metadata = checkpoint.lm_metadata(start.config, start.layout, start.special, mesh, start.hf_config)
        metadata.update(stage=int(d.stage), source=start.source, param_bytes_per_device=placement["bytes_per_device"])
        if jax.process_index() == 0:
            vocab.save_tokenizer(start.tokenizer, start.tokenizer_config or {},
                                 os.path.join(ckpt_dir, checkpoint.TOKENIZER_DIR))
        eval_fn = jax.jit(make_eval_step(step.graphdef, int(t.logits_chunk)),
                          in_shardings=(step.state_shardings["params"], step.batch_sharding),
                          out_shardings=NamedSharding(mesh, PartitionSpec()))
        samples = sampler(config, start, sources, mesh) if sampler is not None else None
        run = TrainRun(config=config, workdir=workdir, start=start, data_iter=data_iter,
                       pipe=pipes[0],  # any shard's pipeline maps example ids back to examples
                       eval_pipe=eval_pipe, step_fn=step.fn, eval_fn=eval_fn, ckpt=ckpt, metadata=metadata,
                       mesh=mesh, stop_after=stop_after, echo=echo, graphdef=step.graphdef, samples=samples)
        return _loop(run, state)


def _evaluate(pipe, eval_batches: int, eval_fn, params, mesh: Mesh) -> tuple[dict[str, float], dict | None]:
    """-> (the held-out losses, the first batch's first row with its predictions; None without held-out data)."""
    totals: dict[str, float] = {}
    first_row = None
    for n, host in enumerate(pipe.iterator(num_epochs=1)):
        if n >= eval_batches:
            break
        sums, row = jax.device_get(eval_fn(params, global_batch(host, mesh)))
        first_row = row if first_row is None else first_row
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        return {}, None
    loss = (totals["text_loss_sum"] + totals["image_loss_sum"]) / max(totals["tokens"], 1.0)
    out = {"eval_loss": loss}
    if totals["text_tokens"]:
        out["eval_loss_text"] = totals["text_loss_sum"] / totals["text_tokens"]
    if totals["image_tokens"]:
        out["eval_loss_image"] = totals["image_loss_sum"] / totals["image_tokens"]
    return out, first_row


@dataclasses.dataclass(frozen=True)
class _Unchecked:
    """A step run since the host last read the device: its metrics (device arrays) and its batch's example ids."""

    step: int
    metrics: dict[str, jax.Array]
    example_ids: np.ndarray  # this host's [rows, examples per row] ids, -1 = none


def _sync(run: TrainRun, unchecked: list[_Unchecked], last_saved: int | None) -> tuple[float, dict[str, float]]:
    """One device->host read of the steps since the last one: NonFiniteLoss naming the FIRST of them whose loss is
    NaN/Inf and its batch; else (their summed token count, the newest step's metrics), and `unchecked` is emptied."""
    losses, tokens, newest = jax.device_get(([u.metrics["loss"] for u in unchecked],
                                             [u.metrics["tokens"] for u in unchecked], unchecked[-1].metrics))
    for u, loss in zip(unchecked, losses):
        if not np.isfinite(loss):
            good = os.path.join(run.ckpt.manager.directory, str(last_saved)) if last_saved is not None else "none"
            raise NonFiniteLoss(
                f"loss is {float(loss)} at step {u.step}; batch examples {_describe(run.pipe, u.example_ids)[:8]}; "
                f"last good checkpoint: {good}")
    unchecked.clear()
    return float(np.sum(tokens)), {k: float(v) for k, v in newest.items()}


def _loop(run: TrainRun, state: dict[str, Any]) -> dict[str, Any]:
    """Run steps until train.steps, stop_after or a preemption. The host reads the device's results only at log,
    eval and checkpoint steps and the last step, not every step (a read stalls the dispatch queue); each read
    checks every step since the previous one, so a NaN/Inf loss stops the run before any later checkpoint."""
    t, d = run.config.train, run.config.data
    data_iter, ckpt = run.data_iter, run.ckpt
    profiler = profiling.StepProfiler.from_config(t, run.workdir)
    log = MetricsLog(run.workdir, t.steps)
    flops_token = model_flops_per_token(run.start.config, d.seq_len)
    peak = (float(t.peak_flops) or topologies.peak_flops(jax.devices()[0])) * jax.device_count()
    step = int(jax.device_get(state["step"]))
    board = _board(run, step)
    last_saved = ckpt.latest_step()
    unchecked: list[_Unchecked] = []  # the steps since the last host read
    done_here, steps_since, t_last, tokens_since = 0, 0, time.perf_counter(), 0.0  # the last three: this log window
    stop = preemption.StopAgreement(step)
    try:
        while step < t.steps:
            profiler.before_step(step + 1)
            with profiler.annotate(step + 1):  # the step's marker in a trace: its batch and its dispatch
                host = next(data_iter)
                state, metrics = run.step_fn(state, global_batch(host, run.mesh))
            step += 1
            done_here += 1
            steps_since += 1
            unchecked.append(_Unchecked(step, metrics, np.array(host["example_ids"])))
            preempted = stop.reached(step)  # the same step in every process: the save below is collective
            last = step == t.steps or (run.stop_after is not None and done_here >= run.stop_after) or preempted
            profiler.after_step(step, (state, metrics), last)
            log_now = step % t.log_every == 0 or step == 1 or last
            eval_now = bool(t.eval_every) and (step % t.eval_every == 0 or step == t.steps)
            save_now = step % t.checkpoint_every == 0 or last
            if log_now or eval_now or save_now:  # read (and check) before anything is logged, evaluated or saved
                tokens, values = _sync(run, unchecked, last_saved)
                tokens_since += tokens
            if log_now:
                now = time.perf_counter()
                values["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                values["step_time_s"] = (now - t_last) / steps_since
                if peak:
                    values["mfu"] = values["tokens_per_s"] * flops_token / peak
                values["dropped_too_long"] = float(sum(data_iter.dropped.values()))
                log.write(step, values, echo=run.echo)
                board.scalars(step, values)
                t_last, tokens_since, steps_since = time.perf_counter(), 0.0, 0
            if eval_now:
                values, row = _evaluate(run.eval_pipe, t.eval_batches, run.eval_fn, state["params"], run.mesh)
                if values:
                    log.write(step, values, echo=run.echo)
                    board.scalars(step, values)
                if row is not None and board.enabled:
                    board.text("held_out_predictions", step,
                               lm_samples.markdown(row, run.start.tokenizer, run.start.layout))
                if run.samples is not None:  # every process samples (collective jits); process 0 logs
                    table, grid = run.samples(nnx.merge(run.graphdef, state["params"]))
                    board.text("sampled_reports", step, table)
                    board.image("real_vs_drawn", step, grid)
            if save_now:
                ckpt.save(step, state, lm_batches.checkpoint_args(data_iter), run.metadata)
                last_saved = step
            if last:
                break
    finally:
        profiler.stop()
        ckpt.close()
        stop.close()
        board.close()
    return {"step": step, "checkpoints": str(ckpt.manager.directory), "preempted": stop.stopped,
            "metrics": log.path, "source": run.start.source, "processes": jax.process_count(),
            "devices": int(run.mesh.size)}


def _board(run: TrainRun, step: int) -> tensorboard.Board:
    """WORKDIR/tensorboard (process 0): the run config as hparams; a resumed run hides what an earlier attempt
    logged after its checkpoint."""
    board = tensorboard.Board(os.path.join(run.workdir, "tensorboard"), purge_from=step + 1 if step else None)
    board.hparams(tensorboard.flatten(run.config.to_dict()), ["loss", "eval_loss"])
    return board
