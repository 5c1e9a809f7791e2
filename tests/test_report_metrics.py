"""Report metrics against hand-computed values and published reference examples: sklearn's documented
F1 / Jaccard / ROC-AUC results, NLTK's documented BLEU results, Lin's ROUGE-L example, and CIDEr-D
worked by hand from the COCO toolkit's formula."""
import math

import numpy as np
import pytest

from llmcxr_jax.eval import report_metrics as rm

NAN = np.nan


def _one_hot(classes, k):
    return np.eye(k)[np.asarray(classes)]


# ----------------------------------------------------------------------------- labels

def test_f1_micro_macro_weighted_match_sklearn_documented_example():
    # sklearn f1_score docs: y_true=[0,1,2,0,1,2], y_pred=[0,2,1,0,0,1] -> macro 0.26.., micro
    # 0.33.., weighted 0.26.. ; one label per sample, so the one-hot multilabel scores are equal
    y, p = _one_hot([0, 1, 2, 0, 1, 2], 3), _one_hot([0, 2, 1, 0, 0, 1], 3)
    m = rm.label_metrics(y, p, names=("a", "b", "c"))
    assert m["f1_macro"] == pytest.approx(0.8 / 3)
    assert m["f1_micro"] == pytest.approx(1 / 3)
    assert m["f1_weighted"] == pytest.approx(0.8 / 3)
    # precision_recall_fscore_support docs (cat/dog/pig): macro P 0.22.., R 0.33..
    assert m["precision_macro"] == pytest.approx(2 / 9) and m["recall_macro"] == pytest.approx(1 / 3)
    assert m["precision_micro"] == pytest.approx(1 / 3) and m["recall_weighted"] == pytest.approx(1 / 3)


def test_multilabel_f1_and_jaccard_match_sklearn_documented_examples():
    # f1_score docs, multilabel: average=None -> [0.66666667, 1., 0.66666667]
    m = rm.label_metrics([[0, 0, 0], [1, 1, 1], [0, 1, 1]], [[0, 0, 0], [1, 1, 1], [1, 1, 0]], names="abc")
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([2 / 3, 1.0, 2 / 3])
    # jaccard_score docs: average=None -> [0.5, 0.5, 1.], macro 0.666..; micro and weighted by hand:
    # tp 3, fp 1, fn 1 -> 3/5; supports (1, 2, 1) -> (0.5 + 1.0 + 1.0) / 4
    m = rm.label_metrics([[0, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 0, 0]], names="abc")
    assert [m["per_class"][c]["jaccard"] for c in "abc"] == pytest.approx([0.5, 0.5, 1.0])
    assert m["jaccard_macro"] == pytest.approx(2 / 3)
    assert m["jaccard_micro"] == pytest.approx(0.6)
    assert m["jaccard_weighted"] == pytest.approx(0.625)


REF = [[1, 0, NAN], [1, -1, 1], [0, 1, NAN], [NAN, 1, -1]]
GEN = [[1, 1, NAN], [0, 1, 1], [-1, 1, 0], [1, NAN, NAN]]


def test_chexpert_values_uncertain_and_blank_count_as_negative_by_default():
    # positives: ref Y = [[1,0,0],[1,0,1],[0,1,0],[0,1,0]], gen P = [[1,1,0],[0,1,1],[0,1,0],[1,0,0]]
    # class a: tp1 fp1 fn1; b: tp1 fp2 fn1; c: tp1 fp0 fn0; supports 2, 2, 1
    m = rm.label_metrics(REF, GEN, names="abc")
    per = m["per_class"]
    assert [per[c]["f1"] for c in "abc"] == pytest.approx([0.5, 0.4, 1.0])
    assert [per[c]["precision"] for c in "abc"] == pytest.approx([0.5, 1 / 3, 1.0])
    assert [per[c]["recall"] for c in "abc"] == pytest.approx([0.5, 0.5, 1.0])
    assert [per[c]["support"] for c in "abc"] == [2, 2, 1] and [per[c]["predicted"] for c in "abc"] == [2, 3, 1]
    assert m["f1_micro"] == pytest.approx(6 / 11)          # 2*3 / (2*3 + 3 + 2)
    assert m["f1_macro"] == pytest.approx(1.9 / 3)
    assert m["f1_weighted"] == pytest.approx((0.5 * 2 + 0.4 * 2 + 1.0) / 5)
    assert m["jaccard_micro"] == pytest.approx(3 / 8)
    # AUROC of hard labels = (TPR + TNR) / 2: a (0.5+0.5)/2, b (0.5+0)/2, c 1; pooled 3/5 and 4/7
    assert [per[c]["auroc"] for c in "abc"] == pytest.approx([0.5, 0.25, 1.0])
    assert m["auroc_macro"] == pytest.approx(1.75 / 3)
    assert m["auroc_weighted"] == pytest.approx((0.5 * 2 + 0.25 * 2 + 1.0) / 5)
    assert m["auroc_micro"] == pytest.approx((3 / 5 + 4 / 7) / 2)
    assert m["n_reports"] == 4


