"""`llmcxr evaluate` on a tiny random LM and VQ-GAN over a synthetic corpus: every output is written,
labels can come from a CheXpert-labeler CSV, chance baselines are what they claim, bad input fails
in one line before any generation."""
import csv
import json

import numpy as np
import pytest
from generator_helpers import VQ, tiny_lm
from lm_run_helpers import make_setup

from llmcxr_jax import checkpoint, cli
from llmcxr_jax.data import mimic_cxr
from llmcxr_jax.eval import cxr_classifier as C
from llmcxr_jax.eval import evaluate as E
from llmcxr_jax.eval import report_card
from llmcxr_jax.eval.report_metrics import label_metrics
from llmcxr_jax.models.vqgan import init_vqgan

LABELS = mimic_cxr.CHEXPERT_LABELS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    setup = make_setup(str(d / "setup"), num_images=40, seed=1)
    checkpoint.save_vqgan(str(d / "vqgan"), init_vqgan(VQ, 0))
    corpus = mimic_cxr.load_corpus(setup["root"], progress=False)
    train = [r for r in corpus.records if r.split == "train"][:16]
    cfg = C.ClassifierConfig(image_size=32, widths=(8, 8))
    labels = mimic_cxr.read_chexpert_labels(setup["root"])
    model = C.train_classifier(C.load_images(train, 32), C.targets_for(train, labels), cfg, steps=2, batch=8)
    C.save_classifier(model, cfg, str(d / "classifier"))
    return {"lm": tiny_lm(str(d / "lm"), setup["tokenizer"], 64), "vqgan": str(d / "vqgan"),
            "root": setup["root"], "classifier": str(d / "classifier"),
            "n_eval": len(mimic_cxr.evaluation_records(corpus))}


