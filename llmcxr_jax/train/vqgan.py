"""VQ-GAN training: one jitted, data-parallel update (generator step, then discriminator step on
reconstructions from the updated generator, as taming's two Lightning optimizers do), orbax
checkpoints of the whole state and the data position, exact resume, metrics and image grids.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llmcxr_jax import checkpoint, sharding, storage
from llmcxr_jax.convert import perceptual_weights
from llmcxr_jax.data import image_stream as image_stream_lib
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.models import discriminator as discriminator_lib
from llmcxr_jax.models import perceptual as perceptual_nets
from llmcxr_jax.models.discriminator import DiscriminatorConfig, init_discriminator
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan
from llmcxr_jax.train import preemption, tensorboard, vqgan_loss
from llmcxr_jax.train.metrics import MetricsLog, claim_workdir, save_image_grid

BATCH_AXES = sharding.BATCH_AXES


@dataclasses.dataclass
class Nets:
    """Static halves: graphdefs of the trained networks, pure apply functions of the frozen ones
    (their weights travel as a step argument, never as jit constants)."""

    gen: Any
    disc: Any
    lpips: Callable | None = None  # (lpips state, images, reconstructions) -> [b]
    cip: Callable | None = None  # (densenet state, preprocessed images) -> [b, 1024]


def frozen_losses(nets: Nets, frozen: dict[str, Any]):
    """-> (perceptual fn, cip fn) of (images, reconstructions) -> per-image distance [b]."""
    def perceptual(x, r):
        return nets.lpips(frozen["lpips"], x, r)

    def cip(x, r):  # LLM-CXR's CIP loss: squared L2 between 1024-d features, averaged over features
        fx = nets.cip(frozen["cip"], perceptual_nets.cip_preprocess(x))
        fr = nets.cip(frozen["cip"], perceptual_nets.cip_preprocess(r))
        return jnp.mean(jnp.square(fx - fr), axis=-1)

    return (perceptual if nets.lpips is not None else None), (cip if nets.cip is not None else None)


def loss_weights(t: ml_collections.ConfigDict) -> vqgan_loss.LossWeights:
    return vqgan_loss.LossWeights(codebook_weight=t.codebook_weight, perceptual_weight=t.perceptual_weight,
                                  cip_weight=t.cip_weight, disc_weight=t.disc_weight, disc_factor=t.disc_factor,
                                  disc_start=t.disc_start)


def optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with a linear warmup over train.warmup_steps (0: constant rate, as taming)."""
    rate = t.learning_rate
    if t.warmup_steps > 0:
        rate = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optax.adam(rate, b1=t.adam_b1, b2=t.adam_b2)


def init_state(config: ml_collections.ConfigDict):
    """-> (Nets graphdefs, initial state pytree). State holds only arrays: orbax-friendly."""
    vq_cfg = VQGANConfig(**config.model)
    disc_cfg = DiscriminatorConfig(**config.discriminator)
    t = config.train
    gen = init_vqgan(vq_cfg, t.seed)
    disc = init_discriminator(disc_cfg, t.seed + 1)
    gen_gd, gen_params = nnx.split(gen, nnx.Param)
    disc_gd, disc_params, disc_stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    gen_params, disc_params = gen_params.to_pure_dict(), disc_params.to_pure_dict()
    tx = optimizer(t)
    state = {
        "gen": gen_params, "disc": disc_params, "disc_stats": disc_stats.to_pure_dict(),
        "opt_g": tx.init(gen_params), "opt_d": tx.init(disc_params),
        "ema": jax.tree.map(jnp.copy, gen_params) if t.ema_decay > 0 else {},
        "usage": jnp.zeros((vq_cfg.n_embed,), jnp.int32), "step": jnp.zeros((), jnp.int32),
    }
    return Nets(gen=gen_gd, disc=disc_gd), state


