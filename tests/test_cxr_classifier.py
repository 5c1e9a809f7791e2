"""The synthetic-CXR classifier learns the findings the images carry, and saves/loads exactly."""
import numpy as np
import pytest

from llmcxr_jax import synthetic
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.eval import cxr_classifier as C
from llmcxr_jax.eval.report_metrics import auroc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clf") / "corpus")
    synthetic.synthesize(root, num_images=400, image_size=64, seed=3)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    labels = mimic_cxr.read_chexpert_labels(root)
    frontal = [r for r in corpus.records if r.view in ("PA", "AP")]
    train = [r for r in frontal if r.split == "train"]
    held = [r for r in frontal if r.split != "train"]
    return (C.load_images(train, 64), C.targets_for(train, labels), C.load_images(held, 64),
            C.targets_for(held, labels))


@pytest.mark.slow
def test_classifier_separates_the_visible_findings(data):
    x, y, xt, yt = data
    model = C.train_classifier(x, y, steps=300)
    probs, _ = C.predict(model, xt)
    scores = {}
    for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax"):
        i = mimic_cxr.CHEXPERT_LABELS.index(name)
        scores[name] = auroc(yt[:, i], probs[:, i])
    print(scores)
    assert all(s >= 0.75 for s in scores.values()), scores


def test_classifier_trains_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (16, 32, 32, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.float32)[:, None].repeat(14, 1)
    cfg = C.ClassifierConfig(image_size=32, widths=(8, 8), hidden=12)
    model = C.train_classifier(x, y, cfg, steps=3, batch=8)
    probs, feats = C.predict(model, x)
    assert probs.shape == (16, 14) and feats.shape == (16, 12)
    assert np.all(feats >= 0) and np.all((probs > 0) & (probs < 1))
    xt = x
    C.save_classifier(model, cfg, str(tmp_path))
    again, _ = C.load_classifier(str(tmp_path))
    np.testing.assert_array_equal(C.predict(again, xt)[0], probs)
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        C.load_classifier(str(tmp_path / "none"))


def test_image_size_must_halve_once_per_stage():
    with pytest.raises(ValueError, match="image_size 36 does not halve 3 times"):
        C.CxrClassifier(C.ClassifierConfig(image_size=36, widths=(8, 8, 8)), C.nnx.Rngs(0))
