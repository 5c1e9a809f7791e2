"""torchxrayvision's DenseNet classifier: parity with the real xrv DenseNet (head and op_threshs
calibration included), its pathologies mapped to the CheXpert 14, the released operating points,
conversion from state dicts and whole pickled models, and conversion / loading errors."""
import ast
import importlib.util
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax.convert import perceptual_weights as W
from llmcxr_jax.data.mimic_cxr import CHEXPERT_LABELS
from llmcxr_jax.errors import MissingInputError, UsageError
from llmcxr_jax.eval import txv_classifier as T
from llmcxr_jax.models import perceptual as P
from llmcxr_jax.models import txv_classifier as M

# a small xrv DenseNet (xrv.models.DenseNet accepts these); the real one is txv_densenet121
TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, in_channels=1)
TINY_CFG = P.DenseNetConfig(**TINY, dtype="float32", param_dtype="float32")
NAN_AT = M.TXV_PATHOLOGIES.index("Cardiomegaly")  # a CheXpert finding whose threshold the tests make NaN


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _tiny_weights(seed=0, threshs=None) -> W.TxvClassifierWeights:
    model = M.DenseNetClassifier(TINY_CFG, len(M.TXV_PATHOLOGIES), nnx.Rngs(params=seed))
    if threshs is not None:
        model.op_threshs.set_value(jnp.asarray(threshs, jnp.float32))
    return W.classifier_weights(model, M.TXV_PATHOLOGIES)


# ------------------------------------------------------------------------- facts, no torch

def test_chexpert_mapping():
    assert tuple(T.CHEXPERT_TO_TXV) == CHEXPERT_LABELS
    assert {v for v in T.CHEXPERT_TO_TXV.values() if v} <= set(M.TXV_PATHOLOGIES)
    finite = np.full(18, 0.3, np.float32)
    cols = T.chexpert_columns(M.TXV_PATHOLOGIES, finite)
    want = {"Atelectasis": 0, "Cardiomegaly": 10, "Consolidation": 1, "Edema": 4, "Enlarged Cardiomediastinum": 17,
            "Fracture": 15, "Lung Lesion": 14, "Lung Opacity": 16, "No Finding": None, "Pleural Effusion": 7,
            "Pleural Other": None, "Pneumonia": 8, "Pneumothorax": 3, "Support Devices": None}
    assert dict(zip(CHEXPERT_LABELS, cols)) == want
    # weights that predict fewer pathologies ('' labels, NaN thresholds) leave those findings missing
    targets, threshs = M.released_weights("densenet121-res224-nih")
    lacks = {f for f, c in zip(CHEXPERT_LABELS, T.chexpert_columns(targets, threshs)) if c is None}
    assert lacks == {"No Finding", "Pleural Other", "Support Devices", "Lung Lesion", "Fracture", "Lung Opacity",
                     "Enlarged Cardiomediastinum"}
    targets, threshs = M.released_weights("densenet121-res224-rsna")
    assert [f for f, c in zip(CHEXPERT_LABELS, T.chexpert_columns(targets, threshs)) if c is not None] == \
        ["Lung Opacity", "Pneumonia"]
    # a named pathology without a threshold outputs a constant 0.5 in xrv: missing, not a column of 0.5
    finite[NAN_AT] = np.nan
    assert T.chexpert_columns(M.TXV_PATHOLOGIES, finite)[CHEXPERT_LABELS.index("Cardiomegaly")] is None
    with pytest.raises(UsageError, match="unknown torchxrayvision DenseNet weights 'all'"):
        M.released_weights("all")


def test_op_norm_facts():
    t = jnp.asarray([0.1, 0.5, 0.9, np.nan])
    p = jnp.asarray([[0.1, 0.5, 0.9, 0.3], [0.0, 0.2, 1.0, 0.99], [0.05, 0.7, 0.45, 0.0]])
    got = np.asarray(M.op_norm(p, t))
    np.testing.assert_allclose(got[0, :3], 0.5)  # the threshold maps to 0.5
    np.testing.assert_allclose(got[:, 1], np.asarray(p[:, 1]), rtol=1e-7)  # t = 0.5 is the identity
    np.testing.assert_allclose(got[:, 3], 0.5)  # NaN threshold: 0.5 whatever the probability
    np.testing.assert_allclose(got[1, :3], [0.0, 0.2, 1.0], rtol=1e-7)  # ends stay put
    np.testing.assert_allclose(got[2, :3], [0.25, 0.7, 0.25], rtol=1e-6)  # p / 2t below, 1-(1-p)/2(1-t) above