def initial_weights(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
    """train.init_from -> {"gen": params[, "disc": params, "disc_stats": running stats]} as pure
    dicts shaped like init_state's. A taming / LLM-CXR .ckpt gives the generator, and the
    discriminator too when it carries loss.discriminator.* (LLM-CXR fine-tunes the ImageNet
    f16/1024 VQ-GAN with its discriminator already on); an orbax VQ-GAN directory (import-vqgan, or
    a train-vqgan WORKDIR/vqgan) gives the generator. The architecture must be the config's."""
    from llmcxr_jax.convert import taming_vqgan

    path = config.train.init_from
    want = VQGANConfig(**config.model)
    if storage.path(path).is_file():
        if storage.is_remote(path):  # torch reads local files: copy the .ckpt next to us first
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "init.ckpt")
                storage.path(path).copy(local)
                sd = taming_vqgan.read_ckpt(local)
        else:
            sd = taming_vqgan.read_ckpt(path)
        try:
            gen = taming_vqgan.from_taming_state_dict(sd, want)[0]
            out = {"gen": nnx.state(gen, nnx.Param).to_pure_dict()}
            if any(k.startswith(discriminator_lib.DEFAULT_PREFIX) for k in sd):
                disc = discriminator_lib.from_taming_state_dict(sd, DiscriminatorConfig(**config.discriminator))
                _, params, stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
                out.update(disc=params.to_pure_dict(), disc_stats=stats.to_pure_dict())
        except ValueError as e:
            raise UsageError(f"train.init_from {path} does not fit the config's model / discriminator: {e}") from None
        return out
    model, _ = checkpoint.load_vqgan(path, mesh)
    have, need = model.cfg.to_dict(), want.to_dict()
    diff = [k for k in need if k not in ("dtype", "param_dtype") and have.get(k) != need[k]]
    if diff:
        raise UsageError(f"train.init_from {path} is a VQ-GAN with {diff[0]}={have.get(diff[0])!r}, the config says "
                         f"{need[diff[0]]!r}; make config.model match it")
    return {"gen": nnx.state(model, nnx.Param).to_pure_dict()}


def load_frozen_nets(config: ml_collections.ConfigDict, lpips_model=None, cip_model=None):
    """-> (lpips apply, cip apply, frozen states) for the terms whose weight is > 0. Models given
    here (tests use random weights) win over the weight files named in the config."""
    t, m = config.train, config.model
    frozen: dict[str, Any] = {}
    lpips_apply = cip_apply = None
    if t.perceptual_weight > 0:
        if lpips_model is None:
            lpips_model = perceptual_weights.load_lpips(
                t.lpips_weights, perceptual_nets.LPIPSConfig(dtype=m.dtype, param_dtype=m.param_dtype))
        lpips_apply, frozen["lpips"] = perceptual_nets.frozen_apply(lpips_model, "__call__")
    if t.cip_weight > 0:
        if cip_model is None:
            cip_model = perceptual_weights.load_txv_densenet(t.cip_weights, dtype=m.dtype, param_dtype=m.param_dtype)
        cip_apply, frozen["cip"] = perceptual_nets.frozen_apply(cip_model, "features")
    return lpips_apply, cip_apply, frozen


def reseed_dead_codes(gen_params, usage, latents, key, n_embed: int):
    """Codes unused since the last reseed take the values of random encoder outputs."""
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    picks = flat[jax.random.randint(key, (n_embed,), 0, flat.shape[0])]
    book = gen_params["quantize"]["embedding"]
    dead = (usage == 0)[:, None]
    new = dict(gen_params)
    new["quantize"] = {"embedding": jnp.where(dead, picks.astype(book.dtype), book)}
    return new, jnp.sum(dead)


