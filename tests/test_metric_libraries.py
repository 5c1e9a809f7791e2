"""Our report metrics against direct calls of the libraries behind them (scikit-learn, pycocoevalcap)
on real-looking reports: the synthetic corpus's reports and hand-written radiology sentences,
labelled by eval/labeler.py. They check what our code adds around the libraries: the label
semantics (positive = 1), the nan AUROC of one-valued classes and the means without them, the
tokenization and the pairing of candidates with references.

Before the hand-written implementations were deleted (issue 20) the same comparison ran against
them on these inputs: precision / recall / F1 / Jaccard micro, macro, weighted and per class equal
to sklearn's exactly, AUROC to 1e-16; ROUGE-L and CIDEr-D (corpus and per report) equal to
pycocoevalcap's to 1e-15; BLEU-1..4 to 4e-13 relative (pycocoevalcap adds 1e-9 to every n-gram
count), except where an n-gram order has no match: Papineni's 0 against pycocoevalcap's offset
value (0.0316 for BLEU-4 when no candidate has a 4-gram); FID to 2e-15 relative (1e-9 when n < d).
"""
import numpy as np
import pytest
import sklearn.metrics as skm
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from llmcxr_jax import synthetic
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.eval import labeler
from llmcxr_jax.eval import report_metrics as rm

