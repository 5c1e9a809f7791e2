"""The VQ-GAN objective against taming's own VQLPIPSWithDiscriminator (generator loss, adaptive
weight, discriminator loss, before and at disc_start), and the training step's EMA and dead-code
reseeding against their formulas restated here."""
import copy
import dataclasses
import importlib
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax import configs
from llmcxr_jax.convert import perceptual_weights as W
from llmcxr_jax.models import discriminator as disc_lib
from llmcxr_jax.models import perceptual as P
from llmcxr_jax.models.vqgan import VQGANConfig, init_vqgan
from llmcxr_jax.train import vqgan as train_vqgan
from llmcxr_jax.train import vqgan_loss

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py")
TOL = 1e-5
DISC_START = 3
# none of them 1, so that a dropped or misplaced weight shows
WEIGHTS = vqgan_loss.LossWeights(codebook_weight=0.7, perceptual_weight=0.9, cip_weight=0.0, disc_weight=0.8,
                                 disc_factor=0.6, disc_start=DISC_START)
DISC_CFG = disc_lib.DiscriminatorConfig(input_channels=3, ndf=8, n_layers=2, dtype="float32", param_dtype="float32")


def _close(got, want, what):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=TOL, atol=TOL,
                               err_msg=what)


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _vq_config(**overrides) -> VQGANConfig:
    cfg = configs.load_config(f"{CONFIG}:tiny").model.to_dict()
    cfg.update(resolution=16, ch_mult=(1, 2), attn_resolutions=(8,), **overrides)
    return VQGANConfig(**cfg)


def _taming_loss(features, lin_sd):
    """taming's VQLPIPSWithDiscriminator, its LPIPS on the given VGG16 features and lin weights (no
    download: torchvision is a stand-in, as in tests/perceptual_refs.py), its discriminator freshly
    initialised by taming's weights_init."""
    import perceptual_refs as refs
    import torch

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(vgg16=lambda pretrained: types.SimpleNamespace(features=features))
    with refs._stand_in_modules({"torchvision": tv}):
        vqp = importlib.import_module("taming.modules.losses.vqperceptual")
    lpips = refs.taming_lpips(features)
    lpips.load_state_dict(lin_sd, strict=False)
    real_lpips = vqp.LPIPS
    vqp.LPIPS = lambda: lpips
    try:
        torch.manual_seed(0)
        w = WEIGHTS
        loss = vqp.VQLPIPSWithDiscriminator(
            disc_start=w.disc_start, codebook_weight=w.codebook_weight, disc_num_layers=DISC_CFG.n_layers,
            disc_in_channels=DISC_CFG.input_channels, disc_factor=w.disc_factor, disc_weight=w.disc_weight,
            perceptual_weight=w.perceptual_weight, disc_ndf=DISC_CFG.ndf, disc_loss="hinge")
    finally:
        vqp.LPIPS = real_lpips
    assert loss.perceptual_loss is lpips
    loss.train()  # as Lightning runs it: the discriminator's BatchNorm on batch statistics
    # taming's LPIPS is in train mode there too, so its lin layers' dropout draws masks; its mean is
    # the eval-mode value, which is what we compute (deterministically)
    loss.perceptual_loss.eval()
    return loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Both sides on the same weights: (taming loss module, ours as a dict)."""
    torch = pytest.importorskip("torch")
    import perceptual_refs as refs

    torch.manual_seed(1)
    features = refs.vgg16_features()
    lin_sd = refs.random_lin_state_dict(seed=2)
    taming = _taming_loss(features, lin_sd)
    path = str(tmp_path_factory.mktemp("lpips") / "lpips.safetensors")
    vgg_sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    W.save_weights(W.convert_lpips(vgg_sd, lin_sd), path)
    lpips = W.load_lpips(path, P.LPIPSConfig(dtype="float32", param_dtype="float32"))
    lpips_apply, lpips_state = P.frozen_apply(lpips, "__call__")

    sd = {disc_lib.DEFAULT_PREFIX + k: v.numpy().copy() for k, v in taming.discriminator.state_dict().items()}
    disc = disc_lib.from_taming_state_dict(sd, DISC_CFG)
    disc_gd, disc_params, disc_stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    gen_gd, gen_params = nnx.split(init_vqgan(_vq_config(), seed=5), nnx.Param)
    ours = {"gen_gd": gen_gd, "gen": gen_params.to_pure_dict(), "disc_gd": disc_gd,
            "disc": disc_params.to_pure_dict(), "disc_stats": disc_stats.to_pure_dict(),
            "lpips_apply": lpips_apply, "lpips": lpips_state}
    return taming, ours


def _stats_sd(ours, stats):
    model = nnx.merge(ours["disc_gd"], ours["disc"], stats)
    return {k: v for k, v in disc_lib.to_taming_state_dict(model).items() if "running" in k or "num_batches" in k}


# The images of each case. Seed 2 (the batch step DISC_START - 1 once used) sits within float32 noise of a
# kink of the LPIPS gradient (a VGG ReLU or max-pool switching): taming's own d_weight moves by 4.4e-4
# relative when the images move by 1e-6, so any two float32 programs (eager and jitted JAX among them) could
# land on either side. Every case now checks its batch is clear of such a kink before comparing at 1e-5.
IMAGE_SEED = 10
ILL_CONDITIONED_SEED = 2


def _images(seed):
    return np.random.default_rng(seed).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def _taming_d_weight(taming, ours, images, step):
    """taming's adaptive weight for these images, the reconstruction made as in the test below."""
    import torch
    import torch.nn.functional as F

    gen = nnx.merge(ours["gen_gd"], ours["gen"])
    zq, _, qlosses = gen.quantize(gen.encode_latents(jnp.asarray(images)))
    features = gen.decoder.features(gen.post_quant_conv(zq))
    last = gen.decoder.conv_out
    kernel = torch.from_numpy(np.asarray(last.kernel.get_value()).transpose(3, 2, 0, 1).copy()).requires_grad_()
    rec = F.conv2d(_nchw(features), kernel, torch.from_numpy(np.asarray(last.bias.get_value()).copy()), padding=1)
    _, log = copy.deepcopy(taming)(torch.tensor(float(qlosses["quant_loss"])), _nchw(images), rec, 0, step,
                                   last_layer=kernel)
    return float(log["train/d_weight"])