def make_train_step(config: ml_collections.ConfigDict, nets: Nets) -> Callable:
    t = config.train
    w = loss_weights(t)
    tx = optimizer(t)
    n_embed = config.model.n_embed
    gan = vqgan_loss.uses_gan(w)

    def train_step(state, frozen, images):
        step = state["step"]
        perceptual, cip = frozen_losses(nets, frozen)
        (_, (metrics, stats, codes, latents)), g_grads = jax.value_and_grad(vqgan_loss.generator_loss, has_aux=True)(
            state["gen"], nets.gen, state["disc"], state["disc_stats"], nets.disc, images, step, w,
            perceptual, cip)
        updates, opt_g = tx.update(g_grads, state["opt_g"], state["gen"])
        gen = optax.apply_updates(state["gen"], updates)
        disc, opt_d = state["disc"], state["opt_d"]
        if gan:  # (without it, dead codes below reseed from the encoder outputs of the loss above)
            # the discriminator sees reconstructions of the updated generator, as in taming's loop
            new_gen = nnx.merge(nets.gen, gen)
            latents = new_gen.encode_latents(images)
            reconstructions = jax.lax.stop_gradient(new_gen.decode_latents(new_gen.quantize(latents)[0]))
            (_, (d_metrics, stats)), d_grads = jax.value_and_grad(vqgan_loss.discriminator_loss, has_aux=True)(
                disc, stats, nets.disc, images, reconstructions, step, w)
            d_updates, opt_d = tx.update(d_grads, opt_d, disc)
            disc = optax.apply_updates(disc, d_updates)
            metrics.update(d_metrics)
            metrics["d_grad_norm"] = optax.global_norm(d_grads)
        usage = state["usage"] + jnp.bincount(codes.reshape(-1), length=n_embed).astype(jnp.int32)
        if t.reseed_every > 0:
            due = (step + 1) % t.reseed_every == 0
            key = jax.random.fold_in(jax.random.PRNGKey(t.seed), step)
            reseeded, n_dead = reseed_dead_codes(gen, usage, jax.lax.stop_gradient(latents), key, n_embed)
            gen = jax.tree.map(lambda a, b: jnp.where(due, a, b), reseeded, gen)
            metrics["reseeded_codes"] = jnp.where(due, n_dead, 0)
            usage = jnp.where(due, jnp.zeros_like(usage), usage)
        ema = state["ema"]
        if t.ema_decay > 0:
            ema = jax.tree.map(lambda e, p: t.ema_decay * e + (1.0 - t.ema_decay) * p, ema, gen)
        metrics.update(vqgan_loss.codebook_stats(codes, n_embed))
        metrics["g_grad_norm"] = optax.global_norm(g_grads)
        new_state = {"gen": gen, "disc": disc, "disc_stats": stats, "opt_g": opt_g, "opt_d": opt_d, "ema": ema,
                     "usage": usage, "step": step + 1}
        return new_state, metrics

    return train_step


def image_stream(config: ml_collections.ConfigDict):
    """train.data: "shapes" (generated) or a MIMIC-CXR-JPG layout root (train split trains,
    validate/test images are held out)."""
    t, m = config.train, config.model
    if t.data == "shapes":
        return image_stream_lib.ShapeStream(t.seed, m.resolution, m.in_channels)
    train_paths, eval_paths = image_stream_lib.corpus_image_paths(t.data)
    return image_stream_lib.FileStream(train_paths, eval_paths, t.seed, m.resolution, m.in_channels)


def image_batches(config: ml_collections.ConfigDict, stream, start_index: int) -> Iterator[tuple[np.ndarray, int]]:
    """This host's share of each global batch, with the index of the next unseen image."""
    t = config.train
    per_host = t.batch_size // jax.process_count()
    index = start_index
    while True:
        first = index + jax.process_index() * per_host
        yield stream.images(range(first, first + per_host)), index + t.batch_size
        index += t.batch_size


