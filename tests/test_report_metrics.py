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


def test_weighted_mean_without_support_is_sklearns_unweighted_mean():
    # no reference positives: sklearn falls back to the unweighted mean over classes. With
    # zero_division=1: precision a = 0/1 = 0, b = 0/0 -> 1; recall a = b = 0/0 -> 1
    m = rm.label_metrics(np.zeros((3, 2)), [[1, 0], [0, 0], [0, 0]], names="ab", zero_division=1.0)
    assert m["precision_weighted"] == 0.5 and m["recall_weighted"] == 1.0
    assert m["precision_macro"] == 0.5 and m["f1_weighted"] == pytest.approx((0.0 + 1.0) / 2)


def test_one_class_scores_like_that_column_of_many():
    # sklearn reads one column as a binary target with classes {0, 1}; label_metrics scores class 1 only
    one = rm.label_metrics(np.asarray(REF)[:, :1], np.asarray(GEN)[:, :1], names="a")
    per = rm.label_metrics(REF, GEN, names="abc")["per_class"]["a"]
    assert one["per_class"]["a"] == per
    for metric in ("precision", "recall", "f1", "jaccard", "auroc"):
        assert one[f"{metric}_micro"] == one[f"{metric}_macro"] == one[f"{metric}_weighted"] == per[metric]
    ci = rm.label_metrics(np.asarray(REF)[:, :1], np.asarray(GEN)[:, :1], names="a", ci_samples=20)
    assert ci["per_class"]["a"]["f1_ci"][0] <= per["f1"] <= ci["per_class"]["a"]["f1_ci"][1]


def test_auroc_columns_equal_auroc_per_column():
    rng = np.random.default_rng(3)
    y = (rng.random((40, 5)) < 0.4).astype(int)
    s = np.round(rng.random((40, 5)) + 0.3 * y, 1)
    for constant in ([], [0, 2, 3, 4], [0, 1, 2, 3, 4], [1, 3]):  # 5, 1, 0 and 3 columns with both classes
        yc = y.copy()
        yc[:, constant] = 0
        np.testing.assert_array_equal(rm.auroc_columns(yc, s), [rm.auroc(yc[:, k], s[:, k]) for k in range(5)])


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


def test_vectorised_bootstrap_equals_sklearn_on_each_resample():
    """score_draws scores every resample at once from draw counts; on each resample it must equal
    sklearn on the resampled rows (ties in the scores, a finding that loses its positives, one
    class only), and label_metrics' intervals must be the percentiles of those sklearn values."""
    import sklearn.metrics as skm

    from llmcxr_jax.eval import bootstrap

    rng = np.random.default_rng(3)
    y = rng.random((30, 3)) < [0.4, 0.1, 0.5]
    s = np.round(rng.random((30, 3)) + 0.3 * y, 1)  # many ties
    draws = bootstrap.score_draws(y, s, s >= 0.7, bootstrap.resample_counts(30, 40, seed=2))
    idx = np.random.default_rng(2).integers(0, 30, size=(40, 30))  # bootstrap_interval's draws for seed 2
    one_class = 0
    for r, i in enumerate(idx):
        yi, si, pi = y[i], s[i], s[i] >= 0.7
        want = [skm.roc_auc_score(yi[:, j], si[:, j]) if 0 < yi[:, j].sum() < 30 else np.nan for j in range(3)]
        one_class += np.isnan(want).sum()
        np.testing.assert_allclose(draws["auroc"][r], want, atol=1e-12)
        assert draws["auroc_micro"][r] == pytest.approx(skm.roc_auc_score(yi.ravel(), si.ravel()), abs=1e-12)
        np.testing.assert_allclose(draws["f1"][r], skm.f1_score(yi, pi, average=None, zero_division=0), atol=1e-12)
        for avg in ("micro", "macro"):
            assert draws[f"f1_{avg}"][r] == pytest.approx(skm.f1_score(yi, pi, average=avg, zero_division=0), abs=1e-12)
    assert one_class > 0  # a resample without a positive of the rare finding was covered
    ref, gen = y.astype(float), (rng.random((30, 3)) < 0.3).astype(float)
    m = rm.label_metrics(ref, gen, names="abc", ci_samples=200)
    stat = lambda i: [skm.f1_score(ref[i], gen[i], average="micro", zero_division=0),  # noqa: E731
                      *(rm.auroc(ref[i][:, j], gen[i][:, j]) for j in range(3))]
    want = rm.bootstrap_interval(stat, 30, samples=200)
    assert m["f1_micro_ci"] == pytest.approx(want[0].tolist(), abs=1e-12)
    for j, name in enumerate("abc"):
        np.testing.assert_allclose(m["per_class"][name]["auroc_ci"], want[j + 1], atol=1e-12)


