"""LPIPS-VGG16 v0.1 and torchxrayvision's DenseNet-121 (CIP features): parity with PyTorch, weight
conversion round trips, cip_preprocess facts and bad-input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax.convert import perceptual_weights as W
from llmcxr_jax.convert.torch_files import read_torch_state_dict
from llmcxr_jax.models import perceptual as P

LPIPS_CFG = P.LPIPSConfig(dtype="float32", param_dtype="float32")
TXV_CFG = P.txv_densenet121(dtype="float32", param_dtype="float32")
ATOL = 1e-4


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ LPIPS

@pytest.fixture(scope="module")
def lpips_torch():
    """(reference LPIPS, torchvision-layout vgg16 state dict, lpips lin state dict), random weights."""
    torch = pytest.importorskip("torch")
    import perceptual_refs as refs

    torch.manual_seed(0)
    features = refs.vgg16_features()
    ref = refs.LPIPSReference(features)
    lin_sd = refs.random_lin_state_dict(seed=1)
    ref.load_state_dict(lin_sd, strict=False)
    vgg_sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg_sd.update({"classifier.0.weight": torch.zeros(2, 3), "classifier.0.bias": torch.zeros(2)})  # ignored
    return ref, vgg_sd, lin_sd


@pytest.fixture(scope="module")
def lpips_arrays(lpips_torch):
    _, vgg_sd, lin_sd = lpips_torch
    return W.convert_lpips(vgg_sd, lin_sd)


@pytest.mark.torch
def test_lpips_parity_with_lpips_reference(lpips_torch, lpips_arrays, tmp_path):
    import torch

    ref = lpips_torch[0]
    path = str(tmp_path / "lpips.safetensors")
    W.save_weights(lpips_arrays, path)
    apply, state = P.frozen_apply(W.load_lpips(path, LPIPS_CFG), "__call__")
    fn = jax.jit(apply)
    x, y = _images((2, 64, 64, 3), 0), _images((2, 64, 64, 3), 1)
    with torch.no_grad():
        want = ref(_nchw(x), _nchw(y)).numpy()
    assert want.shape == (2, 1, 1, 1)
    got = fn(state, jnp.asarray(x), jnp.asarray(y))
    assert got.shape == (2,) and got.dtype == jnp.float32
    # the 1e-4 budget is loose here (float32 CPU agrees to ~1e-7): hold it to 1e-6 so that even a
    # 0.001 change in the ScalingLayer constants fails
    np.testing.assert_allclose(np.asarray(got), want.reshape(2), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(fn(state, jnp.asarray(x), jnp.asarray(x))), 0.0, atol=1e-7)
    gx, gy = x[..., :1], y[..., :1]  # a grayscale batch is scored as its RGB repeat
    with torch.no_grad():
        want = ref(_nchw(np.repeat(gx, 3, -1)), _nchw(np.repeat(gy, 3, -1))).numpy().reshape(2)
    np.testing.assert_allclose(np.asarray(fn(state, jnp.asarray(gx), jnp.asarray(gy))), want, atol=1e-6, rtol=0)


@pytest.mark.torch
def test_reference_is_tamings_lpips(lpips_torch, lpips_arrays):
    """The re-stated reference equals taming's LPIPS module (what VQLPIPSWithDiscriminator runs) on
    the same weights, and taming's state dict layout converts to the same arrays."""
    import perceptual_refs as refs
    import torch

    ref, vgg_sd, lin_sd = lpips_torch
    features = refs.vgg16_features()
    features.load_state_dict({k[len("features."):]: v for k, v in vgg_sd.items() if k.startswith("features.")})
    taming = refs.taming_lpips(features)
    taming.load_state_dict(lin_sd, strict=False)
    x, y = torch.from_numpy(_images((2, 3, 32, 32), 2)), torch.from_numpy(_images((2, 3, 32, 32), 3))
    with torch.no_grad():
        np.testing.assert_allclose(taming(x, y).numpy(), ref(x, y).numpy(), atol=1e-6, rtol=0)
    ckpt = {P.TAMING_LPIPS_PREFIX + k: v for k, v in taming.state_dict().items()}
    ckpt["encoder.conv_in.weight"] = torch.zeros(1)
    arrays = W.convert_lpips(*W.split_taming_lpips(ckpt))
    assert arrays.keys() == lpips_arrays.keys()
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], lpips_arrays[k], err_msg=k)