def _check(config: ml_collections.ConfigDict, mesh, given: tuple[bool, bool] = (False, False)) -> None:
    t = config.train
    data_size = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % data_size or t.batch_size % jax.process_count():
        raise UsageError(f"train.batch_size {t.batch_size} does not divide over {data_size} data-parallel devices "
                         f"and {jax.process_count()} processes; make it a multiple of {data_size}")
    if (t.perceptual_weight > 0 and not (t.lpips_weights or given[0])) or \
            (t.cip_weight > 0 and not (t.cip_weights or given[1])):
        raise UsageError("perceptual_weight / cip_weight > 0 need train.lpips_weights / train.cip_weights: local "
                         "files made by `llmcxr convert-weights`; or set the weight to 0")
    if t.get("init_from") and not storage.path(t.init_from).exists():
        raise MissingInputError(f"train.init_from {t.init_from} does not exist; give a taming / LLM-CXR .ckpt or an "
                                "orbax VQ-GAN directory (llmcxr import-vqgan, or a train-vqgan WORKDIR/vqgan)")


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          lpips_model=None, cip_model=None, echo: bool = True) -> dict[str, Any]:
    """Train (or resume) in `workdir` until config.train.steps; stop_after simulates an
    interruption after that many steps of this call. Returns the final host state."""
    t = config.train
    mesh = sharding.make_mesh(t.mesh, num_slices=t.num_slices)
    _check(config, mesh, given=(lpips_model is not None, cip_model is not None))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # read (and check) the starting weights before the workdir is claimed: a mismatch changes nothing
    start = initial_weights(config, mesh) if t.get("init_from") and not checkpoint.has_checkpoint(ckpt_dir) else None
    claim_workdir(workdir, config, {"model": "model", "discriminator": "discriminator"})
    nets, state = init_state(config)
    nets.lpips, nets.cip, frozen = load_frozen_nets(config, lpips_model, cip_model)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = jax.tree.map(lambda _: replicated, state)
    frozen = jax.device_put(frozen, replicated)
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    step_fn = jax.jit(make_train_step(config, nets), in_shardings=(state_sh, replicated, batch_sh),
                      out_shardings=(state_sh, None), donate_argnums=(0,))
    ckpt = checkpoint.TrainCheckpointer(ckpt_dir, keep=t.keep_checkpoints)
    next_index = 0
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
        _, state, data_iter = ckpt.restore_intact(abstract)  # damaged newer steps are moved aside (warned once)
        next_index = int(data_iter["next_index"])
    else:
        if start is not None:
            start = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), {k: state[k] for k in start}, start)
            state.update(start)
            if t.ema_decay > 0:
                state["ema"] = jax.tree.map(jnp.copy, state["gen"])
        state = jax.device_put(state, state_sh)
    step = int(state["step"])
    log = MetricsLog(workdir, t.steps)
    metadata = {"vqgan_config": VQGANConfig(**config.model).to_dict(),
                "discriminator_config": DiscriminatorConfig(**config.discriminator).to_dict()}
    stop = preemption.StopAgreement(step)
    stream = image_stream(config)
    batches = image_batches(config, stream, next_index)
    reconstruct = jax.jit(lambda params, x: nnx.merge(nets.gen, params).reconstruct(x)[0])
    held_out = stream.held_out(t.grid_images)
    board = tensorboard.Board(os.path.join(workdir, "tensorboard"), purge_from=step + 1 if step else None)
    board.hparams(tensorboard.flatten(config.to_dict()), ["eval_l1", "eval_psnr"])
    done_here = 0
    try:
        if step == 0 and t.eval_every:
            _evaluate(workdir, 0, reconstruct, state, held_out, log, board)
        while step < t.steps:
            host_batch, next_index = next(batches)
            images = jax.make_array_from_process_local_data(batch_sh, host_batch)
            state, metrics = step_fn(state, frozen, images)
            step += 1
            done_here += 1
            if step % t.log_every == 0 or step == t.steps or step == 1:
                log.write(step, metrics, echo=echo)
                board.scalars(step, metrics)
            if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                _evaluate(workdir, step, reconstruct, state, held_out, log, board)
            preempted = stop.reached(step)  # the same step in every process: the save below is collective
            last = step == t.steps or (stop_after is not None and done_here >= stop_after) or preempted
            if step % t.checkpoint_every == 0 or last:
                ckpt.save(step, state, {"next_index": next_index}, metadata)
            if last:
                break
    finally:
        ckpt.close()
        stop.close()
        board.close()
    state = jax.device_get(state)
    if step == t.steps:
        export_model(state, nets, workdir)
    return state


def _evaluate(workdir: str, step: int, reconstruct, state, images: np.ndarray, log: MetricsLog,
              board: tensorboard.Board) -> None:
    """Reconstruction L1 / PSNR of the held-out batch (EMA weights when kept), and its grid (inputs over their
    reconstructions) as a PNG and in TensorBoard."""
    rec = np.asarray(reconstruct(state["ema"] if state["ema"] else state["gen"], jnp.asarray(images)))
    mse = float(np.mean(np.square(rec - images)))
    values = {"eval_l1": float(np.mean(np.abs(rec - images))), "eval_psnr": 10 * np.log10(4.0 / mse)}
    log.write(step, values, echo=False)
    board.scalars(step, values)
    board.image("reconstructions", step, [images, rec])
    if jax.process_index() == 0:
        save_image_grid(os.path.join(workdir, "images", f"reconstructions_{step:07d}.png"), [images, rec])


def export_model(state, nets: Nets, workdir: str, use_ema: bool = True):
    """The trained generator as an orbax VQ-GAN checkpoint under workdir/vqgan (for encode-images)."""
    params = state["ema"] if (use_ema and state["ema"]) else state["gen"]
    model = nnx.merge(nets.gen, params)
    out = os.path.join(workdir, "vqgan")
    if checkpoint.has_checkpoint(out):
        return model
    checkpoint.save_vqgan(out, model, step=int(state["step"]))
    return model
