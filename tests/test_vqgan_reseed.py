"""Dead-code reseeding with the GAN off (train.disc_factor 0): one jitted train step against the rule
restated in numpy: which codebook rows are dead, which encoder outputs they take, the Adam update of
the live rows, the EMA after the reseed, and a discriminator that nothing touches."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmcxr_jax import configs
from llmcxr_jax.train import vqgan as train_vqgan

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py")
TOL = 1e-5
# A two-level VQ-GAN at 16 px: 8x8 latents of 32 channels, 64 codes; 8 images = 512 latent vectors. The large
# codebook weight keeps every codebook gradient far above Adam's eps, where g / (|g| + eps) is well conditioned.
OVERRIDES = {"model.resolution": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (8,),
             "train.batch_size": 8, "train.disc_factor": 0.0, "train.reseed_every": 2, "train.ema_decay": 0.9,
             "train.codebook_weight": 40.0, "train.seed": 11}


def _config():
    cfg = configs.load_config(f"{CONFIG}:tiny")
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def _adam_first_step(param, grad, t):
    """optax.adam's first update (zero moments, bias-corrected), constant rate, in float64."""
    mu = (1 - t.adam_b1) * grad / (1 - t.adam_b1)
    nu = (1 - t.adam_b2) * np.square(grad) / (1 - t.adam_b2)
    return param - t.learning_rate * mu / (np.sqrt(nu) + 1e-8)


def test_without_the_gan_dead_codes_take_encoder_outputs_of_the_batch():
    """reseed_every 2, a step at index 1 (due) and the same step at index 0 (not due), from one state
    whose usage window already counts some codes. Dead = no use in the window, this batch included;
    a dead row takes the pre-update encoder output (the loss's latents: no second encoder pass without
    the GAN) at randint(fold_in(PRNGKey(seed), step), (n_embed,), 0, b*h*w); a live row gets Adam's
    update of codebook_weight * beta * d mean((e[code] - z)^2) / d e; EMA follows the reseeded weights;
    the discriminator, its statistics and its Adam state are never touched."""
    cfg = _config()
    t, m = cfg.train, cfg.model
    n_embed = m.n_embed
    nets, state0 = train_vqgan.init_state(cfg)
    images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32))

    # the step's inputs, restated: latents z of the starting generator, nearest codes by squared L2
    z = np.asarray(nnx.merge(nets.gen, state0["gen"]).encode_latents(images), np.float64)
    flat = z.reshape(-1, z.shape[-1])  # [b*h*w, embed_dim]
    book0 = np.asarray(state0["gen"]["quantize"]["embedding"], np.float64)
    codes = np.argmin(((flat[:, None, :] - book0[None]) ** 2).sum(-1), axis=-1)
    counts = np.bincount(codes, minlength=n_embed)
    # the window so far: four codes this batch does not pick, one it does
    unused = np.flatnonzero(counts == 0)
    earlier = np.zeros(n_embed, np.int32)
    earlier[unused[[0, 3, 7, 12]]] = [5, 1, 2, 9]
    earlier[codes[0]] = 3
    state0 = dict(state0, usage=jnp.asarray(earlier))
    dead = (earlier + counts) == 0
    assert 8 < dead.sum() < n_embed - 8 and (counts > 0).sum() > 2  # both kinds of row, several of each

    step_fn = jax.jit(train_vqgan.make_train_step(cfg, nets))
    due, m_due = step_fn(dict(state0, step=jnp.asarray(1, jnp.int32)), {}, images)
    plain, m_plain = step_fn(dict(state0, step=jnp.asarray(0, jnp.int32)), {}, images)

    # the window: counted without a reseed (the step's own codes are the numpy ones), restarted by one
    np.testing.assert_array_equal(np.asarray(plain["usage"]), earlier + counts)
    np.testing.assert_array_equal(np.asarray(due["usage"]), 0)
    assert int(m_plain["reseeded_codes"]) == 0 and int(m_due["reseeded_codes"]) == dead.sum()

    # live rows: Adam's first step on the codebook term's gradient (straight-through: nothing else reaches e)
    grad = np.zeros_like(book0)
    np.add.at(grad, codes, book0[codes] - flat)
    grad *= t.codebook_weight * m.beta * 2.0 / flat.size
    updated = _adam_first_step(book0, grad, t)
    book = np.asarray(due["gen"]["quantize"]["embedding"])
    plain_book = np.asarray(plain["gen"]["quantize"]["embedding"])
    np.testing.assert_allclose(book[~dead], updated[~dead], rtol=TOL, atol=1e-7, err_msg="live codes")
    np.testing.assert_allclose(plain_book, updated, rtol=TOL, atol=1e-7, err_msg="codebook, no reseed due")
    assert np.abs(book[counts > 0] - book0[counts > 0]).min() > 0.5 * t.learning_rate  # the update is there

    # dead rows: the latent vectors the documented draw picks, the same vector (not merely close) as the index says
    picks = np.asarray(jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(t.seed), 1), (n_embed,), 0,
                                          flat.shape[0]))
    np.testing.assert_allclose(book[dead], flat[picks[dead]], rtol=TOL, atol=1e-6, err_msg="reseeded codes")
    nearest = np.argmin(((book[dead][:, None, :] - flat[None]) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(nearest, picks[dead])

    # every other generator weight: the plain update, whatever the step index
    rest = [k for k in due["gen"] if k != "quantize"]
    jax.tree.map(np.testing.assert_array_equal, {k: due["gen"][k] for k in rest}, {k: plain["gen"][k] for k in rest})

    # EMA of the reseeded weights, from the starting weights
    d = t.ema_decay
    jax.tree.map(lambda e, p0, p: np.testing.assert_allclose(e, d * np.asarray(p0, np.float64) + (1 - d) * np.asarray(
        p, np.float64), rtol=TOL, atol=1e-8), due["ema"], state0["gen"], due["gen"])
    ema_book = np.asarray(due["ema"]["quantize"]["embedding"])
    np.testing.assert_allclose(ema_book[dead], d * book0[dead] + (1 - d) * flat[picks[dead]], rtol=TOL, atol=1e-7)

    # the discriminator: never called, never updated
    for key in ("disc", "disc_stats", "opt_d"):
        for got in (due, plain):
            jax.tree.map(np.testing.assert_array_equal, got[key], state0[key])
    assert not any(k.startswith(("d_", "g_loss", "logits", "disc")) for k in m_due)
