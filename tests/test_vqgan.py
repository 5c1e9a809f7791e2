"""The Flax VQ-GAN computes what taming's VQModel and diffusers' VQModel compute; interop is exact."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from vq_helpers import diffusers_vq, images, nchw, nhwc, taming_vq, tiny_config

from llmcxr_jax import checkpoint, cli, configs, sharding
from llmcxr_jax.convert import diffusers_vqgan, taming_vqgan
from llmcxr_jax.models import vqgan

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


encode = nnx.jit(lambda m, x: m.encode(x))
decode = nnx.jit(lambda m, c: m.decode(c))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random diffusers VQModel (f16-shaped, attention at the lowest level) and our import of it."""
    cfg = tiny_config()
    ref = diffusers_vq(cfg)
    d = str(tmp_path_factory.mktemp("dvq"))
    ref.save_pretrained(d)
    return ref, diffusers_vqgan.import_diffusers(d)


def test_codes_and_images_match_diffusers(pair):
    ref, ours = pair
    x = images(3)
    with torch.no_grad():
        h = ref.encode(nchw(x)).latents
        _, ref_loss, (_, _, idx) = ref.quantize(h)
        dec = nhwc(ref.decode(h).sample)
    codes, losses = encode(ours, jnp.asarray(x))
    assert codes.shape == (3, 16) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes).ravel(), idx.numpy().ravel())
    np.testing.assert_allclose(float(losses["quant_loss"]), float(ref_loss), rtol=1e-5)
    rec, rec_codes, _ = nnx.jit(lambda m, x: m.reconstruct(x))(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(rec), dec, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(decode(ours, codes)), dec, atol=1e-4, rtol=0)  # codes -> pixels


def test_quantizer_matches_diffusers(pair):
    ref, ours = pair
    z = np.random.default_rng(1).normal(size=(2, 4, 4, 32)).astype(np.float32)
    with torch.no_grad():
        zq, loss, (_, _, idx) = ref.quantize(nchw(z))
    ours_zq, ours_codes, ours_loss = ours.quantize(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(ours_codes).ravel(), idx.numpy().ravel())
    np.testing.assert_allclose(np.asarray(ours_zq), nhwc(zq), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(ours_loss["quant_loss"]), float(loss), atol=1e-5)


BLOCKS = [  # (ours, diffusers, input channels, spatial size)
    ("encoder.down.0.block.0", "encoder.down_blocks.0.resnets.0", 32, 64),
    ("encoder.down.2.block.0", "encoder.down_blocks.2.resnets.0", 32, 16),  # with nin_shortcut
    ("encoder.down.4.attn.0", "encoder.down_blocks.4.attentions.0", 128, 4),
    ("encoder.down.1.downsample", "encoder.down_blocks.1.downsamplers.0", 32, 32),
    ("encoder.mid", "encoder.mid_block", 128, 4),
    ("encoder.norm_out", "encoder.conv_norm_out", 128, 4),
    ("decoder.up.3.upsample", "decoder.up_blocks.1.upsamplers.0", 64, 8),
    ("decoder.up.4.block.1", "decoder.up_blocks.0.resnets.1", 128, 4),
    ("decoder.conv_out", "decoder.conv_out", 32, 64),
]


def _get(root, path):
    for p in path.split("."):
        root = root[int(p)] if p.isdigit() else getattr(root, p)
    return root