HAND = [  # (reference, generated)
    ("Small left pleural effusion. No pneumothorax.", "Small left pleural effusion without pneumothorax."),
    ("Moderate cardiomegaly with mild pulmonary edema.", "The heart is enlarged. Mild interstitial edema."),
    ("No acute cardiopulmonary process.", "No acute cardiopulmonary process."),
    ("Right lower lobe consolidation, concerning for pneumonia.",
     "Patchy opacity at the right base; pneumonia is possible."),
    ("Endotracheal tube terminates 4 cm above the carina. Nasogastric tube in the stomach.",
     "ET tube 4 cm above the carina. The enteric tube courses below the diaphragm."),
    ("Bibasilar atelectasis. Possible small right effusion.", "Mild bibasilar atelectasis, no effusion."),
    ("Large right pneumothorax with leftward mediastinal shift.", "Small right apical pneumothorax."),
    ("Healed left rib fractures. Lungs are clear.", "No acute fracture. The lungs are clear."),
    ("Interval increase in diffuse bilateral opacities, likely edema.", "Worsening bilateral airspace opacities."),
    ("Left PICC tip in the mid SVC. No focal consolidation.", "Left-sided PICC terminates in the SVC."),
]
# PTB's tokens for texts that show its quirks (the last: a line break inside a text, then an empty text)
QUIRKS = {
    "The ET tube is 2.5 cm above the carina; no plate-like atelectasis. ___":
        "the et tube is 2.5 cm above the carina no plate-like atelectasis ___",
    "AP/PA and lateral views: can't exclude pneumonia (left > right).":
        "ap/pa and lateral views ca n't exclude pneumonia -lrb- left > right -rrb-",
    "A small effusion cannot be excluded.": "a small effusion can not be excluded",
    "Heart size is top-normal.\r\nNo pneumothorax.\u2028Stable.": "heart size is top-normal no pneumothorax stable",
    "": "",
    "1. Small bilateral effusions. 2. No pneumothorax.": "1 small bilateral effusions 2 no pneumothorax",
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """(references, generated): corpus reports paired with a different study's report (every fifth
    with its own), impressions likewise, then the hand-written pairs."""
    root = str(tmp_path_factory.mktemp("corpus"))
    synthetic.synthesize(root, num_images=80, image_size=32, seed=7)
    corpus = mimic_cxr.load_corpus(root, progress=False)
    texts = sorted({mimic_cxr.stage_text(r, 1) for r in corpus.records})
    imps = sorted({mimic_cxr.stage_text(r, 2) for r in corpus.records})
    refs = texts + imps + [r for r, _ in HAND]
    gens = [texts[i] if i % 5 == 0 else texts[(i + 1) % len(texts)] for i in range(len(texts))]
    gens += [imps[(i + 3) % len(imps)] for i in range(len(imps))] + [g for _, g in HAND]
    assert len(refs) > 60 and len(set(gens)) > 30
    return refs, gens


@pytest.fixture(scope="module")
def ptb(reports):
    """PTB tokens of every reference, generated report and QUIRKS text (one JVM)."""
    refs, gens = reports
    texts = [*refs, *gens, *QUIRKS]
    return dict(zip(texts, rm.ptb_tokenize(texts)))


@pytest.mark.parametrize("uncertain", ["negative", "positive"])
def test_label_metrics_equal_sklearn_on_labelled_reports(reports, uncertain):
    refs, gens = reports
    ref, gen = labeler.label_reports(refs), labeler.label_reports(gens)
    assert (ref == -1).any() and np.isnan(ref).any()  # uncertain and blank labels occur
    positive = (1.0, -1.0) if uncertain == "positive" else (1.0,)
    y, p = np.isin(ref, positive).astype(int), np.isin(gen, positive).astype(int)
    m = rm.label_metrics(ref, gen, uncertain=uncertain)
    for avg in ("micro", "macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert [m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]] == [pr, rc, f1]
        assert m[f"jaccard_{avg}"] == skm.jaccard_score(y, p, average=avg, zero_division=0)
    names = mimic_cxr.CHEXPERT_LABELS
    per = m["per_class"]
    pr, rc, f1, support = skm.precision_recall_fscore_support(y, p, average=None, zero_division=0)
    assert [per[n]["precision"] for n in names] == pr.tolist() and [per[n]["recall"] for n in names] == rc.tolist()
    assert [per[n]["f1"] for n in names] == f1.tolist() and [per[n]["support"] for n in names] == support.tolist()
    assert [per[n]["jaccard"] for n in names] == skm.jaccard_score(y, p, average=None, zero_division=0).tolist()
    assert [per[n]["predicted"] for n in names] == p.sum(0).tolist()
    one_valued = y.min(0) == y.max(0)
    assert one_valued.any() and (~one_valued).sum() >= 5  # both kinds of class occur
    aucs = np.array([np.nan if one_valued[k] else skm.roc_auc_score(y[:, k], p[:, k]) for k in range(len(names))])
    np.testing.assert_array_equal([per[n]["auroc"] for n in names], aucs)
    valid = ~one_valued
    assert m["auroc_macro"] == pytest.approx(aucs[valid].mean(), rel=1e-15)
    assert m["auroc_weighted"] == pytest.approx(np.average(aucs[valid], weights=support[valid]), rel=1e-15)
    assert m["auroc_micro"] == skm.roc_auc_score(y.ravel(), p.ravel())
    # the image classifier's case: continuous scores with ties
    s = np.round(np.random.default_rng(0).random(y.shape) * 0.5 + 0.5 * y, 1)
    expected = [np.nan if one_valued[k] else skm.roc_auc_score(y[:, k], s[:, k]) for k in range(len(names))]
    np.testing.assert_allclose(rm.auroc_columns(y, s), expected, rtol=1e-15)


def _coco(texts):
    return {i: [t] for i, t in enumerate(texts)}


def test_text_metrics_equal_pycocoevalcap_on_reports(reports, ptb):
    """evaluate's call (PTB tokens) against the scorers run directly on the PTB tokens."""
    refs, gens = reports
    gts, res = _coco([ptb[r] for r in refs]), _coco([ptb[g] for g in gens])
    out = rm.text_metrics(gens, refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [out[f"bleu_{k}"] for k in range(1, 5)] == bleu
    assert out["rouge_l"] == Rouge().compute_score(gts, res)[0]
    assert out["cider_d"] == Cider().compute_score(gts, res)[0]
    assert 0.2 < out["bleu_4"] < out["bleu_1"] < 0.9 and 0.2 < out["rouge_l"] < 0.9 and 0.5 < out["cider_d"] < 5
    # two references per report, already tokenized
    two = [[ptb[r], ptb[refs[(i + 7) % len(refs)]]] for i, r in enumerate(refs)]
    gts2 = {i: rs for i, rs in enumerate(two)}
    cands = [ptb[g] for g in gens]
    assert [rm.bleu(cands, two, tokenizer="none")[f"bleu_{k}"] for k in range(1, 5)] == \
        Bleu(4).compute_score(gts2, res, verbose=0)[0]
    assert rm.rouge_l(cands, two, tokenizer="none") == Rouge().compute_score(gts2, res)[0]
    mean, per = rm.cider_d(cands, two, tokenizer="none", per_report=True)
    lib_mean, lib_per = Cider().compute_score(gts2, res)
    assert mean == lib_mean and per == lib_per.tolist()


def test_ptb_tokens_of_radiology_text(ptb):
    assert {t: ptb[t] for t in QUIRKS} == QUIRKS


def test_simple_tokenizer_differs_from_ptb_on_the_corpus_only_by_cannot(reports, ptb):
    refs, gens = reports
    corpus = refs[:-len(HAND)]
    differ = [t for t in corpus if ptb[t] != " ".join(rm.tokenize(t))]
    assert differ and all(ptb[t].replace("can not", "cannot") == " ".join(rm.tokenize(t)) for t in differ)
    assert any("can not" in ptb[t] for t in differ)