def test_label_metrics_intervals_bracket_the_scores_and_skip_one_valued_classes():
    rng = np.random.default_rng(0)
    ref = (rng.random((300, 3)) < [0.3, 0.2, 0.0]).astype(float)
    gen = np.where(rng.random(ref.shape) < 0.8, ref, 1 - ref)  # 80% of labels copied
    m = rm.label_metrics(ref, gen, names="abc", ci_samples=500)
    for name in "ab":
        c = m["per_class"][name]
        assert c["f1_ci"][0] < c["f1"] < c["f1_ci"][1] and c["auroc_ci"][0] < c["auroc"] < c["auroc_ci"][1]
        assert 0.02 < c["f1_ci"][1] - c["f1_ci"][0] < 0.3
    for key in ("f1_micro", "f1_macro", "auroc_micro"):  # the headline scores get intervals too
        assert m[f"{key}_ci"][0] < m[key] < m[f"{key}_ci"][1] and m[f"{key}_ci"][1] - m[f"{key}_ci"][0] < 0.2
    assert np.isnan(m["per_class"]["c"]["auroc_ci"]).all()  # no reference positives
    assert "f1_ci" not in rm.label_metrics(ref, gen, names="abc")["per_class"]["a"]


# ----------------------------------------------------------------------------- BLEU (pycocoevalcap)

H1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
R1 = "It is a guide to action that ensures that the military will forever heed Party commands"
R2 = ("It is the guiding principle which guarantees the military forces always being under the command of the "
      "Party")
R3 = "It is the practical guide for the army always to heed the directions of the party"
H2 = "he read the book because he was interested in world history"
R2A = "he was interested in world history because he read the book"
# pycocoevalcap adds 1e-9 to each n-gram count (and to the reference length in the brevity ratio): with
# 11-18 tokens that moves a BLEU by ~1e-10 relative, so Papineni's values hold to rel 1e-9
OFFSET_REL = 1e-9


def test_bleu_matches_nltk_documented_examples():
    # nltk.translate.bleu_score docs (case-sensitive tokens, so tokenizer="none"): sentence_bleu
    # 0.5045666840058485 (three references), 0.4118... (reference1 only), corpus_bleu 0.5920778868801042
    assert rm.bleu([H1], [[R1, R2, R3]], tokenizer="none")["bleu_4"] == pytest.approx(0.5045666840058485,
                                                                                       rel=OFFSET_REL)
    assert rm.bleu([H1], [R1], tokenizer="none")["bleu_4"] == pytest.approx(0.4118, abs=1e-4)
    assert rm.bleu([H1, H2], [[R1, R2, R3], R2A], tokenizer="none")["bleu_4"] == pytest.approx(0.5920778868801042,
                                                                                               rel=OFFSET_REL)
    # modified_precision docs: 17/18 unigrams and 10/17 bigrams; BP = 1 (closest reference: 18 tokens)
    b = rm.bleu([H1], [[R1, R2, R3]], max_n=2, tokenizer="none")
    assert b == {"bleu_1": pytest.approx(17 / 18, rel=OFFSET_REL),
                 "bleu_2": pytest.approx(math.sqrt(17 / 18 * 10 / 17), rel=OFFSET_REL)}


def _coco_bleu(matches, totals, c, r):
    """BLEU-1..N as pycocoevalcap's BleuScorer computes it (its tiny = 1e-15 and small = 1e-9)."""
    out, product = [], 1.0
    for k, (m, t) in enumerate(zip(matches, totals), 1):
        product *= (m + 1e-15) / (t + 1e-9)
        out.append(product ** (1 / k))
    ratio = (c + 1e-15) / (r + 1e-9)
    return [b * math.exp(1 - 1 / ratio) for b in out] if ratio < 1 else out