@pytest.mark.parametrize("ours_path,ref_path,channels,size", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_each_block_matches_diffusers(pair, ours_path, ref_path, channels, size):
    ref, ours = pair
    x = np.random.default_rng(2).normal(size=(2, size, size, channels)).astype(np.float32)
    ref_block = _get(ref, ref_path)
    with torch.no_grad():
        needs_temb = "resnets" in ref_path or "mid_block" in ref_path
        y = ref_block(nchw(x), None) if needs_temb else ref_block(nchw(x))
        if isinstance(y, tuple):
            y = y[0]
    np.testing.assert_allclose(np.asarray(_get(ours, ours_path)(jnp.asarray(x))), nhwc(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_group_norm_matches_torch_and_float64_far_from_zero(offset):
    """GroupNorm with its own scale and bias, on activations centred at 0 and at 300 with unit spread (where
    a variance taken as E[x^2] - E[x]^2, or an output taken as x * a + (bias - mean * a), loses digits in
    float32): equal to a float64 computation, and at 0 to torch.nn.GroupNorm."""
    import torch

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2, 8, 8, 64)) + offset).astype(np.float32)
    scale, bias = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    norm = vqgan.GroupNorm(tiny_config(), 64)
    norm.scale.set_value(jnp.asarray(scale))
    norm.bias.set_value(jnp.asarray(bias))
    got = np.asarray(norm(jnp.asarray(x)))
    g = x.astype(np.float64).reshape(2, 8, 8, 32, 2)
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    exact = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    np.testing.assert_allclose(got, exact, atol=1e-5 * np.abs(exact).max(), rtol=0)
    if offset == 0.0:
        ref = torch.nn.GroupNorm(32, 64, eps=1e-6)
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(scale))
            ref.bias.copy_(torch.from_numpy(bias))
            want = nhwc(ref(nchw(x)))
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_taming_modules_load_our_export_strictly_and_agree(pair, tmp_path):
    _, ours = pair
    path = str(tmp_path / "vq.ckpt")
    taming_vqgan.write_ckpt(ours, path)
    sd = torch.load(path, weights_only=True)["state_dict"]
    ref = taming_vq(ours.cfg)
    ref.load_state_dict(sd, strict=True)
    x = images(2, seed=3)
    with torch.no_grad():
        quant, loss, (_, _, idx) = ref.encode(nchw(x))
        dec = nhwc(ref.decode(quant))
    codes, losses = encode(ours, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(codes).ravel(), idx.numpy().ravel())
    np.testing.assert_allclose(float(losses["quant_loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(decode(ours, codes)), dec, atol=1e-4, rtol=0)


def _flat(model):
    return {k: np.asarray(v) for k, v in taming_vqgan.flat_params(model).items()}


def test_round_trips_are_exact(pair, tmp_path):
    _, ours = pair
    taming_vqgan.write_ckpt(ours, str(tmp_path / "a.ckpt"))
    back, ignored = taming_vqgan.from_taming_state_dict(taming_vqgan.read_ckpt(str(tmp_path / "a.ckpt")), ours.cfg)
    assert ignored == []
    diffusers_vqgan.export_diffusers(ours, str(tmp_path / "d"))
    back2 = diffusers_vqgan.import_diffusers(str(tmp_path / "d"))
    a = _flat(ours)
    for other in (_flat(back), _flat(back2)):
        assert set(other) == set(a)
        for k in a:
            np.testing.assert_array_equal(other[k], a[k])
    from diffusers import VQModel

    reloaded = VQModel.from_pretrained(str(tmp_path / "d")).eval()  # diffusers reproduces our decode
    codes, _ = encode(ours, jnp.asarray(images(1, seed=4)))
    with torch.no_grad():
        latents = reloaded.quantize.embedding.weight[torch.tensor(np.asarray(codes))].reshape(1, 4, 4, 32)
        dec = nhwc(reloaded.decode(latents.permute(0, 3, 1, 2), force_not_quantize=True).sample)
    np.testing.assert_allclose(np.asarray(decode(ours, codes)), dec, atol=1e-4, rtol=0)


def test_architecture_inferred_from_shapes_and_yaml(pair, tmp_path):
    _, ours = pair
    sd = taming_vqgan.to_taming_state_dict(ours)
    assert taming_vqgan.config_from_state_dict(sd, resolution=64) == ours.cfg
    yaml_path = tmp_path / "vq.yaml"
    yaml_path.write_text(
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 32\n    n_embed: 64\n"
        "    ddconfig:\n      double_z: false\n      z_channels: 32\n      resolution: 64\n      in_channels: 3\n"
        "      out_ch: 3\n      ch: 32\n      ch_mult: [1, 1, 2, 2, 4]\n      num_res_blocks: 1\n"
        "      attn_resolutions: [4]\n      dropout: 0.0\n")
    assert taming_vqgan.config_from_yaml(str(yaml_path)) == ours.cfg


def test_f16_1024_matches_taming_parameter_count():
    c = configs.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "vqgan_f16_1024.py:f16_1024"))
    cfg = vqgan.VQGANConfig(**c.model)
    assert cfg.codes_per_image == 256 and cfg.latent_size == 16
    with torch.device("meta"):
        ref = taming_vq(cfg)
    names = taming_vqgan.to_taming_state_dict_names(cfg)
    assert sorted(names) == sorted(ref.state_dict())
    ours = sum(int(np.prod(v.shape)) for v in taming_vqgan.flat_params(vqgan.abstract_vqgan(cfg)).values())
    assert ours == sum(p.numel() for p in ref.parameters())


def test_straight_through_gives_the_encoder_gradients(pair):
    _, ours = pair
    x = jnp.asarray(images(2, seed=5))

    def loss(m):
        rec, _, losses = m.reconstruct(x)
        return jnp.mean(jnp.abs(rec - x)) + losses["quant_loss"]

    grads = nnx.jit(nnx.grad(loss))(ours)
    enc = np.asarray(grads.encoder.conv_in.kernel.get_value())
    book = np.asarray(grads.quantize.embedding.get_value())
    assert np.abs(enc).sum() > 0 and np.isfinite(enc).all()
    assert np.abs(book).sum() > 0  # the codebook term reaches the used codes


# ------------------------------------------------------------------ CLI and bad input


def test_cli_import_and_export_vqgan(pair, tmp_path, capsys):
    _, ours = pair
    sd = taming_vqgan.to_taming_state_dict(ours)
    sd["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)  # the training loss rides along
    src = str(tmp_path / "llmcxr_vqgan.ckpt")
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 590000}, src)
    ck = str(tmp_path / "ck")
    assert cli.main(["import-vqgan", "--taming", src, "--out", ck, "--resolution", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ignored_loss_tensors"] == 1 and out["codes_per_image"] == 16
    model, meta = checkpoint.load_vqgan(ck, sharding.make_mesh("-1,1,1"))
    assert meta["vqgan_config"] == ours.cfg.to_dict()
    assert cli.main(["export-vqgan", "--ckpt", ck, "--format", "taming", "--out", str(tmp_path / "x.ckpt")]) == 0
    assert cli.main(["export-vqgan", "--ckpt", ck, "--format", "diffusers", "--out", str(tmp_path / "dd")]) == 0
    back = taming_vqgan.read_ckpt(str(tmp_path / "x.ckpt"))
    for k, v in taming_vqgan.to_taming_state_dict(ours).items():
        np.testing.assert_array_equal(back[k], v)
    assert os.path.isfile(str(tmp_path / "dd" / "diffusion_pytorch_model.safetensors"))


def test_cli_imports_a_diffusers_directory(pair, tmp_path, capsys):
    """`import-vqgan --diffusers` reads what diffusers' own save_pretrained writes; the result encodes
    as the diffusers model does. Taming-only options are refused with it."""
    ref, ours = pair
    hf = str(tmp_path / "hf_vq")
    ref.save_pretrained(hf)
    assert cli.main(["import-vqgan", "--diffusers", hf, "--out", str(tmp_path / "ck")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["config"] == ours.cfg.to_dict() and out["ignored_loss_tensors"] == 0
    model, meta = checkpoint.load_vqgan(str(tmp_path / "ck"), sharding.make_mesh("-1,1,1"))
    assert meta["source"] == os.path.abspath(hf)
    x = images(2)
    with torch.no_grad():
        _, _, (_, _, idx) = ref.quantize(ref.encode(nchw(x)).latents)
    np.testing.assert_array_equal(np.asarray(encode(model, jnp.asarray(x))[0]).reshape(-1), idx.numpy().reshape(-1))
    assert cli.main(["import-vqgan", "--diffusers", hf, "--out", str(tmp_path / "c2"), "--resolution", "64"]) == 2
    assert "--resolution are for --taming" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one source, not both
        cli.main(["import-vqgan", "--diffusers", hf, "--taming", "x.ckpt", "--out", str(tmp_path / "c3")])


def test_wrong_image_size_or_channels(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"give \[batch, 64, 64, 3\]"):
        ours.encode(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"give \[batch, 64, 64, 3\]"):
        ours.encode(jnp.zeros((1, 64, 64, 1)))


def test_codes_outside_the_codebook():
    with pytest.raises(ValueError, match=r"code 64 is outside the codebook \[0, 64\)"):
        vqgan.check_codes(np.array([[0, 64]]), 64)
    with pytest.raises(ValueError, match=r"code -1 is outside"):
        vqgan.check_codes(np.array([[-1, 3]]), 64)


def test_missing_extra_and_misshapen_tensors(pair):
    _, ours = pair
    sd = taming_vqgan.to_taming_state_dict(ours)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="lacks 1 tensors the config needs, e.g. decoder.conv_out.bias"):
        taming_vqgan.from_taming_state_dict(missing, ours.cfg)
    with pytest.raises(ValueError, match="has 1 tensors this config does not use, e.g. encoder.extra.weight"):
        taming_vqgan.from_taming_state_dict({**sd, "encoder.extra.weight": np.zeros(3)}, ours.cfg)
    bad = dict(sd, **{"quantize.embedding.weight": np.zeros((65, 32), np.float32)})
    implied = r"quantize.embedding.weight has shape \(65, 32\), the config implies \(64, 32\)"
    with pytest.raises(ValueError, match=implied):
        taming_vqgan.from_taming_state_dict(bad, ours.cfg)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_checkpoint_whose_pickle_calls_code_is_refused(tmp_path, capsys):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {}, "callback": Payload()}, path)  # tests/test_torch_files.py has more payloads
    code = cli.main(["import-vqgan", "--taming", path, "--out", str(tmp_path / "o")])
    err = capsys.readouterr()
    assert code == 2 and "refusing builtins.print" in err.err and "would run" not in err.out


def test_lm_checkpoint_is_not_a_vqgan(tmp_path, capsys):
    (tmp_path / "none").mkdir()
    code = cli.main(["export-vqgan", "--ckpt", str(tmp_path / "none"), "--format", "taming", "--out", "x.ckpt"])
    assert code == 2 and "holds no orbax checkpoint" in capsys.readouterr().err