def test_random_classifier_round_trip(tmp_path):
    """Our model -> xrv state dict -> convert -> file -> load: every array, the names and the
    architecture survive; the file also serves the features loader; predict gives NaN columns."""
    w = _tiny_weights(threshs=np.linspace(0.05, 0.95, 18))
    sd = W.txv_classifier_torch_state_dict(w)
    assert sd["classifier.weight"].shape == (18, TINY_CFG.num_features) and sd["op_threshs"].shape == (18,)
    back = W.convert_txv_classifier({**sd, "features.norm0.num_batches_tracked": np.zeros((), np.int64)})
    assert back.config == TINY and back.targets == M.TXV_PATHOLOGIES
    assert back.arrays.keys() == w.arrays.keys()
    assert all(np.array_equal(back.arrays[k], v) for k, v in w.arrays.items())
    path = str(tmp_path / "clf.safetensors")
    W.save_txv_classifier(back, path)
    model, targets = W.load_txv_classifier_model(path)
    assert targets == M.TXV_PATHOLOGIES and model.cfg == TINY_CFG
    assert all(np.array_equal(v, w.arrays[k]) for k, v in W.to_arrays(model).items())
    clf = T.load_txv_classifier(path, batch_size=3)
    assert clf.missing == ("No Finding", "Pleural Other", "Support Devices")
    # 4 images over batches of 3: the last one padded. Faint ones: random BatchNorm statistics (mean 0,
    # var 1) would saturate the sigmoid at xrv's [-1024, 1024] scale.
    x = 1e-3 * _images((4, 40, 40, 3), 1)
    raw = clf.predict_targets(x)
    probs, findings = clf.predict(x)
    assert raw.shape == (4, 18) and probs.shape == (4, 14) and findings == CHEXPERT_LABELS
    assert ((raw > 0) & (raw < 1)).all()
    np.testing.assert_array_equal(np.isnan(probs).all(0), [c is None for c in clf.columns])
    np.testing.assert_array_equal(probs[:, CHEXPERT_LABELS.index("Pleural Effusion")], raw[:, 7])
    np.testing.assert_allclose(clf.predict_targets(x[3:]), raw[3:], rtol=1e-6, atol=1e-7)  # batching is invisible
    assert clf.predict(x[:0]).probabilities.shape == (0, 14)
    with pytest.raises(UsageError, match="square"):
        clf.predict(np.zeros((1, 40, 32, 1), np.float32))


def test_real_architecture_conversion(tmp_path):
    """A DenseNet-121 state dict with its head (zeros; shapes are the point): the architecture is
    read back as txv_densenet121, and the classifier file is read by the CIP / FID features loader."""
    feats = W.txv_densenet_torch_state_dict({k: np.zeros(s, np.float32) for k, s in W._txv_shapes().items()})
    sd = {**feats, "classifier.weight": np.zeros((18, 1024), np.float32), "classifier.bias": np.zeros(18, np.float32)}
    w = W.convert_txv_classifier(sd, xrv_weights="densenet121-res224-all")
    real = P.txv_densenet121("float32", "float32")
    assert w.model_config() == real
    np.testing.assert_array_equal(w.arrays["op_threshs"], M.released_weights("densenet121-res224-all")[1])
    path = str(tmp_path / "txv_all.safetensors")
    W.save_txv_classifier(w, path)
    features = W.load_txv_densenet(path, dtype="float32", param_dtype="float32")
    assert W.to_arrays(features).keys() == W._txv_shapes().keys()
    model, targets = W.load_txv_classifier_model(path)
    assert model.cfg == real and targets == M.TXV_PATHOLOGIES
    # the features-only file stays features-only
    W.save_weights(W.convert_txv_densenet(sd), str(tmp_path / "feats.safetensors"))
    with pytest.raises(UsageError, match="features only, not the classifier; .*--classifier"):
        T.load_txv_classifier(str(tmp_path / "feats.safetensors"))