def _d_weight_spread(taming, ours, images, step) -> float:
    """Relative spread of taming's d_weight over four 1e-6 relative perturbations of the images."""
    rng = np.random.default_rng(0)
    values = [_taming_d_weight(taming, ours, (images * (1 + 1e-6 * rng.standard_normal(images.shape))).astype(
        np.float32), step) for _ in range(4)]
    return (max(values) - min(values)) / abs(np.mean(values))


@pytest.mark.torch
@pytest.mark.slow
def test_the_ill_conditioned_batch_is_detected(setup):
    """The conditioning check below can fail: on seed 2's batch with LPIPS on, taming's own adaptive weight
    jumps under a 1e-6 change of the images, far beyond the 1e-5 the comparison uses."""
    taming, ours = setup
    taming = copy.deepcopy(taming)
    taming.perceptual_weight = 0.9
    assert _d_weight_spread(taming, ours, _images(ILL_CONDITIONED_SEED), DISC_START - 1) > 10 * TOL


@pytest.mark.torch
@pytest.mark.parametrize(("step", "perceptual_weight"), [
    (DISC_START - 1, 0.0), (DISC_START, 0.0), pytest.param(DISC_START, 0.9, marks=pytest.mark.slow),
    pytest.param(DISC_START - 1, 0.9, marks=pytest.mark.slow)])