def _evaluate(capsys, env, out, *args):
    code = cli.main(["evaluate", "--ckpt", env["lm"], "--vqgan", env["vqgan"], "--data", env["root"],
                     "--out", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_writes_every_output(capsys, env, tmp_path):
    assert env["n_eval"] >= 3
    code, out, err = _evaluate(capsys, env, tmp_path, "--max-new-tokens", "8", "--classifier", env["classifier"],
                               "--max-vqa", "5", "--grid-images", "2", "--batch-size", "2", "--temperature", "0.7",
                               "--image-temperature", "0.9")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["n_images"] == env["n_eval"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    n = env["n_eval"]
    assert (m["options"]["temperature"], m["options"]["top_p"], m["options"]["greedy"]) == (0.7, 0.92, False)
    assert m["options"]["image_temperature"] == 0.9
    assert m["report"]["labels"]["n_reports"] == n and 0 <= m["report"]["labels"]["f1_micro"] <= 1
    assert set(m["report"]["text"]) >= {"bleu_4", "rouge_l", "cider_d"}
    assert m["image"]["n"] == n and np.isfinite(m["image"]["fid_classifier"])
    assert set(m["image"]["classifier"]["per_class"]) == set(LABELS)
    assert m["n_vqa"] == 5 and m["vqa"]["all"]["count"] == 5 and "all" in m["baselines"]["vqa"]
    assert m["vqgan"]["psnr"] > 0 and -1 <= m["vqgan"]["ssim"] <= 1
    with open(tmp_path / "reports.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dicom_id", "reference", "generated"] and len(rows) == n + 1
    assert all(r[1].strip() for r in rows[1:])  # references are the impressions
    assert len((tmp_path / "generated_reports.csv").read_text().splitlines()) == n
    assert len(list((tmp_path / "images").glob("*.png"))) == n
    assert (tmp_path / "grid_0.png").is_file() and (tmp_path / "grid_1.png").is_file()
    assert len((tmp_path / "vqa.jsonl").read_text().splitlines()) == 5
    md = (tmp_path / "metrics.md").read_text()
    assert "| CXR->report | label F1 micro (14 obs.) |" in md and "0.360" in md and "44.8%" in md
    assert "Decoding: sampled at temperature 0.7 (drawings 0.9), top_p 0.92, top_k 0 (0: off)." in md
    assert "LLM-CXR (paper)" in err  # the table is printed too


def test_grid_images_zero_draws_no_grid(capsys, env, tmp_path):
    """0 columns means no grids (it divided by zero in the grid loop)."""
    code, _, err = _evaluate(capsys, env, tmp_path, "--tasks", "image", "--max-images", "2", "--grid-images", "0",
                             "--batch-size", "2", "--ci-samples", "0")
    assert code == 0, err
    assert (tmp_path / "metrics.json").is_file() and not list(tmp_path.glob("grid_*.png"))


@pytest.mark.parametrize("args, message", [(["--temperature", "-1"], "temperature must be > 0"),
                                           (["--image-temperature", "0"], "image_temperature must be > 0"),
                                           (["--top-k", "-2"], "top_k must be >= 0")])
def test_bad_sampling_settings_fail_before_generating(capsys, env, tmp_path, args, message):
    code, _, err = _evaluate(capsys, env, tmp_path / "o", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_labels_from_a_chexpert_csv(capsys, env, tmp_path):
    first = tmp_path / "first"
    code, _, err = _evaluate(capsys, env, first, "--tasks", "report", "--max-new-tokens", "6", "--greedy")
    assert code == 0, err
    generated = (first / "generated_reports.csv").read_text().splitlines()
    csv_path = tmp_path / "labeled.csv"
    with open(csv_path, "w", newline="") as f:  # the CheXpert labeler's output header, everything cardiomegaly
        w = csv.writer(f)
        w.writerow(["Reports", *LABELS])
        w.writerows([next(csv.reader([g]))[0] if g else "", *["1.0" if n == "Cardiomegaly" else "" for n in LABELS]]
                    for g in generated)
    second = tmp_path / "second"
    code, _, err = _evaluate(capsys, env, second, "--tasks", "report", "--max-new-tokens", "6", "--greedy",
                             "--generated-labels", str(csv_path))
    assert code == 0, err
    m = json.loads((second / "metrics.json").read_text())
    per = m["report"]["labels"]["per_class"]
    assert per["Cardiomegaly"]["predicted"] == env["n_eval"] and per["Pneumothorax"]["predicted"] == 0
    assert m["labels_from"].startswith("CSV")
    # a CSV that lacks some generated report is refused with the file to label
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerow(["Reports", *LABELS])
    code, _, err = _evaluate(capsys, env, tmp_path / "third", "--tasks", "report", "--max-new-tokens", "6",
                             "--greedy", "--generated-labels", str(csv_path))
    last = err.strip().splitlines()[-1]  # after the progress bars of generation
    assert code == 2 and last.startswith("llmcxr evaluate: error:") and "generated_reports.csv" in last


@pytest.mark.parametrize("args, message", [
    (["--tasks", "report,draw"], "unknown evaluation task"),
    (["--classifier", "{tmp}/none"], "classifier.safetensors"),
    (["--batch-size", "0"], "batch_size"),
    (["--max-images", "-3"], "max_images must be >= 0 (0: every image), got -3"),  # not a slice from the end
    (["--max-vqa", "-1"], "max_vqa must be >= 0"),
    (["--max-new-tokens", "-8"], "max_new_tokens must be >= 0"),
])
def test_bad_input_is_one_line(capsys, env, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = _evaluate(capsys, env, tmp_path / "out", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "reports.csv").exists()


def test_drawings_sample_at_their_own_temperature():
    o = E.EvalOptions(temperature=0.5, image_temperature=0.8, max_new_tokens=96)
    image, report, vqa = (E.task_sampling(o, t, 64) for t in ("image", "report", "vqa"))
    assert (image.temperature, report.temperature, vqa.temperature) == (0.8, 0.5, 0.5)
    assert (report.max_new_tokens, vqa.max_new_tokens) == (96, 96) and image.max_new_tokens > 64  # the span
    assert E.task_sampling(E.EvalOptions(temperature=0.5), "image", 64).temperature == 0.5  # unset: the same
    assert E.task_sampling(E.EvalOptions(greedy=True, image_temperature=0.8), "image", 64).greedy


def test_chance_baseline_matches_random_reports():
    rng = np.random.default_rng(0)
    prevalence = np.linspace(0.05, 0.6, len(LABELS))
    ref = (rng.random((20000, len(LABELS))) < prevalence).astype(float)
    gen = (rng.random(ref.shape) < prevalence).astype(float)
    measured, chance = label_metrics(ref, gen), E.chance_label_metrics(ref)
    for key in ("f1_micro", "f1_macro", "auroc_micro"):
        assert abs(measured[key] - chance[key]) < 0.01, key
    assert abs(measured["per_class"]["Cardiomegaly"]["f1"] - chance["per_class"]["Cardiomegaly"]["f1"]) < 0.02


def test_classifier_scores_and_vqa_baseline():
    ref = np.zeros((6, len(LABELS)))
    ref[:3, LABELS.index("Pneumothorax")] = 1
    probs = np.full(ref.shape, 0.5)
    probs[:, LABELS.index("Pneumothorax")] = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]
    s = E.classifier_scores(probs, ref)
    assert s["per_class"]["Pneumothorax"]["auroc"] == 1.0 and np.isnan(s["per_class"]["Edema"]["auroc"])
    ci = E.classifier_scores(probs, ref, ci_samples=200)["per_class"]
    assert ci["Pneumothorax"]["auroc_ci"] == [1.0, 1.0] and np.isnan(ci["Edema"]["auroc_ci"]).all()
    chance = E.chance_classifier_scores(ref)
    assert chance["per_class"]["Pneumothorax"]["auroc"] == 0.5 and chance["auroc_micro"] > 0.5
    refs, kinds = ["Yes.", "yes", "no", "left", "right", "left"], ["presence"] * 3 + ["location"] * 3
    assert E._most_frequent(refs, kinds) == ["yes"] * 3 + ["left"] * 3


def test_markdown_lists_paper_numbers_and_missing_parts():
    md = report_card.markdown({"n_images": 2, "report": {"labels": {"f1_micro": 0.5}}, "baselines": {}})
    assert "| CXR->report | label F1 micro (14 obs.) | 0.500 | not run | 0.360 | UniXGen-512 0.413 |" in md
    assert "| report->CXR | classifier AUROC micro | not run |" in md


def test_markdown_shows_per_finding_intervals_when_computed():
    per = {"Cardiomegaly": {"f1": 0.44, "support": 60, "f1_ci": [0.35, 0.52]},
           "Pneumothorax": {"f1": 0.5, "support": 50, "f1_ci": [float("nan"), float("nan")]}}
    gen = {"Cardiomegaly": {"auroc": 0.6, "auroc_ci": [0.52, 0.68]}}
    md = report_card.markdown({"report": {"labels": {"per_class": per}}, "image": {"classifier": {"per_class": gen}},
                               "baselines": {}})
    assert "| Cardiomegaly | 60 | 0.440 (0.35-0.52) | not run | 0.600 (0.52-0.68) |" in md
    assert "| Pneumothorax | 50 | 0.500 | not run | not run |" in md


def test_ptb_tokenizer_without_java_fails_before_generating(capsys, env, tmp_path, monkeypatch):
    """BLEU / ROUGE-L / CIDEr-D take pycocoevalcap's PTB tokens, which need Java: without it the
    run stops in one line naming the way out, before any model loads; --text-tokenizer simple runs."""
    import shutil

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    code, _, err = _evaluate(capsys, env, tmp_path / "o", "--tasks", "report", "--max-images", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "needs Java" in err, err
    assert not (tmp_path / "o").exists()
    code, _, err = _evaluate(capsys, env, tmp_path / "simple", "--tasks", "report", "--max-images", "2",
                             "--max-new-tokens", "4", "--greedy", "--ci-samples", "0", "--text-tokenizer", "simple")
    assert code == 0, err
    assert json.loads((tmp_path / "simple" / "metrics.json").read_text())["options"]["text_tokenizer"] == "simple"