def test_uncertain_as_positive_option():
    # Y = [[1,0,0],[1,1,1],[0,1,0],[0,1,1]], P = [[1,1,0],[0,1,1],[1,1,0],[1,0,0]]
    m = rm.label_metrics(REF, GEN, names="abc", uncertain="positive")
    assert [m["per_class"][c]["f1"] for c in "abc"] == pytest.approx([0.4, 2 / 3, 2 / 3])
    assert m["f1_micro"] == pytest.approx(8 / 14)
    with pytest.raises(ValueError, match="uncertain must be"):
        rm.label_metrics(REF, GEN, names="abc", uncertain="ignore")


def test_class_without_positives_scores_zero_f1_and_nan_auroc_left_out_of_averages():
    ref = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], float)
    m = rm.label_metrics(ref, ref, names="ab")
    assert m["per_class"]["a"]["f1"] == 1.0 and m["per_class"]["b"]["f1"] == 0.0  # sklearn zero_division=0
    assert m["f1_macro"] == 0.5 and m["f1_weighted"] == 1.0 and m["f1_micro"] == 1.0
    assert math.isnan(m["per_class"]["b"]["auroc"])
    assert m["auroc_macro"] == 1.0 and m["auroc_weighted"] == 1.0
    assert rm.label_metrics(ref, ref, names="ab", zero_division=1.0)["f1_macro"] == 1.0
    none = rm.label_metrics(np.zeros((3, 2)), np.zeros((3, 2)), names="ab")
    assert math.isnan(none["auroc_macro"]) and none["f1_weighted"] == 0.0


def test_label_metrics_rejects_bad_values_and_shapes():
    with pytest.raises(ValueError, match="1, 0, -1 or nan"):
        rm.label_metrics([[2.0, 0.0]], [[1.0, 0.0]], names="ab")
    with pytest.raises(ValueError, match="must both be"):
        rm.label_metrics(np.zeros((2, 14)), np.zeros((3, 14)))
    assert rm.label_metrics(np.zeros((2, 14)), np.ones((2, 14)))["f1_micro"] == 0.0  # 14 CheXpert columns