def test_conversion_errors(tmp_path):
    sd = W.txv_classifier_torch_state_dict(_tiny_weights())
    heads = ("classifier.weight", "classifier.bias", "op_threshs")
    with pytest.raises(UsageError, match="has no classifier.weight / classifier.bias .*leave out --classifier"):
        W.convert_txv_classifier({k: v for k, v in sd.items() if k not in heads})
    no_op = {k: v for k, v in sd.items() if k != "op_threshs"}
    with pytest.raises(UsageError, match="has no op_threshs .*--xrv-weights, one of densenet121-res224-all"):
        W.convert_txv_classifier(no_op)
    named = W.convert_txv_classifier(no_op, xrv_weights="densenet121-res224-chex")
    assert named.targets[2] == "" and named.targets[0] == "Atelectasis" and np.isnan(named.arrays["op_threshs"][2])
    with pytest.raises(UsageError, match="op_threshs differ from torchxrayvision's for densenet121-res224-chex"):
        W.convert_txv_classifier(sd, xrv_weights="densenet121-res224-chex")
    with pytest.raises(UsageError, match="unknown torchxrayvision DenseNet weights"):
        W.convert_txv_classifier(sd, xrv_weights="densenet121-res224-foo")
    five = {**sd, "classifier.weight": sd["classifier.weight"][:5], "classifier.bias": sd["classifier.bias"][:5],
            "op_threshs": sd["op_threshs"][:5]}
    with pytest.raises(UsageError, match="classifier has 5 outputs, torchxrayvision's DenseNet 18"):
        W.convert_txv_classifier(five)
    with pytest.raises(UsageError, match="classifier.weight .* do not fit 20 features"):
        W.convert_txv_classifier({**sd, "classifier.weight": np.zeros((18, 21), np.float32)})
    with pytest.raises(UsageError, match="op_threshs has shape"):
        W.convert_txv_classifier({**sd, "op_threshs": np.zeros(17, np.float32)})
    with pytest.raises(UsageError, match="unexpected 'module.extra'"):
        W.convert_txv_classifier({**sd, "module.extra": np.zeros(1)})
    with pytest.raises(UsageError, match="lacks 'features.conv0.weight'"):
        W.convert_txv_classifier({k: v for k, v in sd.items() if k != "features.conv0.weight"})
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(MissingInputError, match=f"{missing} not found; .*convert-weights txv --classifier"):
        T.load_txv_classifier(missing)
    with open(tmp_path / "junk.safetensors", "wb") as f:
        f.write(b"not safetensors at all")
    with pytest.raises(UsageError, match="is not a safetensors file"):
        T.load_txv_classifier(str(tmp_path / "junk.safetensors"))
    with pytest.raises(UsageError, match="batch_size"):
        T.TxvClassifier(M.DenseNetClassifier(TINY_CFG, 18, nnx.Rngs(0)), M.TXV_PATHOLOGIES, batch_size=0)


# ------------------------------------------------------------------------- against torchxrayvision

@pytest.fixture(scope="module")
def xrv():
    """(xrv models module, a small xrv DenseNet with random weights, random op_threshs in (0, 1), one NaN)."""
    torch = pytest.importorskip("torch")
    import perceptual_refs as refs

    models, model = refs.random_txv_densenet(20, 1, **TINY)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.5, generator=g)  # logits of a few units: outputs across (0, 1)
        model.classifier.bias.normal_(0.0, 0.5, generator=g)
    threshs = 0.05 + 0.9 * torch.rand(18, generator=g)
    threshs[NAN_AT] = float("nan")
    model.op_threshs = threshs  # the registered buffer, as xrv's weights= path sets it
    return models, model.eval()


class NotAModule:
    """Pickled as a whole, it is not a torch nn.Module: the reader must say so, not guess."""

    def __init__(self):
        self.weights = {"classifier.weight": 1}


def _save_whole_model(models, model, path):
    """torch.save(model) as xrv's released .pt files are: the class must import by its name to pickle."""
    import perceptual_refs as refs
    import torch

    with refs._stand_in_modules({"torchxrayvision": types.ModuleType("torchxrayvision"),
                                 "torchxrayvision.models": models}):
        torch.save(model, path)