def test_bleu_clipping_brevity_penalty_and_properties():
    # Papineni: "the" x7 against two references: clipped unigram precision 2/7, closest ref length 7
    refs = [["the cat is on the mat", "there is a cat on the mat"]]
    assert rm.bleu(["the the the the the the the"], refs, max_n=1, tokenizer="simple")["bleu_1"] == \
        pytest.approx(2 / 7, rel=OFFSET_REL)
    # brevity: c = 2, r = 6 -> exp(1 - 3); the candidate has 1 bigram (matched) and no trigram, so
    # p_3 = p_4 = 1e-15 / 1e-9 in pycocoevalcap: BLEU-3 = exp(-2) 1e-6^(1/3), BLEU-4 = exp(-2) 1e-12^(1/4)
    short = rm.bleu(["The cat."], ["the cat sat on the mat"], tokenizer="simple")
    assert [short[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(_coco_bleu([2, 1, 0, 0], [2, 1, 0, 0], 2, 6),
                                                                      rel=1e-12)
    # 1e-9 added to a count of 1 bigram moves p_2 by 1e-9 relative
    assert [short["bleu_1"], short["bleu_2"]] == pytest.approx([math.exp(-2)] * 2, rel=2e-9)
    assert [short["bleu_3"], short["bleu_4"]] == pytest.approx([math.exp(-2) * 0.01, math.exp(-2) * 0.001], rel=1e-6)
    # closest reference length, ties to the shorter: candidate 4 tokens, refs of 3 and 5 -> r = 3, BP 1
    assert rm.bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1, tokenizer="none")["bleu_1"] == \
        pytest.approx(1.0, rel=OFFSET_REL)
    texts = ["Small left pleural effusion.", "No acute cardiopulmonary process. The lungs are clear."]
    assert rm.bleu(texts, texts, tokenizer="simple") == {f"bleu_{k}": pytest.approx(1.0, rel=OFFSET_REL)
                                                         for k in range(1, 5)}
    disjoint = rm.bleu(["alpha beta gamma delta"], ["one two three four"], tokenizer="simple")
    assert all(0 < v < 1e-3 for v in disjoint.values())  # 0 matches count 1e-15, not 0


def test_bleu_with_zero_ngram_matches_is_pycocoevalcaps_offset_value_not_zero():
    # "a cat sat the mat" vs "the cat sat on the mat": matches 4/5, 2/4, 0/3, 0/2; c = 5, r = 6.
    # Papineni's BLEU-3 and BLEU-4 are 0; pycocoevalcap's ~4e-6 and ~1e-8 (1e-15 / 3, 1e-15 / 2 in the product)
    b = rm.bleu(["a cat sat the mat"], ["the cat sat on the mat"], tokenizer="none")
    assert [b[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(_coco_bleu([4, 2, 0, 0], [5, 4, 3, 2], 5, 6),
                                                                  rel=1e-12)
    assert b["bleu_1"] == pytest.approx(math.exp(1 - 6 / 5) * 0.8, rel=OFFSET_REL)
    assert 1e-6 < b["bleu_3"] < 1e-5 and 1e-9 < b["bleu_4"] < 1e-7
    # no candidate with a 4-gram at all: p_4 = (0 + 1e-15) / (0 + 1e-9) = 1e-6, so BLEU-4 = 1e-6 ** (1/4)
    b = rm.bleu(["Small left effusion.", "No pneumothorax."], ["small left effusion", ["no pneumothorax"]],
                tokenizer="simple")
    assert b["bleu_3"] == pytest.approx(1.0, rel=OFFSET_REL) and b["bleu_4"] == pytest.approx(0.001 ** 0.5, rel=1e-6)


# ----------------------------------------------------------------------------- ROUGE-L (pycocoevalcap)

def test_rouge_l_lin_2004_example_and_beta():
    # Lin (2004): LCS("police killed the gunman", "police kill the gunman") = 3 -> P = R = 3/4;
    # with "the gunman kill police" LCS = 2. P = R makes F = P whatever beta is.
    assert rm.rouge_l(["police kill the gunman"], ["police killed the gunman"], tokenizer="simple") == \
        pytest.approx(0.75)
    assert rm.rouge_l(["the gunman kill police"], ["police killed the gunman"], tokenizer="simple") == \
        pytest.approx(0.5)
    assert rm.rouge_l(["police kill the gunman"], [["the gunman kill police", "police killed the gunman"]],
                      tokenizer="simple") == pytest.approx(0.75)
    # P = 1, R = 1/2, beta 1.2: (1 + 1.44) * 0.5 / (0.5 + 1.44)
    assert rm.rouge_l(["The cat sat."], ["the cat sat on the mat"], tokenizer="simple") == \
        pytest.approx(2.44 * 0.5 / 1.94)
    assert rm.rouge_l(["a b", "c d"], ["a b", "x y"], tokenizer="none") == pytest.approx(0.5)  # mean over reports


# ----------------------------------------------------------------------------- CIDEr-D (pycocoevalcap)

def test_cider_d_by_hand():
    # two documents, every n-gram in one of them: idf = log 2 for all, so each vector is tf * log 2.
    # identical bigram sentences: cosine 1 for n = 1, 2 and 0 for n = 3, 4 -> 10 * 2/4
    assert rm.cider_d(["a b", "c d"], ["a b", "c d"], tokenizer="none") == pytest.approx(5.0)
    # "a b" vs "a b c": unigram cos 2/sqrt(2*3), bigram 1/sqrt(2); bigram lengths 1 vs 2 ->
    # penalty exp(-1/72); the identical "d e f": 3 of 4 orders -> 7.5
    a = 10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
    mean, per = rm.cider_d(["a b", "d e f"], ["a b c", "d e f"], tokenizer="none", per_report=True)
    assert per == pytest.approx([a, 7.5]) and mean == pytest.approx((a + 7.5) / 2)
    # clipping: "x x" vs "x y": min(2w, w) * w / (2w * sqrt(2) w) = 1 / (2 sqrt 2) (1/sqrt 2 unclipped)
    mean, per = rm.cider_d(["x x", "z w"], ["x y", "z w"], tokenizer="none", per_report=True)
    assert per[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    # two references: the mean of the per-reference scores
    _, two = rm.cider_d(["a b", "d e f"], [["a b c", "a b"], "d e f"], tokenizer="none", per_report=True)
    assert two[0] == pytest.approx((10 * math.exp(-1 / 72) * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 + 5.0) / 2)


def test_cider_d_properties():
    texts = ["small left pleural effusion is seen", "no acute cardiopulmonary process is seen today"]
    assert rm.cider_d(texts, texts, tokenizer="simple") == pytest.approx(10.0)  # every n-gram rare enough
    assert rm.cider_d(["alpha beta gamma", texts[1]], texts, tokenizer="simple", per_report=True)[1][0] == 0.0
    assert rm.cider_d([texts[0]], [texts[0]], tokenizer="simple") == 0.0  # one document: every idf is 0


# ----------------------------------------------------------------------------- tokens and wrapper

def test_tokenize_lowercases_and_splits_punctuation():
    text = "The ET tube is 2.5 cm above the carina; no plate-like atelectasis. ___"
    assert rm.tokenize(text) == ["the", "et", "tube", "is", "2.5", "cm", "above", "the", "carina", "no",
                                 "plate-like", "atelectasis"]
    kept = rm.tokenize(text, keep_punctuation=True)
    assert kept[9] == ";" and kept[-4:] == [".", "_", "_", "_"]


def test_text_metrics_through_the_ptb_tokenizer_by_default():
    """The only JVM start in this module: evaluate's call, text_metrics(generated, references)."""
    cands = ["Small left effusion.", "No pneumothorax; can't exclude (tiny) nodule."]
    refs = ["small left effusion", ["no pneumothorax. ca n't exclude -lrb- tiny -rrb- nodule"]]
    out = rm.text_metrics(cands, refs)
    # PTB: "can't" -> "ca n't", brackets -> "-lrb-" / "-rrb-" (kept: pycocoevalcap drops only "-LRB-"),
    # so the candidates equal the references token for token
    assert set(out) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    assert out["rouge_l"] == 1.0
    assert [out[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx([1.0] * 4, rel=OFFSET_REL)
    simple = rm.text_metrics(cands, refs, tokenizer="simple")  # "can't" vs "ca n't", no brackets: not identical
    assert simple["rouge_l"] < 1.0 and simple["bleu_4"] < 0.9


def test_text_metric_inputs_are_checked_before_tokenizing(monkeypatch):
    with pytest.raises(ValueError, match="2 candidates but 1"):
        rm.text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        rm.rouge_l(["a"], [[]])
    with pytest.raises(ValueError, match="at least one candidate"):
        rm.text_metrics([], [])
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        rm.bleu(["a"], ["a"], tokenizer="nltk")
    with pytest.raises(ValueError, match="every reference is empty"):
        rm.cider_d(["a b"], ["..."], tokenizer="simple")
    monkeypatch.setattr(rm.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="needs Java"):
        rm.text_metrics(["a"], ["a"])


# ----------------------------------------------------------------------------- METEOR

METEOR_PAIRS = [("Small left pleural effusion.", "small left pleural effusion."),  # identical words
                ("Moderate cardiomegaly with pulmonary edema.", "No acute cardiopulmonary process."),  # unrelated
                ("No pneumothorax is seen.", ["There is no pneumothorax.", "No pleural effusion."])]  # two refs


class _Recorded:
    """Every pycocoevalcap Meteor made during a test, to check its JVM was closed."""

    def __init__(self, monkeypatch, make):
        self.made = []
        monkeypatch.setattr(rm.coco_meteor, "Meteor", lambda: self.made.append(make()) or self.made[-1])

    def all_closed(self):
        return self.made and all(m.meteor_p.returncode is not None and m.meteor_p.stdout.closed for m in self.made)


def test_meteor_is_pycocoevalcaps_scorer_on_our_tokens_and_closes_its_jvm(monkeypatch):
    """METEOR 1.5 (Java): identical text scores high, unrelated text low, and every number equals a
    direct pycocoevalcap Meteor call on the same tokens; no JVM is left running. The direct scorer
    starts first so that the two JVMs load their paraphrase tables side by side."""
    from pycocoevalcap.meteor.meteor import Meteor

    direct = Meteor()
    try:
        real = _Recorded(monkeypatch, Meteor)
        cands, refs = [c for c, _ in METEOR_PAIRS], [r for _, r in METEOR_PAIRS]
        score, each = rm.meteor(cands, refs, tokenizer="simple", per_report=True)
        assert real.all_closed() and len(real.made) == 1
        gts = {i: [" ".join(rm.tokenize(r)) for r in ([r] if isinstance(r, str) else r)] for i, r in enumerate(refs)}
        res = {i: [" ".join(rm.tokenize(c))] for i, c in enumerate(cands)}
        assert (score, each) == direct.compute_score(gts, res)
    finally:
        rm._stop_meteor(direct)
    assert each[0] > 0.9 and each[1] < 0.1 and 0.2 < each[2] < each[0]
    assert direct.meteor_p.returncode is not None


def test_meteor_not_computed_is_stated_not_raised(monkeypatch):
    """Without Java, or when the jar dies, text_metrics states why METEOR is missing and scores the
    rest; the dead process is reaped and the wrapper's lock left free (its __del__ would wait on it)."""
    import gc
    import subprocess
    import sys
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    class Dying(Meteor):  # pycocoevalcap's __init__ with a program that fails as a JVM short of memory does
        def __init__(self):
            self.meteor_cmd = [sys.executable, "-c", "import sys; sys.stderr.write('Error: Could not reserve heap\\n')"]
            self.meteor_p = subprocess.Popen(self.meteor_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
            self.lock = threading.Lock()

    dying = _Recorded(monkeypatch, Dying)
    out = rm.text_metrics(["a b c"], ["a b d"], tokenizer="simple", meteor=True)
    assert out["meteor_not_computed"] == "METEOR 1.5 failed: Error: Could not reserve heap" and "meteor" not in out
    assert out["rouge_l"] > 0 and dying.all_closed() and not dying.made[0].lock.locked()
    dying.made.clear()
    gc.collect()  # pycocoevalcap's __del__ runs on a closed scorer without blocking
    with pytest.raises(RuntimeError, match="METEOR 1.5 failed"):
        rm.meteor(["a"], ["a"], tokenizer="simple")
    monkeypatch.setattr(rm.shutil, "which", lambda name: None)
    out = rm.text_metrics(["a b c"], ["a b d"], tokenizer="simple", meteor=True)
    assert out["meteor_not_computed"].startswith("METEOR cannot run: Java is not on PATH")
    assert len(dying.made) == 1  # no scorer started without Java
    assert "meteor" not in rm.text_metrics(["a"], ["a"], tokenizer="simple")  # off unless asked for