def test_losses_and_adaptive_weight_match_taming(setup, step, perceptual_weight):
    """Optimizer 0 (generator) and 1 (discriminator) of taming's module on our decoder's last-layer
    input, with the reconstruction a function of the decoder's last conv kernel on both sides; the
    total loss, its nll / g_loss / d_weight parts, its gradient at that kernel (d_weight held constant),
    the hinge discriminator loss and the BatchNorm statistics after both calls."""
    import torch
    import torch.nn.functional as F

    taming, ours = setup
    taming = copy.deepcopy(taming)  # each case starts from the same running statistics
    taming.perceptual_weight = perceptual_weight
    weights = dataclasses.replace(WEIGHTS, perceptual_weight=perceptual_weight)
    images = _images(IMAGE_SEED + step)
    if perceptual_weight:  # clear of a kink of the LPIPS gradient, so float32 rounding cannot flip the answer
        assert _d_weight_spread(taming, ours, images, step) < TOL / 4
    gen = nnx.merge(ours["gen_gd"], ours["gen"])
    zq, _, qlosses = gen.quantize(gen.encode_latents(jnp.asarray(images)))
    features = gen.decoder.features(gen.post_quant_conv(zq))
    last = gen.decoder.conv_out
    kernel = torch.from_numpy(np.asarray(last.kernel.get_value()).transpose(3, 2, 0, 1).copy()).requires_grad_()
    bias = torch.from_numpy(np.asarray(last.bias.get_value()).copy())
    rec_t = F.conv2d(_nchw(features), kernel, bias, padding=1)
    x_t, codebook_t = _nchw(images), torch.tensor(float(qlosses["quant_loss"]))

    want_g, log_g = taming(codebook_t, x_t, rec_t, 0, step, last_layer=kernel)
    want_g.backward()
    want_d, log_d = taming(codebook_t, x_t, rec_t, 1, step, last_layer=kernel)

    def loss(gen_params, stats, lpips):  # the LPIPS weights an argument, as in training (not jit constants)
        return vqgan_loss.generator_loss(gen_params, ours["gen_gd"], ours["disc"], stats, ours["disc_gd"],
                                         jnp.asarray(images), jnp.asarray(step, jnp.int32), weights,
                                         lambda x, r: ours["lpips_apply"](lpips, x, r), None)

    (total, (metrics, stats, _, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        ours["gen"], ours["disc_stats"], ours["lpips"])
    rec = jnp.asarray(rec_t.detach().numpy().transpose(0, 2, 3, 1))
    d_loss, (d_metrics, stats) = jax.jit(vqgan_loss.discriminator_loss, static_argnums=(2, 6))(
        ours["disc"], stats, ours["disc_gd"], jnp.asarray(images), rec, jnp.asarray(step, jnp.int32), weights)

    assert float(log_g["train/disc_factor"]) == np.float32(WEIGHTS.disc_factor if step >= DISC_START else 0.0)
    _close(metrics["disc_factor"], log_g["train/disc_factor"], "disc_factor")
    _close(metrics["nll_loss"], log_g["train/nll_loss"], "nll")
    _close(metrics["g_loss"], log_g["train/g_loss"], "g_loss")
    _close(metrics["d_weight"], log_g["train/d_weight"], "d_weight")
    _close(metrics["quant_loss"], log_g["train/quant_loss"], "codebook loss")
    _close(total, want_g.detach(), "generator total")
    conv_out = grads["decoder"]["conv_out"]
    _close(np.asarray(conv_out["kernel"]).transpose(3, 2, 0, 1), kernel.grad.numpy(), "d total / d last kernel")
    _close(d_loss, want_d.detach(), "discriminator loss")
    _close(d_metrics["logits_real"], log_d["train/logits_real"], "logits_real")
    _close(d_metrics["logits_fake_d"], log_d["train/logits_fake"], "logits_fake")
    if step >= DISC_START:  # the GAN terms are really in play: not vanishing next to the rest
        assert abs(float(metrics["d_weight"] * metrics["g_loss"])) > 1e-3 and float(d_loss) > 0.1
    else:
        assert float(d_loss) == 0.0
    got_stats = _stats_sd(ours, stats)
    for k, v in taming.discriminator.state_dict().items():
        if "running" in k or "num_batches" in k:
            _close(got_stats[disc_lib.DEFAULT_PREFIX + k], v.numpy(), k)


# ------------------------------------------------------------------ EMA and dead-code reseeding

def _train_config():
    cfg = configs.load_config(f"{CONFIG}:tiny")
    for key, value in {"model.resolution": 16, "model.ch_mult": (1, 2), "model.attn_resolutions": (8,),
                       "train.batch_size": 8, "train.disc_start": 0, "train.reseed_every": 2,
                       "train.ema_decay": 0.9, "train.seed": 7}.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def _codes(nets, gen_params, images):
    gen = nnx.merge(nets.gen, gen_params)
    return np.asarray(gen.quantize(gen.encode_latents(images))[1]).reshape(-1)


@pytest.mark.slow  # ~50 s: compiles the whole train step
def test_ema_and_dead_code_reseeding_follow_their_rules():
    """Two steps with reseed_every 2: after the second, exactly the codes no batch of the window picked
    are set to encoder outputs (of the updated generator) drawn with fold_in(PRNGKey(seed), step), every
    other weight is the plain update's; the usage count restarts. EMA: ema = d * ema + (1 - d) * params
    after each step (reseed included), starting from the initial weights."""
    cfg = _train_config()
    t, n_embed = cfg.train, cfg.model.n_embed
    nets, state0 = train_vqgan.init_state(cfg)
    step_fn = jax.jit(train_vqgan.make_train_step(cfg, nets))
    rng = np.random.default_rng(3)
    batches = [jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)) for _ in range(2)]
    codes = [_codes(nets, state0["gen"], batches[0])]
    state1, m1 = step_fn(state0, {}, batches[0])
    codes.append(_codes(nets, state1["gen"], batches[1]))
    state2, m2 = step_fn(state1, {}, batches[1])
    # the same update at a step where no reseed is due (nothing else reads the step once the GAN is on)
    plain, _ = step_fn(dict(state1, step=jnp.asarray(2, jnp.int32)), {}, batches[1])

    np.testing.assert_array_equal(np.asarray(state1["usage"]), np.bincount(codes[0], minlength=n_embed))
    assert int(m1["reseeded_codes"]) == 0
    used = set(codes[0]) | set(codes[1])
    dead = np.array([c not in used for c in range(n_embed)])
    assert set(codes[0]) - set(codes[1]) and 0 < dead.sum() < n_embed  # the window and both branches matter
    assert int(m2["reseeded_codes"]) == dead.sum()
    np.testing.assert_array_equal(np.asarray(state2["usage"]), 0)

    book, plain_book = np.asarray(state2["gen"]["quantize"]["embedding"]), np.asarray(
        plain["gen"]["quantize"]["embedding"])
    np.testing.assert_array_equal(book[~dead], plain_book[~dead])
    assert not np.allclose(book[dead], plain_book[dead])
    latents = nnx.merge(nets.gen, plain["gen"]).encode_latents(batches[1])
    flat = np.asarray(latents).reshape(-1, latents.shape[-1])
    key = jax.random.fold_in(jax.random.PRNGKey(t.seed), 1)
    picks = flat[np.asarray(jax.random.randint(key, (n_embed,), 0, flat.shape[0]))]
    _close(book[dead], picks[dead], "reseeded codes")
    rest = {k: v for k, v in state2["gen"].items() if k != "quantize"}
    jax.tree.map(np.testing.assert_array_equal, rest, {k: v for k, v in plain["gen"].items() if k != "quantize"})

    d = t.ema_decay
    ema1 = jax.tree.map(lambda e, p: d * np.asarray(e) + (1 - d) * np.asarray(p), state0["gen"], state1["gen"])
    ema2 = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema1, state2["gen"])
    jax.tree.map(lambda g, w: _close(g, w, "ema after step 1"), state1["ema"], ema1)
    jax.tree.map(lambda g, w: _close(g, w, "ema after step 2"), state2["ema"], ema2)
    assert not np.allclose(ema2["quantize"]["embedding"], np.asarray(state2["gen"]["quantize"]["embedding"]))