@pytest.mark.torch
def test_classifier_parity_with_torchxrayvision(xrv, tmp_path, capsys):
    import torch

    from llmcxr_jax import cli

    models, model = xrv
    sd_path, out = str(tmp_path / "xrv.pth"), str(tmp_path / "clf.safetensors")
    torch.save(model.state_dict(), sd_path)
    assert cli.main(["convert-weights", "txv", "--classifier", "--state-dict", sd_path, "--out", out]) == 0
    clf = T.load_txv_classifier(out, batch_size=2)
    x = _images((3, 224, 224, 1), 21)  # 224 px: xrv's own input, no resize on either side
    with torch.no_grad():
        want = model(_nchw(1024 * x)).numpy()
        want_logits = model.classifier(model.features2(_nchw(1024 * x))).numpy()
    got = clf.predict_targets(x)
    assert got.shape == want.shape == (3, 18)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the calibration's two branches and its NaN case are all exercised
    t = model.op_threshs.numpy()
    sig = 1 / (1 + np.exp(-want_logits))
    assert (sig < t).sum() >= 5 and (sig >= t).sum() >= 5 and np.all(want[:, NAN_AT] == 0.5)
    model_j, _ = W.load_txv_classifier_model(out)
    logits = np.asarray(model_j.logits(jnp.asarray(1024 * x)))
    np.testing.assert_allclose(logits, want_logits, atol=1e-5 * np.abs(want_logits).max(), rtol=0)
    assert np.abs(want_logits).max() > 1
    # CheXpert order: the mapped columns, NaN for the findings xrv lacks and for the NaN threshold
    probs, findings = clf.predict(x)
    for j, f in enumerate(findings):
        name = T.CHEXPERT_TO_TXV[f]
        if name is None or f == "Cardiomegaly":
            assert np.isnan(probs[:, j]).all(), f
        else:
            np.testing.assert_allclose(probs[:, j], want[:, M.TXV_PATHOLOGIES.index(name)], atol=1e-5, rtol=0)

    # end to end as evaluate feeds it: RGB 64 px images in [-1, 1]; xrv resizes with its fix_resolution
    rgb = _images((2, 64, 64, 3), 22)
    model.input_resolution = 224
    try:
        with torch.no_grad():
            want = model(_nchw(1024 * rgb.mean(-1, keepdims=True))).numpy()
    finally:
        del model.input_resolution
    np.testing.assert_allclose(clf.predict_targets(rgb), want, atol=1e-5, rtol=0)

    # the whole pickled model (xrv's .pt layout) converts to the same file, nothing in it run
    whole = str(tmp_path / "xrv_whole.pt")
    _save_whole_model(models, model, whole)
    out2 = str(tmp_path / "clf2.safetensors")
    assert cli.main(["convert-weights", "txv", "--classifier", "--state-dict", whole, "--out", out2]) == 0
    a, b = W.load_txv_classifier_model(out)[0], W.load_txv_classifier_model(out2)[0]
    assert all(np.array_equal(v, W.to_arrays(b)[k], equal_nan=True) for k, v in W.to_arrays(a).items())

    torch.save(NotAModule(), str(tmp_path / "odd.pt"))
    with pytest.raises(UsageError, match="holds a pickled .*NotAModule at its top, not a torch nn.Module"):
        W.read_txv_weights(str(tmp_path / "odd.pt"))

    # CLI errors: one line each
    capsys.readouterr()
    assert cli.main(["convert-weights", "txv", "--xrv-weights", "densenet121-res224-all", "--state-dict", sd_path,
                     "--out", out]) == 2
    assert "add --classifier" in capsys.readouterr().err
    feats = str(tmp_path / "feats.pth")
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, feats)
    assert cli.main(["convert-weights", "txv", "--classifier", "--state-dict", feats, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{feats} has no classifier.weight" in err


@pytest.mark.torch
def test_released_weights_match_torchxrayvision(xrv):
    models, _ = xrv
    spec = importlib.util.find_spec("torchxrayvision")
    with open(os.path.join(spec.submodule_search_locations[0], "datasets.py")) as f:
        tree = ast.parse(f.read())
    default = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "default_pathologies" for t in node.targets))
    assert tuple(default) == tuple(models.DenseNet.targets) == M.TXV_PATHOLOGIES
    names = {k for k in models.model_urls if k.startswith("densenet121")}
    assert names == set(M.RELEASED_OP_THRESHS)
    for name in names:
        labels, threshs = M.released_weights(name)
        assert labels == tuple(models.model_urls[name]["labels"]), name
        import torch

        want = torch.tensor(models.model_urls[name]["op_threshs"]).numpy()  # as xrv stores them
        np.testing.assert_array_equal(threshs, want)
