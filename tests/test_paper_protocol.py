"""`llmcxr evaluate --protocol paper`: options that contradict the paper are refused in one line, the
paper's inputs are found or reported missing (or required), classifier scores leave out the findings a
classifier does not predict, metrics.md sets the paper's numbers beside ours with the difference; and,
slow, the whole protocol on the synthetic corpus with random torchxrayvision and Inception weights
fills every cell of the table."""
import json
import pickle
import re

import numpy as np
import pytest
import sklearn.metrics as skm

from llmcxr_jax import cli
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.eval import evaluate as E
from llmcxr_jax.eval import protocol, report_card, scores

LABELS = mimic_cxr.CHEXPERT_LABELS


def _cli(capsys, tmp_path, *args):
    code = cli.main(["evaluate", "--ckpt", str(tmp_path / "lm"), "--vqgan", str(tmp_path / "vq"), "--data",
                     str(tmp_path / "data"), "--out", str(tmp_path / "out"), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--greedy"], "--protocol paper samples (top_p 0.92, top_k 0); --greedy contradicts it"),
    (["--temperature", "0.7"], "samples at temperature 1; --temperature 0.7 contradicts it"),
    (["--image-temperature", "0.8"], "draws at temperature 1; --image-temperature 0.8 contradicts it"),
    (["--top-k", "5"], "--top-k 5 contradicts it"),
    (["--top-p", "1"], "--top-p 1.0 contradicts it"),
    (["--report-part", "findings+impression"], "compares against the impression"),
    (["--tasks", "report,image"], "scores all three tasks; --tasks report,image contradicts it"),
    (["--text-tokenizer", "simple"], "PTB tokens; --text-tokenizer simple contradicts it"),
    (["--ci-samples", "0"], "bootstrap intervals; --ci-samples 0 contradicts it"),
    (["--max-new-tokens", "64"], "allows 128 new tokens"),
])
def test_contradicting_options_are_refused_in_one_line(capsys, tmp_path, args, message):
    code, err = _cli(capsys, tmp_path, "--protocol", "paper", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert "leave out" in err and not (tmp_path / "out").exists()


def test_the_papers_own_values_pass_and_turn_meteor_on():
    o = E.EvalOptions(protocol="paper", temperature=1.0, top_p=0.92, top_k=0, max_new_tokens=128,
                      image_temperature=1.0, ci_samples=200)
    assert o.meteor and not E.EvalOptions().meteor
    with pytest.raises(ValueError, match="protocol must be 'paper'"):
        E.EvalOptions(protocol="ours")
    with pytest.raises(ValueError, match="--require-all-metrics applies with --protocol paper"):
        E.EvalOptions(require_all_metrics=True)


def test_missing_weight_files_and_required_metrics_fail_before_anything_runs(capsys, tmp_path):
    code, err = _cli(capsys, tmp_path, "--inception-weights", str(tmp_path / "inception.pth"), "--tasks", "image")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--inception-weights {tmp_path / 'inception.pth'} does not exist" in err
    code, err = _cli(capsys, tmp_path, "--txv-weights", str(tmp_path / "txv.safetensors"))
    assert code == 2 and f"--txv-weights {tmp_path / 'txv.safetensors'} does not exist" in err, err
    code, err = _cli(capsys, tmp_path, "--protocol", "paper", "--require-all-metrics")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--require-all-metrics: txv classifier AUROC / F1 and FID on txv features cannot be computed: " \
           "--txv-weights FILE" in err and "FID on Inception features" in err
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_the_evaluation_list(tmp_path):
    o = E.EvalOptions(protocol="paper")
    assert [cells for cells, _ in protocol.missing_inputs(o, None)] == [
        "txv classifier AUROC / F1 and FID on txv features", "FID on Inception features"]
    features_only = E.EvalOptions(protocol="paper", txv_weights="f.safetensors", inception_weights="i.pth")
    (cells, fill), = protocol.missing_inputs(features_only, txv_is_classifier=False)
    assert cells == "txv classifier AUROC / F1" and "features only" in fill
    assert protocol.missing_inputs(features_only, txv_is_classifier=True) == []
    assert protocol.paper_eval_list(o, str(tmp_path)) == ""  # rebuilt from the metadata
    (tmp_path / "eval_dicom_ids.pickle").write_bytes(pickle.dumps(["a"]))
    assert protocol.paper_eval_list(o, str(tmp_path)) == str(tmp_path / "eval_dicom_ids.pickle")
    assert protocol.paper_eval_list(E.EvalOptions(protocol="paper", eval_list="mine.txt"), str(tmp_path)) == "mine.txt"
    described = protocol.describe(o, {"eval_list": "", "n": 12}, [("METEOR", "Java is not on PATH")])
    assert described["missing"] == [["METEOR", "Java is not on PATH"]]
    assert any("12 images; the paper lists 3530" in d for d in described["departures"])
    assert any("rule-based CheXpert-style labeler" in d for d in described["departures"])
    assert protocol.describe(E.EvalOptions(), {"n": 3}) == {"name": "as given", "selection": {"n": 3}}


def test_classifier_scores_leave_out_the_findings_it_does_not_predict():
    rng = np.random.default_rng(0)
    ref = (rng.random((60, len(LABELS))) < 0.3).astype(float)
    probs = np.clip(0.4 * ref + 0.8 * rng.random(ref.shape), 0, 1)
    absent = [LABELS.index(n) for n in ("No Finding", "Pleural Other", "Support Devices")]
    probs[:, absent] = np.nan
    kept = [j for j in range(len(LABELS)) if j not in absent]
    s = scores.classifier_scores(probs, ref, ci_samples=100)
    y, p = ref[:, kept].astype(int), probs[:, kept]
    assert s["auroc_micro"] == pytest.approx(skm.roc_auc_score(y.ravel(), p.ravel()), abs=1e-12)
    assert s["auroc_macro"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"), abs=1e-12)
    for avg in ("micro", "macro"):
        assert s[f"f1_{avg}"] == pytest.approx(skm.f1_score(y, p >= 0.5, average=avg, zero_division=0), abs=1e-12)
        lo, hi = s[f"f1_{avg}_ci"]
        assert lo < s[f"f1_{avg}"] < hi
    assert s["per_class"]["Support Devices"]["not_predicted"] and np.isnan(s["per_class"]["No Finding"]["auroc"])
    assert s["per_class"]["Edema"]["f1"] == pytest.approx(skm.f1_score(y[:, kept.index(LABELS.index("Edema"))],
                                                                        p[:, kept.index(LABELS.index("Edema"))] >= 0.5))
    chance = scores.chance_classifier_scores(ref, ~np.isnan(probs[0]))
    prevalence = ref[:, kept].mean(0)
    assert chance["f1_macro"] == pytest.approx(prevalence.mean()) and chance["auroc_macro"] == 0.5
    assert chance["per_class"]["Support Devices"]["not_predicted"]


def _paper_metrics(**image):
    per = {n: {"f1": 0.3, "support": 5, "f1_ci": [0.2, 0.4]} for n in LABELS}
    txv = {n: ({"auroc": float("nan"), "f1": float("nan"), "support": 5, "not_predicted": True}
               if n == "Support Devices" else {"auroc": 0.7, "f1": 0.4, "support": 5, "auroc_ci": [0.6, 0.8]})
           for n in LABELS}
    return {"n_images": 5, "protocol": {"name": "paper", "selection": {"eval_list": "/d/eval_dicom_ids.pickle"},
                                        "departures": ["a subset only"], "missing": [["METEOR", "no Java"]]},
            "report": {"labels": {"f1_micro": 0.36, "per_class": per}, "text": {}},
            "image": {"n": 5, "txv_classifier": {"auroc_micro": 0.7, "per_class": txv}, **image}, "baselines": {}}


def test_markdown_states_the_protocol_and_fills_findings_from_both_classifiers():
    md = report_card.markdown(_paper_metrics())
    assert "Protocol: paper (`--protocol paper`): LLM-CXR's evaluation on the evaluation list " \
           "/d/eval_dicom_ids.pickle" in md
    assert "Departures from the paper:\n- a subset only" in md and "- METEOR: no Java" in md
    assert "| CXR->report | label F1 micro (14 obs.) | 0.360 | - | 0.360 | +0.000 | UniXGen-512 0.413 |" in md
    assert "| report->CXR | txv classifier AUROC micro | 0.700 | - | 0.79-0.81 | -0.090 (to 0.79) |" in md
    assert "| Edema | 5 | 0.300 (0.20-0.40) | 0.700 (0.60-0.80) | 0.400 | missing | missing |" in md
    assert "| Support Devices | 5 | 0.300 (0.20-0.40) | - | - | missing | missing |" in md
    assert "our-classifier columns missing: --classifier DIR" in md and "Cardiomegaly |" in md


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_paper_protocol_end_to_end_fills_every_cell(capsys, tmp_path):
    """The whole protocol on a synthetic corpus: a tiny random LM and VQ-GAN, our classifier trained
    for a few steps, a random full-size torchxrayvision DenseNet-121 classifier (released
    densenet121-res224-all operating points) and random FID Inception weights as torch-fidelity
    writes them. Every headline cell and every per-finding cell has a number (or '-' where the txv
    weights predict nothing), and metrics.md states the protocol."""
    import inception_refs
    from flax import nnx
    from generator_helpers import VQ, tiny_lm
    from lm_run_helpers import make_setup

    from llmcxr_jax import checkpoint
    from llmcxr_jax.convert import perceptual_weights as W
    from llmcxr_jax.eval import cxr_classifier as C
    from llmcxr_jax.models import perceptual as P
    from llmcxr_jax.models import txv_classifier as M
    from llmcxr_jax.models.vqgan import init_vqgan

    setup = make_setup(str(tmp_path / "setup"), num_images=128, seed=1)
    checkpoint.save_vqgan(str(tmp_path / "vqgan"), init_vqgan(VQ, 0))
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    train = [r for r in corpus.records if r.split == "train"][:16]
    cfg = C.ClassifierConfig(image_size=32, widths=(8, 8))
    model = C.train_classifier(C.load_images(train, 32), C.targets_for(train, mimic_cxr.read_chexpert_labels(
        setup["root"])), cfg, steps=2, batch=8)
    C.save_classifier(model, cfg, str(tmp_path / "classifier"))
    txv = M.DenseNetClassifier(P.txv_densenet121("float32", "float32"), len(M.TXV_PATHOLOGIES), nnx.Rngs(params=0))
    targets, threshs = M.released_weights("densenet121-res224-all")
    txv.op_threshs.set_value(threshs)
    # Random BatchNorm statistics leave the pooled features in the hundreds, where FID's check of the
    # covariance root (imaginary part within 1e-3, absolute) fails on a few images; scale them to order 1.
    txv.norm5.scale.set_value(txv.norm5.scale.get_value() * 1e-3)
    txv.norm5.bias.set_value(txv.norm5.bias.get_value() * 1e-3)
    W.save_txv_classifier(W.classifier_weights(txv, targets), str(tmp_path / "txv.safetensors"))
    inception = inception_refs.save_state_dict(inception_refs.random_inception_state_dict(seed=0),
                                               str(tmp_path / "inception.pth"))
    n_eval = len(mimic_cxr.evaluation_records(corpus))
    ids = [r.dicom_id for r in mimic_cxr.evaluation_records(corpus)]
    (tmp_path / "eval_dicom_ids.txt").write_text("\n".join(ids) + "\nnot-in-this-corpus\n")

    out = tmp_path / "out"
    code = cli.main(["evaluate", "--ckpt", tiny_lm(str(tmp_path / "lm"), setup["tokenizer"], 64), "--vqgan",
                     str(tmp_path / "vqgan"), "--data", setup["root"], "--out", str(out), "--protocol", "paper",
                     "--require-all-metrics", "--classifier", str(tmp_path / "classifier"), "--txv-weights",
                     str(tmp_path / "txv.safetensors"), "--inception-weights", inception, "--eval-list",
                     str(tmp_path / "eval_dicom_ids.txt"), "--max-new-tokens", "128", "--max-vqa", "6",
                     "--batch-size", "8", "--ci-samples", "200", "--grid-images", "0"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == n_eval >= 8 and m["protocol"]["name"] == "paper" and m["protocol"]["missing"] == []
    assert m["protocol"]["selection"]["not_in_corpus"] == 1
    opts = m["options"]
    assert (opts["temperature"], opts["top_p"], opts["top_k"], opts["greedy"], opts["report_part"], opts["meteor"]) \
        == (1.0, 0.92, 0, False, "impression", True)
    assert 0 <= m["report"]["text"]["meteor"] <= 1
    assert np.isfinite([m["image"]["fid_inception"], m["image"]["fid_txv"]]).all()
    md = (out / "metrics.md").read_text()
    print(md)
    assert "Protocol: paper (`--protocol paper`)" in md
    headline = [line for line in md.splitlines() if re.match(r"\| (CXR->report|report->CXR|CXR-VQA|VQ-GAN) \|", line)]
    assert len(headline) == len(report_card.PAPER_ROWS)
    for line in headline:
        ours = line.split(" | ")[2]
        assert re.match(r"^-?\d+\.\d+%?( \(.*\))?$", ours), line  # a number, perhaps with its interval
    for row in report_card.PAPER_ROWS:  # the headline scores with intervals show them
        if report_card.lookup(m, row.path + "_ci") is not None:
            assert any(row.metric in line and " (" in line.split(" | ")[2] for line in headline), row.metric
    findings = md.split("| finding | support |")[1].splitlines()[2:2 + len(LABELS)]
    assert len(findings) == len(LABELS)
    for line in findings:
        cells = line.strip("| ").split(" | ")
        assert "missing" not in cells and "not run" not in cells, line
        if cells[0] in ("No Finding", "Pleural Other", "Support Devices"):  # not among txv's outputs
            assert cells[3:5] == ["-", "-"], line