@pytest.mark.torch
def test_lpips_conversion_round_trip(lpips_torch, lpips_arrays, tmp_path):
    _, vgg_sd, lin_sd = lpips_torch
    vgg_back, lin_back = W.lpips_torch_state_dicts(lpips_arrays)
    assert vgg_back.keys() == {k for k in vgg_sd if k.startswith("features.")} and lin_back.keys() == lin_sd.keys()
    for k, v in {**vgg_back, **lin_back}.items():
        np.testing.assert_array_equal(v, (vgg_sd.get(k) if k in vgg_sd else lin_sd[k]).numpy(), err_msg=k)
    path = str(tmp_path / "w.safetensors")
    W.save_weights(lpips_arrays, path)
    loaded = W.to_arrays(W.load_lpips(path, LPIPS_CFG))
    assert loaded.keys() == lpips_arrays.keys()
    assert all(np.array_equal(loaded[k], lpips_arrays[k]) for k in loaded)
    assert loaded["features.0.kernel"].shape == (3, 3, 3, 64) and loaded["lin4.kernel"].shape == (1, 1, 512, 1)


def test_lpips_layout_and_bad_input(tmp_path):
    model = P.LPIPS(P.LPIPSConfig(dtype="bfloat16", param_dtype="bfloat16"), rngs=None)
    axes = {k: v.get_metadata()["logical_axes"] for k, v in W._flat_variables(model).items()}
    assert axes["features.28.kernel"] == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert axes["features.28.bias"] == ("conv_out",) and len(axes) == 13 * 2 + 5
    assert model.features[28].kernel.get_value().dtype == jnp.bfloat16
    lin = P.NetLinLayer(64, LPIPS_CFG, nnx.Rngs(params=0)).kernel.get_value()
    assert lin.shape == (1, 1, 64, 1) and 0 < float(jnp.abs(lin).max()) <= 64 ** -0.5
    arrays = W.to_arrays(model)
    vgg, lin = W.lpips_torch_state_dicts(arrays)
    with pytest.raises(ValueError, match="'features.14.weight'"):
        W.convert_lpips({k: v for k, v in vgg.items() if k != "features.14.weight"}, lin)
    with pytest.raises(ValueError, match="'lin2.model.1.weight'"):
        W.convert_lpips(vgg, {k: v for k, v in lin.items() if k != "lin2.model.1.weight"})
    with pytest.raises(ValueError, match=r"'features.0.weight' has shape \(64, 1, 3, 3\)"):
        W.convert_lpips({**vgg, "features.0.weight": np.zeros((64, 1, 3, 3))}, lin)
    with pytest.raises(ValueError, match="unexpected 'features.1.weight'"):  # e.g. vgg16_bn
        W.convert_lpips({**vgg, "features.1.weight": np.zeros(64)}, lin)
    with pytest.raises(FileNotFoundError, match="llmcxr convert-weights lpips"):
        W.load_lpips(str(tmp_path / "nope.safetensors"), LPIPS_CFG)
    W.save_weights({k: v for k, v in arrays.items() if k != "lin0.kernel"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="lacks 'lin0.kernel'"):
        W.load_lpips(str(tmp_path / "short.safetensors"), LPIPS_CFG)
    with pytest.raises(ValueError, match="no LPIPS"):
        W.split_taming_lpips({"encoder.conv_in.weight": np.zeros(1)})
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(x, x)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        model(jnp.zeros((1, 32, 32, 2)), jnp.zeros((1, 32, 32, 2)))


def test_unit_channels_gradient_is_finite_at_zero():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
    np.testing.assert_allclose(np.asarray(P._unit_channels(f))[0, 0, 0], [0.6, 0.8, 0, 0], atol=1e-7)
    g = jax.grad(lambda f: P._unit_channels(f).sum())(f)
    assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------------ DenseNet

@pytest.fixture(scope="module")
def txv_torch():
    """The real torchxrayvision DenseNet(weights=None), running stats calibrated on [-1024, 1024] inputs."""
    pytest.importorskip("torch")
    import perceptual_refs as refs

    return refs.random_txv_densenet(10, 0, weights=None)[1]


@pytest.mark.torch
def test_densenet_parity_with_torchxrayvision(txv_torch, tmp_path):
    import torch

    sd = txv_torch.state_dict()
    assert "classifier.weight" in sd and any(k.endswith("num_batches_tracked") for k in sd)
    arrays = W.convert_txv_densenet(sd)
    back = W.txv_densenet_torch_state_dict(arrays)
    assert back.keys() == {k for k in sd if k.startswith("features.") and not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(v, sd[k].numpy()) for k, v in back.items())
    path = str(tmp_path / "txv.safetensors")
    W.save_weights(arrays, path)
    model = W.load_txv_densenet(path, dtype="float32", param_dtype="float32")
    assert all(np.array_equal(v, arrays[k]) for k, v in W.to_arrays(model).items())
    apply, state = P.frozen_apply(model, "features")
    fn = jax.jit(apply)

    x = 1024 * _images((2, 224, 224, 1), 11)  # torchxrayvision's own input range and size
    with torch.no_grad():
        want = txv_torch.features2(_nchw(x)).numpy()
    got = np.asarray(fn(state, jnp.asarray(x)))
    assert want.shape == got.shape == (2, 1024) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    # end to end, as LLM-CXR feeds it: 256 px RGB VQ-GAN images in [-1, 1]. With input_resolution
    # set (as the pretrained weights set it), features2 resizes through xrv's own fix_resolution.
    rgb = _images((2, 256, 256, 3), 12)
    txv_torch.input_resolution = 224
    try:
        with torch.no_grad():
            want = txv_torch.features2(_nchw(1024 * rgb.mean(-1, keepdims=True))).numpy()
    finally:
        del txv_torch.input_resolution
    got = np.asarray(fn(state, P.cip_preprocess(jnp.asarray(rgb))))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_densenet_random_init_is_frozen():
    small = P.DenseNetConfig(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, in_channels=1,
                             dtype="float32", param_dtype="float32")
    assert small.num_features == (8 + 2 * 4) // 2 + 3 * 4 and TXV_CFG.num_features == 1024
    model = P.DenseNet(small, nnx.Rngs(params=0))
    stats = nnx.state(model, nnx.BatchStat)
    assert all(v.get_metadata()["logical_axes"] == ("norm",) for v in jax.tree.leaves(
        stats, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    with pytest.raises(ValueError, match="1 channel"):
        model.features(jnp.zeros((1, 32, 32, 3)))
    apply, state = P.frozen_apply(model, "features")
    x = jnp.asarray(1024 * _images((2, 32, 32, 1), 0))
    out = jax.jit(apply)(state, x)
    assert out.shape == (2, small.num_features) and out.dtype == jnp.float32 and float(jnp.abs(out).max()) > 0
    # frozen: gradients reach the images, never the weights
    g_state, g_x = jax.jit(jax.grad(lambda s, a: jnp.sum(apply(s, a) ** 2), argnums=(0, 1)))(state, x)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g_state))
    assert np.isfinite(np.asarray(g_x)).all() and float(jnp.abs(g_x).max()) > 0


def test_densenet_conversion_bad_input(tmp_path):
    full = {k: np.zeros(s, np.float32) for k, s in W._txv_shapes().items()}
    sd = W.txv_densenet_torch_state_dict(full)
    assert len(sd) == 120 + 121 * 4  # 120 convs, 121 BatchNorms (weight, bias, running mean and var)
    key = "features.denseblock3.denselayer24.conv2.weight"
    assert sd[key].shape == (32, 128, 3, 3)
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        W.convert_txv_densenet({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="unexpected 'features.denseblock4.denselayer17.norm1.weight'"):
        W.convert_txv_densenet({**sd, "features.denseblock4.denselayer17.norm1.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="'features.norm5.running_var' has shape"):
        W.convert_txv_densenet({**sd, "features.norm5.running_var": np.zeros(1023)})
    extra = {"classifier.weight": np.zeros((18, 1024)), "op_threshs": np.zeros(18),
             "features.norm0.num_batches_tracked": np.zeros((), np.int64)}
    assert W.convert_txv_densenet({**sd, **extra}).keys() == full.keys()
    with pytest.raises(FileNotFoundError, match="llmcxr convert-weights txv"):
        W.load_txv_densenet(str(tmp_path / "nope.safetensors"), dtype="float32", param_dtype="float32")


def test_cip_preprocess_facts():
    b = 2
    rgb = jnp.asarray(_images((b, 256, 256, 3), 0))
    out = P.cip_preprocess(rgb)
    assert out.shape == (b, 224, 224, 1) and out.dtype == jnp.float32
    assert -1024 <= float(out.min()) and float(out.max()) <= 1024
    # constants stay constant: the channel mean, scaled by 1024
    const = jnp.broadcast_to(jnp.asarray([0.5, -0.25, 1.0]), (1, 64, 64, 3))
    np.testing.assert_allclose(np.asarray(P.cip_preprocess(const)), 1024 * 1.25 / 3, rtol=1e-6)
    # grayscale 1-channel input equals its RGB repeat; 224 px input is only rescaled
    gray = jnp.asarray(_images((1, 224, 224, 1), 1))
    np.testing.assert_allclose(np.asarray(P.cip_preprocess(gray)), 1024 * np.asarray(gray), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(P.cip_preprocess(jnp.repeat(gray, 3, -1))), 1024 * np.asarray(gray),
                               rtol=1e-5, atol=1e-4)
    for bad in [(1, 256, 200, 3), (1, 256, 256, 2), (256, 256, 3)]:
        with pytest.raises(ValueError, match="square NHWC"):
            P.cip_preprocess(jnp.zeros(bad))


@pytest.mark.torch
@pytest.mark.parametrize("size", [256, 512, 112])
def test_cip_resize_matches_torchxrayvision_fix_resolution(size):
    """fix_resolution is F.interpolate(x, (224, 224), mode='bilinear', antialias=True)."""
    import torch

    x = _images((2, size, size, 1), size)
    want = torch.nn.functional.interpolate(_nchw(1024 * x), size=(224, 224), mode="bilinear",
                                           antialias=True).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(P.cip_preprocess(jnp.asarray(x))), want, atol=2e-3, rtol=0)


@pytest.mark.torch
def test_read_torch_state_dict(tmp_path):
    import torch

    path = str(tmp_path / "sd.pth")
    torch.save({"a.weight": torch.ones(2, 3, dtype=torch.bfloat16), "n": torch.tensor(3)}, path)
    sd = read_torch_state_dict(path)
    assert sd["a.weight"].dtype == np.float32 and sd["a.weight"].shape == (2, 3) and int(sd["n"]) == 3
    torch.save({"state_dict": {"b": torch.zeros(1)}}, path)
    assert list(read_torch_state_dict(path)) == ["b"]
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled model, like xrv's released .pt files
    with pytest.raises(ValueError, match="needs arbitrary unpickling"):
        read_torch_state_dict(path)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch file"):
        read_torch_state_dict(path)
    with pytest.raises(FileNotFoundError, match="vgg16 state dict .* does not exist"):
        read_torch_state_dict(str(tmp_path / "missing.pth"), what="vgg16 state dict")


@pytest.mark.torch
def test_convert_weights_cli(tmp_path, capsys):
    """`llmcxr convert-weights` writes files that load_lpips / load_txv_densenet read back."""
    import torch

    from llmcxr_jax import cli

    model = P.LPIPS(LPIPS_CFG, rngs=nnx.Rngs(1))
    vgg, lin = W.lpips_torch_state_dicts(W.to_arrays(model))
    torch.save({k: torch.tensor(np.array(v)) for k, v in vgg.items()}, str(tmp_path / "vgg16.pth"))
    torch.save({k: torch.tensor(np.array(v)) for k, v in lin.items()}, str(tmp_path / "vgg.pth"))
    out = str(tmp_path / "lpips.safetensors")
    assert cli.main(["convert-weights", "lpips", "--vgg16", str(tmp_path / "vgg16.pth"), "--lin",
                     str(tmp_path / "vgg.pth"), "--out", out]) == 0
    back = W.to_arrays(W.load_lpips(out, LPIPS_CFG))
    for k, v in W.to_arrays(model).items():
        np.testing.assert_array_equal(back[k], v)
    assert cli.main(["convert-weights", "txv", "--out", out]) == 2
    assert "txv needs --state-dict" in capsys.readouterr().err