def test_auroc_mann_whitney_with_ties():
    assert rm.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # sklearn roc_auc_score docs
    assert rm.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(rm.auroc([1, 1, 1], [0.2, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.integers(0, 5, 200).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert rm.auroc(y, s) == pytest.approx(pairs, abs=1e-12)
    hard = rng.integers(0, 2, 200)
    balanced = ((hard == 1) & (y == 1)).sum() / (y == 1).sum() / 2 + ((hard == 0) & (y == 0)).sum() / (y == 0).sum() / 2
    assert rm.auroc(y, hard) == pytest.approx(balanced, abs=1e-12)


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    x = (np.random.default_rng(1).random(400) < 0.3).astype(float)
    lo, hi = rm.bootstrap_interval(lambda i: [x[i].mean()], len(x), samples=2000)[0]
    se = x.std() / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.008) and hi == pytest.approx(x.mean() + 1.96 * se, abs=0.008)
    narrow = rm.bootstrap_interval(lambda i: [np.tile(x, 4)[i].mean()], 4 * len(x), samples=2000)[0]
    assert narrow[1] - narrow[0] == pytest.approx((hi - lo) / 2, rel=0.15)  # width ~ 1 / sqrt(n)
    assert np.isnan(rm.bootstrap_interval(lambda i: [np.nan], 5, samples=10)).all()
    with pytest.raises(ValueError, match="n >= 1"):
        rm.bootstrap_interval(lambda i: [0.0], 0)
    with pytest.raises(ValueError, match="level"):
        rm.bootstrap_interval(lambda i: [0.0], 5, level=1.0)


def test_label_metrics_intervals_bracket_the_scores_and_skip_one_valued_classes():
    rng = np.random.default_rng(0)
    ref = (rng.random((300, 3)) < [0.3, 0.2, 0.0]).astype(float)
    gen = np.where(rng.random(ref.shape) < 0.8, ref, 1 - ref)  # 80% of labels copied
    m = rm.label_metrics(ref, gen, names="abc", ci_samples=500)
    for name in "ab":
        c = m["per_class"][name]
        assert c["f1_ci"][0] < c["f1"] < c["f1_ci"][1] and c["auroc_ci"][0] < c["auroc"] < c["auroc_ci"][1]
        assert 0.02 < c["f1_ci"][1] - c["f1_ci"][0] < 0.3
    assert np.isnan(m["per_class"]["c"]["auroc_ci"]).all()  # no reference positives
    assert "f1_ci" not in rm.label_metrics(ref, gen, names="abc")["per_class"]["a"]


# ----------------------------------------------------------------------------- BLEU

H1 = "It is a guide to action which ensures that the military always obeys the commands of the party".split()
R1 = "It is a guide to action that ensures that the military will forever heed Party commands".split()
R2 = ("It is the guiding principle which guarantees the military forces always being under the command of the "
      "Party").split()
R3 = "It is the practical guide for the army always to heed the directions of the party".split()
H2 = "he read the book because he was interested in world history".split()
R2A = "he was interested in world history because he read the book".split()


def test_bleu_matches_nltk_documented_examples():
    # nltk.translate.bleu_score docs: sentence_bleu 0.5045666840058485 (three references),
    # 0.4118... (reference1 only), corpus_bleu 0.5920778868801042
    assert rm.sentence_bleu(H1, [R1, R2, R3], smoothing=None)[3] == pytest.approx(0.5045666840058485, abs=1e-12)
    assert rm.sentence_bleu(H1, [R1], smoothing=None)[3] == pytest.approx(0.4118, abs=1e-4)
    assert rm.sentence_bleu(H1, [R1], smoothing=1)[3] == rm.sentence_bleu(H1, [R1], smoothing=None)[3]
    assert rm.corpus_bleu([H1, H2], [[R1, R2, R3], [R2A]])[3] == pytest.approx(0.5920778868801042, abs=1e-12)
    # modified_precision docs: 17/18 unigrams and 10/17 bigrams; BP = 1 (closest reference: 18 tokens)
    b = rm.corpus_bleu([H1], [[R1, R2, R3]], max_n=2)
    assert b[0] == pytest.approx(17 / 18) and b[1] == pytest.approx(math.sqrt(17 / 18 * 10 / 17))


def test_bleu_clipping_brevity_penalty_and_properties():
    # Papineni: "the" x7 against two references: clipped unigram precision 2/7, closest ref length 7
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    assert rm.bleu(["the the the the the the the"], refs, max_n=1)["bleu_1"] == pytest.approx(2 / 7)
    # brevity: c = 2, r = 6 -> exp(1 - 3); no trigram in the candidate -> BLEU-3 = BLEU-4 = 0
    short = rm.bleu(["The cat."], ["the cat sat on the mat"])
    assert short["bleu_1"] == pytest.approx(math.exp(-2)) and short["bleu_2"] == pytest.approx(math.exp(-2))
    assert short["bleu_3"] == 0.0 and short["bleu_4"] == 0.0
    # closest reference length, ties to the shorter: candidate 4 tokens, refs of 3 and 5 -> r = 3, BP 1
    tie = rm.corpus_bleu([["a", "b", "c", "d"]], [[["a", "b", "c"], ["a", "b", "c", "d", "e"]]], max_n=1)
    assert tie[0] == 1.0
    texts = ["Small left pleural effusion.", "No acute cardiopulmonary process. The lungs are clear."]
    assert rm.bleu(texts, texts) == {f"bleu_{k}": 1.0 for k in range(1, 5)}
    assert rm.bleu(["alpha beta gamma delta"], ["one two three four"]) == {f"bleu_{k}": 0.0 for k in range(1, 5)}


def test_sentence_bleu_smoothing_method_1_by_hand():
    # "a cat sat the mat" vs "the cat sat on the mat": matches 4/5, 2/4, 0/3, 0/2; BP exp(1 - 6/5)
    hyp, ref = "a cat sat the mat".split(), "the cat sat on the mat".split()
    bp = math.exp(1 - 6 / 5)
    assert rm.sentence_bleu(hyp, [ref], smoothing=1) == pytest.approx([
        bp * 0.8, bp * (0.8 * 0.5) ** (1 / 2), bp * (0.8 * 0.5 * 0.1 / 3) ** (1 / 3),
        bp * (0.8 * 0.5 * 0.1 / 3 * 0.1 / 2) ** (1 / 4)])
    assert rm.sentence_bleu(hyp, [ref], smoothing=None)[2:] == [0.0, 0.0]
    assert rm.sentence_bleu(["x", "y"], [ref]) == [0.0] * 4  # no unigram match: 0 even when smoothed
    cands, refs = ["a cat sat the mat", "the cat sat on the mat"], ["the cat sat on the mat"] * 2
    mean = rm.bleu(cands, refs, level="sentence")
    assert mean["bleu_4"] == pytest.approx((rm.sentence_bleu(hyp, [ref])[3] + 1.0) / 2)
    with pytest.raises(ValueError, match="level must be"):
        rm.bleu(cands, refs, level="document")


# ----------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_lin_2004_example_and_beta():
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = 3 -> P = R = 3/4;
    # with "the gunman kill police" LCS = 2. P = R makes F = P whatever beta is.
    assert rm.rouge_l(["police kill the gunman"], ["police killed the gunman"]) == pytest.approx(0.75)
    assert rm.rouge_l(["the gunman kill police"], ["police killed the gunman"]) == pytest.approx(0.5)
    assert rm.rouge_l(["police kill the gunman"], [["the gunman kill police", "police killed the gunman"]]) \
        == pytest.approx(0.75)
    # P = 1, R = 1/2, beta 1.2: (1 + 1.44) * 0.5 / (0.5 + 1.44)
    assert rm.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2.44 * 0.5 / 1.94)
    assert rm.rouge_l(["The cat sat."], ["the cat sat on the mat"], beta=1.0) == pytest.approx(2 / 3)
    assert rm.rouge_l(["a b", "c d"], ["a b", "x y"]) == pytest.approx(0.5)  # mean over reports


# ----------------------------------------------------------------------------- CIDEr-D

def test_cider_d_by_hand():
    # two documents, every n-gram in one of them: idf = log 2 for all, so each vector is tf * log 2.
    # identical bigram sentences: cosine 1 for n = 1, 2 and 0 for n = 3, 4 -> 10 * 2/4
    assert rm.cider_d(["a b", "c d"], ["a b", "c d"]) == pytest.approx(5.0)
    # "a b" vs "a b c": unigram cos 2/sqrt(2*3), bigram 1/sqrt(2); bigram lengths 1 vs 2 ->
    # penalty exp(-1/72); the identical "d e f": 3 of 4 orders -> 7.5
    a = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    mean, per = rm.cider_d(["a b", "d e f"], ["a b c", "d e f"], per_report=True)
    assert per == pytest.approx([a, 7.5]) and mean == pytest.approx((a + 7.5) / 2)
    # clipping: "x x" vs "x y": min(2w, w) * w / (2w * sqrt(2) w) = 1 / (2 sqrt 2) (1/sqrt 2 unclipped)
    mean, per = rm.cider_d(["x x", "z w"], ["x y", "z w"], per_report=True)
    assert per[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    # two references: the mean of the per-reference scores
    _, two = rm.cider_d(["a b", "d e f"], [["a b c", "a b"], "d e f"], per_report=True)
    assert two[0] == pytest.approx((10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 + 5.0) / 2)


def test_cider_d_properties():
    texts = ["small left pleural effusion is seen", "no acute cardiopulmonary process is seen today"]
    assert rm.cider_d(texts, texts) == pytest.approx(10.0)  # all orders present, every n-gram rare enough
    assert rm.cider_d(["alpha beta gamma", texts[1]], texts, per_report=True)[1][0] == 0.0
    assert rm.cider_d([texts[0]], [texts[0]]) == 0.0        # one document: every idf is log 1 - log 1


# ----------------------------------------------------------------------------- tokens and wrapper

def test_tokenize_lowercases_and_splits_punctuation():
    text = "The ET tube is 2.5 cm above the carina; no plate-like atelectasis. ___"
    assert rm.tokenize(text) == ["the", "et", "tube", "is", "2.5", "cm", "above", "the", "carina", "no",
                                 "plate-like", "atelectasis"]
    kept = rm.tokenize(text, keep_punctuation=True)
    assert kept[9] == ";" and kept[-4:] == [".", "_", "_", "_"]


def test_text_metrics_keys_and_reference_checks():
    out = rm.text_metrics(["Small left effusion.", "No pneumothorax."], ["small left effusion", ["no pneumothorax"]])
    assert set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    assert out["rouge_l"] == 1.0 and out["bleu_3"] == 1.0
    assert out["bleu_4"] == 0.0  # no candidate has a 4-gram: p_4 = 0 / 0 counts as 0
    with pytest.raises(ValueError, match="2 candidates but 1"):
        rm.text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        rm.rouge_l(["a"], [[]])
