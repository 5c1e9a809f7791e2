"""PatchGAN discriminator: parity with taming's NLayerDiscriminator, conversion, global BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llmcxr_jax import sharding
from llmcxr_jax.models import discriminator as disc

CFG = disc.DiscriminatorConfig(input_channels=3, ndf=8, n_layers=3, dtype="float32", param_dtype="float32")
PREFIX = disc.DEFAULT_PREFIX
ATOL = 1e-5


def _images(batch, seed=0, size=64):
    # shifted and scaled so BatchNorm has non-trivial statistics to get right
    return np.random.default_rng(seed).normal(0.3, 1.5, (batch, size, size, CFG.input_channels)).astype(np.float32)


def _stats(model):
    return {k: v for k, v in disc.to_taming_state_dict(model).items() if "running" in k or "num_batches" in k}


def _train_step(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    out = model(x, train=True)
    return out, nnx.state(model, nnx.BatchStat)


@pytest.fixture(scope="module")
def initial_sd():
    """A freshly initialised model's state dict; tests rebuild models from it (init compiles slowly)."""
    return disc.to_taming_state_dict(disc.init_discriminator(CFG, seed=3))


@pytest.fixture(scope="module")
def torch_disc():
    torch = pytest.importorskip("torch")
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    torch.manual_seed(0)
    return NLayerDiscriminator(input_nc=CFG.input_channels, ndf=CFG.ndf, n_layers=CFG.n_layers).apply(weights_init)


@pytest.mark.torch
def test_parity_with_taming_train_and_eval(torch_disc):
    import torch

    # .numpy() views share memory with torch's buffers on purpose: the converter must copy, or
    # torch's in-place running-stat update below would leak into our model
    sd = {PREFIX + k: v.numpy() for k, v in torch_disc.state_dict().items()}
    assert disc.config_from_taming_state_dict(sd, dtype="float32", param_dtype="float32") == CFG
    model = disc.from_taming_state_dict(sd, CFG)
    x = _images(4)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

    torch_disc.train()
    with torch.no_grad():
        want = torch_disc(tx).numpy().transpose(0, 2, 3, 1)
    got = model(jnp.asarray(x), train=True)
    assert got.shape == want.shape == (4, 6, 6, 1) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
    torch_stats = {PREFIX + k: v.numpy() for k, v in torch_disc.state_dict().items()
                   if "running" in k or "num_batches" in k}
    ours = _stats(model)
    assert ours.keys() == torch_stats.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], torch_stats[k], atol=ATOL, rtol=0, err_msg=k)
    assert not np.allclose(ours[PREFIX + "main.3.running_var"], 1.0)  # the update did something

    torch_disc.eval()  # now with the running stats just updated
    x2 = _images(4, seed=1)
    with torch.no_grad():
        want = torch_disc(torch.from_numpy(x2.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    before = _stats(model)
    got = model(jnp.asarray(x2), train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
    after = _stats(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # eval leaves stats alone


@pytest.mark.torch
def test_round_trip_and_torch_strict_load(torch_disc, initial_sd):
    import torch

    model = disc.from_taming_state_dict(initial_sd, CFG)
    model(jnp.asarray(_images(4)), train=True)  # move running stats off their initial values
    sd = disc.to_taming_state_dict(model)
    back = disc.to_taming_state_dict(disc.from_taming_state_dict(sd, CFG))
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    assert sd[PREFIX + "main.3.num_batches_tracked"].dtype == np.int64
    assert int(sd[PREFIX + "main.3.num_batches_tracked"]) == 1

    fresh = type(torch_disc)(input_nc=CFG.input_channels, ndf=CFG.ndf, n_layers=CFG.n_layers)
    fresh.load_state_dict({k[len(PREFIX):]: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert np.array_equal(v.numpy(), sd[PREFIX + k]), k


def test_taming_init_statistics(initial_sd):
    sd = {k[len(PREFIX):]: v for k, v in initial_sd.items()}
    w = sd["main.8.weight"]  # 32 -> 64 conv, 32768 weights
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    g = sd["main.9.weight"]  # 64 channels of normal(1, 0.02)
    assert abs(g.mean() - 1.0) < 0.01 and 0.012 < g.std() < 0.028
    assert np.all(sd["main.9.bias"] == 0) and np.all(sd["main.9.running_mean"] == 0)
    assert np.all(sd["main.9.running_var"] == 1) and sd["main.9.num_batches_tracked"] == 0
    assert "main.2.bias" not in sd and "main.11.bias" in sd  # no conv bias before BatchNorm
    bound = 1 / np.sqrt(3 * 16)  # torch's default conv bias init, which weights_init keeps
    assert np.all(np.abs(sd["main.0.bias"]) <= bound) and np.abs(sd["main.0.bias"]).max() > bound / 2


def test_sharded_batch_uses_global_statistics(initial_sd):
    mesh = sharding.make_mesh("-1,1,1")
    assert mesh.shape["data"] == 8
    model = disc.from_taming_state_dict(initial_sd, CFG)
    graphdef, state = nnx.split(model)
    # one image per device and the second half rescaled: per-device statistics would differ a lot
    x = _images(8, seed=2)
    x[4:] = 3.0 * x[4:] - 2.0
    want_out, want_stats = jax.jit(_train_step, static_argnums=0)(graphdef, state, jnp.asarray(x))

    params_sharding = sharding.param_shardings(nnx.state(model, nnx.Param), mesh)  # every param has a rule
    assert all(s.spec == PartitionSpec(*(None,) * len(s.spec)) for s in jax.tree.leaves(params_sharding))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        got_out, got_stats = jax.jit(_train_step, static_argnums=0)(graphdef, state, xs)
    assert got_out.sharding.spec[0] in ("data", ("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=ATOL, rtol=0)
    for (path, a), (_, b) in zip(jax.tree.leaves_with_path(got_stats), jax.tree.leaves_with_path(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_compute_is_close_and_returns_float32(initial_sd):
    model = disc.from_taming_state_dict(initial_sd, CFG)
    bf = disc.from_taming_state_dict(initial_sd, disc.DiscriminatorConfig(3, 8, 3, "bfloat16", "float32"))
    x = jnp.asarray(_images(4, seed=5))
    ref, got = model(x, train=False), bf(x, train=False)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=0.05 * float(jnp.abs(ref).max()))


def test_bad_state_dicts_name_the_key(initial_sd):
    sd = dict(initial_sd)
    missing = dict(sd)
    del missing[PREFIX + "main.6.running_var"]
    with pytest.raises(ValueError, match=r"lacks 'loss\.discriminator\.main\.6\.running_var'"):
        disc.from_taming_state_dict(missing, CFG)
    extra = dict(sd, **{PREFIX + "main.4.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key 'loss\.discriminator\.main\.4\.weight'"):
        disc.from_taming_state_dict(extra, CFG)
    wrong = dict(sd, **{PREFIX + "main.5.weight": np.zeros((32, 16, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'loss\.discriminator\.main\.5\.weight' has shape \(32, 16, 3, 3\)"):
        disc.from_taming_state_dict(wrong, CFG)
    with pytest.raises(ValueError, match="has no 'vq.main.0.weight'"):
        disc.config_from_taming_state_dict(sd, "vq.", dtype="float32", param_dtype="float32")
    # keys outside the prefix (the rest of a taming .ckpt) are not the discriminator's business
    disc.from_taming_state_dict(dict(sd, **{"encoder.conv_in.weight": np.zeros(1)}), CFG)
