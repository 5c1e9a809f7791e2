"""The VQ-GAN objective: taming's VQLPIPSWithDiscriminator plus LLM-CXR's CIP loss.

Pure functions of (params, batch); train/vqgan.py jits them. The generator loss is
L1 + perceptual (the "nll"), plus the codebook loss, plus the hinge GAN generator term whose
weight is adaptive: |d nll / d W| / (|d g / d W| + 1e-4), clamped to [0, 1e4], times
disc_weight, with W the decoder's last conv kernel; the GAN terms switch on at disc_start.
Before that the discriminator still runs, as in taming (its BatchNorm statistics track the
batches, its Adam step count advances); disc_factor 0 instead leaves it out of every step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# (reference images, reconstructions) [b, H, W, C] in [-1, 1] -> per-image distance [b]
PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LossWeights:
    codebook_weight: float
    perceptual_weight: float
    cip_weight: float
    disc_weight: float
    disc_factor: float
    disc_start: int


def disc_apply(graphdef, params, stats, images, train: bool):
    """Pure discriminator call: -> (patch logits, updated BatchNorm statistics)."""
    disc = nnx.merge(graphdef, params, stats)
    logits = disc(images, train=train)
    return logits, nnx.state(disc, nnx.BatchStat).to_pure_dict()


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def disc_factor_at(w: LossWeights, step) -> jax.Array:
    return jnp.where(step >= w.disc_start, w.disc_factor, 0.0).astype(jnp.float32)


def uses_gan(w: LossWeights) -> bool:
    """disc_factor 0 switches the GAN off for the whole run: the discriminator is never called."""
    return w.disc_factor != 0


def generator_loss(gen_params, gen_graphdef, disc_params, disc_stats, disc_graphdef, images, step,
                   w: LossWeights, perceptual: PerceptualFn | None, cip: PerceptualFn | None):
    """-> (total loss, (metrics, discriminator statistics after its train-mode call, codes, latents)).
    Without the GAN (uses_gan false) the statistics come back unchanged and no GAN term is computed."""
    gen = nnx.merge(gen_graphdef, gen_params)
    z = gen.encode_latents(images)
    zq, codes, qlosses = gen.quantize(z)
    features = gen.decoder.features(gen.post_quant_conv(zq))
    last = gen.decoder.conv_out
    kernel = last.kernel.get_value()
    rec = last(features).astype(jnp.float32)

    def nll_fn(r):
        per_pixel = jnp.abs(images - r)
        if perceptual is not None and w.perceptual_weight > 0:
            per_pixel = per_pixel + w.perceptual_weight * perceptual(images, r)[:, None, None, None]
        return jnp.mean(per_pixel)

    def g_fn(r):
        logits, stats = disc_apply(disc_graphdef, disc_params, disc_stats, r, train=True)
        return -jnp.mean(logits), (stats, logits)

    metrics: dict[str, Any] = {}
    if uses_gan(w):
        nll, d_nll = jax.value_and_grad(nll_fn)(rec)
        (g_loss, (new_stats, logits_fake)), d_g = jax.value_and_grad(g_fn, has_aux=True)(rec)
        # taming's calculate_adaptive_weight: gradients of both terms at the last layer only
        _, to_kernel = jax.vjp(lambda k: last(features, kernel=k).astype(jnp.float32), kernel)
        nll_grad, g_grad = to_kernel(d_nll)[0], to_kernel(d_g)[0]
        d_weight = jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4)
        d_weight = jax.lax.stop_gradient(jnp.clip(d_weight, 0.0, 1e4) * w.disc_weight)
        factor = disc_factor_at(w, step)
        total = nll + d_weight * factor * g_loss + w.codebook_weight * qlosses["quant_loss"]
        metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=factor, logits_fake=jnp.mean(logits_fake))
    else:
        nll, new_stats = nll_fn(rec), disc_stats
        total = nll + w.codebook_weight * qlosses["quant_loss"]
    if cip is not None and w.cip_weight > 0:
        cip_loss = jnp.mean(cip(images, rec))
        total = total + w.cip_weight * cip_loss
        metrics["cip_loss"] = cip_loss
    if perceptual is not None and w.perceptual_weight > 0:
        metrics["perceptual"] = jnp.mean(jax.lax.stop_gradient(perceptual(images, rec)))
    mse = jnp.mean(jnp.square(images - rec))
    metrics.update(
        total_loss=total, nll_loss=nll, l1=jnp.mean(jnp.abs(images - rec)), psnr=10.0 * jnp.log10(4.0 / mse),
        **qlosses)
    return total, (metrics, new_stats, codes, z)


def discriminator_loss(disc_params, disc_stats, disc_graphdef, images, reconstructions, step, w: LossWeights):
    """Hinge loss on real vs (fixed) reconstructions; BatchNorm sees each set separately, as taming."""
    real, stats = disc_apply(disc_graphdef, disc_params, disc_stats, images, train=True)
    fake, stats = disc_apply(disc_graphdef, disc_params, stats, reconstructions, train=True)
    d_loss = disc_factor_at(w, step) * hinge_d_loss(real, fake)
    return d_loss, ({"d_loss": d_loss, "logits_real": jnp.mean(real), "logits_fake_d": jnp.mean(fake)}, stats)


def codebook_stats(codes: jax.Array, n_embed: int) -> dict[str, jax.Array]:
    """Perplexity of the batch's code histogram and the fraction of the codebook it uses."""
    counts = jnp.bincount(codes.reshape(-1), length=n_embed).astype(jnp.float32)
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"perplexity": jnp.exp(entropy), "codes_used": jnp.mean(counts > 0)}
