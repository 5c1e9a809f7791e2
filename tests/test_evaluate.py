"""`llmcxr evaluate` on a tiny random LM and VQ-GAN over a synthetic corpus: every output is written,
labels can come from a CheXpert-labeler CSV, chance baselines are what they claim, instructions are
drawn per image from a seed and recorded, LLM-CXR's retry decoding records retries per image and leaves
failed images out of the scores, bad input fails in one line before any generation."""
import csv
import json

import numpy as np
import pytest
from board_helpers import hparams, read_board, text, text_tags
from decoding_helpers import fixed_lm
from generator_helpers import VQ, tiny_lm
from lm_run_helpers import make_setup

from llmcxr_jax import checkpoint, cli
from llmcxr_jax.data import instructions, mimic_cxr, prompts
from llmcxr_jax.eval import board as eval_board
from llmcxr_jax.eval import cxr_classifier as C
from llmcxr_jax.eval import evaluate as E
from llmcxr_jax.eval import image_scores, report_card, scores
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
    return {"lm": tiny_lm(str(d / "lm"), setup["tokenizer"], 64, step=7), "vqgan": str(d / "vqgan"),
            "root": setup["root"], "classifier": str(d / "classifier"),
            "fixed": fixed_lm(str(d / "fixed"), setup["tokenizer"], image_prob=0.3),
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
    assert set(m["report"]["text"]) >= {"bleu_4", "rouge_l", "cider_d", "rouge_l_ci", "cider_d_ci"}
    assert "meteor" not in m["report"]["text"] and m["protocol"]["name"] == "as given"
    lo, hi = m["report"]["labels"]["f1_micro_ci"]
    assert lo <= m["report"]["labels"]["f1_micro"] <= hi
    assert m["image"]["n"] == n and np.isfinite(m["image"]["fid_classifier"])
    assert set(m["image"]["classifier"]["per_class"]) == set(LABELS)
    assert m["n_vqa"] == 5 and m["vqa"]["all"]["count"] == 5 and "all" in m["baselines"]["vqa"]
    assert m["vqgan"]["psnr"] > 0 and -1 <= m["vqgan"]["ssim"] <= 1
    with open(tmp_path / "reports.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["dicom_id", "reference", "generated", "instruction"] and len(rows) == n + 1
    assert all(r[1].strip() for r in rows[1:])  # references are the impressions
    assert {r[3] for r in rows[1:]} == {prompts.REPORT_INSTRUCTIONS[0]}  # none given: our first paraphrase
    assert len((tmp_path / "generated_reports.csv").read_text().splitlines()) == n
    assert len(list((tmp_path / "images").glob("*.png"))) == n
    assert (tmp_path / "grid_0.png").is_file() and (tmp_path / "grid_1.png").is_file()
    assert len((tmp_path / "vqa.jsonl").read_text().splitlines()) == 5
    md = (tmp_path / "metrics.md").read_text()
    assert "| CXR->report | label F1 micro (14 obs.) |" in md and "0.360" in md and "44.8%" in md
    assert "| CXR->report | METEOR | missing: --meteor (Java) |" in md
    assert "Protocol: the options as given" in md
    assert "Decoding: sampled at temperature 0.7 (drawings 0.9), top_p 0.92, top_k 0 (0: off)." in md
    assert "LLM-CXR (paper)" in err  # the table is printed too
    # TensorBoard's reader, all at the checkpoint's step 7: every number of metrics.json, real over generated
    # CXRs (2 columns), the first reports and answers beside their references, the command's options
    acc = read_board(tmp_path / "tensorboard")
    scalars = acc.Tags()["scalars"]
    assert {"report/labels/f1_micro", "report/text/bleu_4", "image/fid_classifier", "vqa/all/score", "vqgan/psnr",
            "baselines/report/labels/f1_micro", "n_images"} <= set(scalars)
    assert not [t for t in scalars if t.startswith(("options/", "protocol/"))]
    assert [(e.step, e.value) for e in acc.Scalars("report/labels/f1_micro")] == [
        (7, pytest.approx(m["report"]["labels"]["f1_micro"]))]
    (grid,) = acc.Images("real_vs_generated")
    assert (grid.step, grid.height, grid.width) == (7, 2 * VQ.resolution, 2 * VQ.resolution)
    assert text_tags(acc) == {"reports/text_summary", "vqa/text_summary"}
    ((step, reports),) = text(acc, "reports/text_summary")
    assert step == 7 and reports.splitlines()[0] == "| dicom_id | reference | generated |"
    assert len(reports.splitlines()) == 2 + min(n, eval_board.SAMPLE_ROWS) and rows[1][0] in reports
    assert len(text(acc, "vqa/text_summary")[0][1].splitlines()) == 2 + 5
    assert hparams(acc)["temperature"] == 0.7 and hparams(acc)["checkpoint"].endswith("lm")


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
    (["--image-decoding", "retry", "--max-retries", "-2"], "max_retries must be >= 0"),
    (["--max-retries", "5"], "--max-retries applies with --image-decoding retry"),
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
    measured, chance = label_metrics(ref, gen), scores.chance_label_metrics(ref)
    for key in ("f1_micro", "f1_macro", "auroc_micro"):
        assert abs(measured[key] - chance[key]) < 0.01, key
    assert abs(measured["per_class"]["Cardiomegaly"]["f1"] - chance["per_class"]["Cardiomegaly"]["f1"]) < 0.02


def test_classifier_scores_and_vqa_baseline():
    ref = np.zeros((6, len(LABELS)))
    ref[:3, LABELS.index("Pneumothorax")] = 1
    probs = np.full(ref.shape, 0.5)
    probs[:, LABELS.index("Pneumothorax")] = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]
    s = scores.classifier_scores(probs, ref)
    assert s["per_class"]["Pneumothorax"]["auroc"] == 1.0 and np.isnan(s["per_class"]["Edema"]["auroc"])
    ci = scores.classifier_scores(probs, ref, ci_samples=200)["per_class"]
    assert ci["Pneumothorax"]["auroc_ci"] == [1.0, 1.0] and np.isnan(ci["Edema"]["auroc_ci"]).all()
    chance = scores.chance_classifier_scores(ref)
    assert chance["per_class"]["Pneumothorax"]["auroc"] == 0.5 and chance["auroc_micro"] > 0.5
    refs, kinds = ["Yes.", "yes", "no", "left", "right", "left"], ["presence"] * 3 + ["location"] * 3
    assert scores.most_frequent_answers(refs, kinds) == ["yes"] * 3 + ["left"] * 3


def test_markdown_lists_paper_numbers_and_missing_parts():
    md = report_card.markdown({"n_images": 2, "report": {"labels": {"f1_micro": 0.5, "f1_micro_ci": [0.4, 0.6]},
                                                         "text": {"meteor_not_computed": "Java is not on PATH"}},
                               "image": {"n": 2, "fid_txv": 1.714}, "vqa": {"all": {"score": 0.5, "count": 4}},
                               "baselines": {}})
    assert "| CXR->report | label F1 micro (14 obs.) | 0.500 (0.400-0.600) | - | 0.360 | +0.140 | UniXGen-512 0.413 |" \
        in md
    assert "| CXR->report | METEOR | not computed: Java is not on PATH | - | - | - | - |" in md
    assert "| report->CXR | FID, txv DenseNet features | 1.714 | - | 0.714 | +1.000 | RoentGen 6.04 |" in md
    assert "| report->CXR | txv classifier AUROC micro | missing: --txv-weights FILE holding the whole" in md
    assert "| report->CXR | our classifier AUROC micro | missing: --classifier DIR |" in md
    assert "| CXR-VQA | score, all questions | 50.0% | - | 44.8% | +5.2 pts | ELIXR 54.8% |" in md
    assert "| VQ-GAN | reconstruction SSIM | not run |" in md
    md = report_card.markdown({"image": {"n": 3, "txv_classifier": {"auroc_micro": 0.85}}})
    assert "| CXR->report | BLEU-4 | not run (--tasks report) |" in md
    assert "| report->CXR | txv classifier AUROC micro | 0.850 | - | 0.79-0.81 | +0.040 (to 0.81) |" in md
    md = report_card.markdown({"image": {"n": 3, "txv_classifier": {"auroc_micro": 0.8}}})
    assert "| 0.800 | - | 0.79-0.81 | within |" in md


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
                             "--max-new-tokens", "4", "--greedy", "--ci-samples", "0", "--text-tokenizer", "simple",
                             "--meteor")
    assert code == 0, err
    m = json.loads((tmp_path / "simple" / "metrics.json").read_text())
    assert m["options"]["text_tokenizer"] == "simple"
    # METEOR is a Java program too: asked for, it is stated as not computed, with the reason, not a crash
    assert "Java is not on PATH" in m["report"]["text"]["meteor_not_computed"] and "meteor" not in m["report"]["text"]
    assert "| CXR->report | METEOR | not computed: METEOR cannot run: Java is not on PATH" in \
        (tmp_path / "simple" / "metrics.md").read_text()
    assert "METEOR not computed" in err


def _column(path, name):
    with open(path, newline="", encoding="utf-8") as f:
        return [row[name] for row in csv.DictReader(f)]


def test_instructions_are_drawn_per_image_and_recorded(capsys, env, tmp_path, monkeypatch):
    made_up = ["Jot down what this film shows.", "Report on the radiograph as a resident would.",
               "Give the impression for the study attached."]
    (tmp_path / "report.txt").write_text("\n".join(made_up) + "\n")
    base = ["--tasks", "report", "--max-new-tokens", "2", "--greedy", "--ci-samples", "0", "--text-tokenizer",
            "simple", "--seed", "5", "--instructions", str(tmp_path / "report.txt")]
    used, prompted = {}, []
    real_report = E.tasks.Generator.report_results

    def report(self, paths, sampling, seed=0, instruction=None):  # what the prompts were built with
        prompted.extend(instruction)
        return real_report(self, paths, sampling, seed, instruction)

    monkeypatch.setattr(E.tasks.Generator, "report_results", report)
    for name, extra in (("a", ["--batch-size", "2"]), ("b", ["--batch-size", "3"]), ("first2", ["--max-images", "2"])):
        code, _, err = _evaluate(capsys, env, tmp_path / name, *base, *extra)
        assert code == 0, err
        used[name] = _column(tmp_path / name / "reports.csv", "instruction")
    assert prompted == used["a"] + used["b"] + used["first2"]
    # one per image, a function of the seed alone: batching and --max-images do not move them
    assert used["a"] == used["b"] and used["first2"] == used["a"][:2] and len(used["a"]) == env["n_eval"]
    assert set(used["a"]) <= set(made_up) and len(set(used["a"])) > 1
    assert used["a"] == instructions.sample(made_up, env["n_eval"], 5, "report")
    options = json.loads((tmp_path / "a" / "metrics.json").read_text())["options"]
    assert options["report_instructions"] == made_up and options["image_instructions"] == []
    # report->CXR reads image_instructions.txt of the folder extract-instructions writes
    instructions.write_instructions({"report": made_up, "image": ["Sketch a chest film for this text."]},
                                    str(tmp_path / "folder"))
    code, _, err = _evaluate(capsys, env, tmp_path / "img", "--tasks", "image", "--max-images", "2", "--grid-images",
                             "0", "--ci-samples", "0", "--instructions", str(tmp_path / "folder"))
    assert code == 0, err
    assert _column(tmp_path / "img" / "images.csv", "instruction") == ["Sketch a chest film for this text."] * 2
    assert all((tmp_path / "img" / p).is_file() for p in _column(tmp_path / "img" / "images.csv", "image"))
    # one file cannot serve both tasks
    code, _, err = _evaluate(capsys, env, tmp_path / "both", "--instructions", str(tmp_path / "report.txt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tasks report and image both run" in err, err
    assert not (tmp_path / "both").exists()


def test_retry_decoding_records_retries_and_leaves_failures_out(capsys, env, tmp_path, monkeypatch):
    """--image-decoding retry: images.csv gives each image's retries, metrics.json their total and per
    image, the options used, and the images that ran out of retries; those have no PNG and the
    image scores are over the others. The LM's responses hold Binomial(60, 0.3) image ids, exactly 16
    with probability 0.11: two tries leave most images without one, 80 retries none."""
    base = ["--ckpt", env["fixed"], "--tasks", "image", "--image-decoding", "retry", "--top-p", "1",
            "--batch-size", "2", "--grid-images", "2", "--ci-samples", "0"]
    code, _, err = _evaluate(capsys, env, tmp_path / "capped", *base, "--max-retries", "1", "--dtype", "bfloat16")
    assert code == 0, err
    m = json.loads((tmp_path / "capped" / "metrics.json").read_text())
    img, n = m["image"], env["n_eval"]
    assert (img["decoding"], img["max_retries"], m["options"]["image_decoding"]) == ("retry", 1, "retry")
    assert m["options"]["dtype"] == "bfloat16" and m["options"]["clean_up_spaces"] is True
    with open(tmp_path / "capped" / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["dicom_id"] for r in rows] == list(img["retries_per_image"]) and len(rows) == n
    assert [int(r["retries"]) for r in rows] == list(img["retries_per_image"].values())
    assert img["retries_total"] == sum(img["retries_per_image"].values())
    assert img["failed"] == [r["dicom_id"] for r in rows if not r["image"]] and img["failed"]
    assert all(img["retries_per_image"][i] == 1 for i in img["failed"])
    assert img["n"] == n - len(img["failed"]) == len(list((tmp_path / "capped" / "images").glob("*.png")))
    assert f"{len(img['failed'])} of {n} reports got no image of exactly 16 image tokens in 2 tries" in err

    # enough retries for every image; the second is then marked failed by hand, so the scores must
    # pair the remaining generated images with their own real images and labels
    real_image = E.tasks.Generator.image
    second = {}

    def image(self, reports, *args):
        drawn = real_image(self, reports, *args)
        if not second:
            second["report"] = reports[1]
            drawn.ok[1], drawn.images[1], drawn.codes[1] = False, np.nan, -1
        return drawn

    monkeypatch.setattr(E.tasks.Generator, "image", image)
    scored = {}
    real_scores = scores.classifier_scores
    record = lambda p, ref, ci=0: scored.setdefault(len(scored), (p, ref)) and real_scores(p, ref, ci)  # noqa: E731
    monkeypatch.setattr(image_scores, "classifier_scores", record)
    monkeypatch.setattr(scores, "classifier_scores", record)  # the chance baseline's
    code, _, err = _evaluate(capsys, env, tmp_path / "all", *base, "--max-retries", "80", "--classifier",
                             env["classifier"])
    assert code == 0, err
    img = json.loads((tmp_path / "all" / "metrics.json").read_text())["image"]
    ids = _column(tmp_path / "all" / "images.csv", "dicom_id")
    assert img["failed"] == [ids[1]] and img["n"] == n - 1 and img["retries_total"] > 0
    assert _column(tmp_path / "all" / "images.csv", "image")[1] == ""
    assert all((tmp_path / "all" / p).is_file() for p in _column(tmp_path / "all" / "images.csv", "image") if p)
    records = mimic_cxr.evaluation_records(mimic_cxr.load_corpus(env["root"], progress=False))
    keep = [r for r in records if r.dicom_id != ids[1]]
    expected = E._labels([mimic_cxr.stage_text(r, 2) for r in keep], "", "reference")
    assert second["report"] == mimic_cxr.stage_text(records[1], 2) and len(scored) == 4
    for probs, ref in scored.values():  # generated, real, reconstructed, chance: n - 1 images, their labels
        assert probs.shape[0] == n - 1
        np.testing.assert_array_equal(ref, expected)


def test_decoding_options_are_recorded_and_checked():
    o = E.EvalOptions(image_decoding="retry", dtype="bfloat16", clean_up_spaces=False)
    assert E.task_sampling(o, "image", 16).max_new_tokens == 60  # h*w + 44: LLM-CXR's 300 for 256 codes
    assert E.task_sampling(o, "report", 16).max_new_tokens == 128
    assert E.task_sampling(E.EvalOptions(), "image", 16).max_new_tokens == 19 and E.EvalOptions().max_retries == 20
    for bad, message in ((dict(image_decoding="free"), "image decoding 'free' is not one of constrained, retry"),
                         (dict(dtype="float16"), "dtype 'float16' is not one of float32, bfloat16"),
                         (dict(max_retries=-1), "max_retries must be >= 0")):
        with pytest.raises(ValueError, match=message):
            E.EvalOptions(**bad)


def test_eval_list_selects_the_evaluation_images(capsys, env, tmp_path):
    """--eval-list (LLM-CXR's eval_dicom_ids.pickle, or a .txt of ids) replaces the rebuilt selection:
    exactly the listed evaluation images are scored, ids the corpus lacks are counted on stderr, and a
    pickle that would run code is refused in one line with nothing run."""
    import os
    import pickle

    corpus = mimic_cxr.load_corpus(env["root"], progress=False)
    chosen = [r.dicom_id for r in mimic_cxr.evaluation_records(corpus)][1:3]
    listed = tmp_path / "eval_dicom_ids.pickle"
    listed.write_bytes(pickle.dumps(chosen + ["not-a-corpus-id"]))
    code, _, err = _evaluate(capsys, env, tmp_path / "o", "--tasks", "report", "--max-new-tokens", "4", "--greedy",
                             "--ci-samples", "0", "--text-tokenizer", "simple", "--eval-list", str(listed))
    assert code == 0, err
    assert "3 ids, 1 not in" in err
    with open(tmp_path / "o" / "reports.csv", newline="") as f:
        assert sorted(row["dicom_id"] for row in csv.DictReader(f)) == sorted(chosen)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'SIDE_EFFECT'}",))

    bad = tmp_path / "bad.pickle"
    bad.write_bytes(pickle.dumps([chosen[0], Payload()]))
    code, _, err = _evaluate(capsys, env, tmp_path / "b", "--tasks", "report", "--eval-list", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--eval-list" in err and "refused" in err, err
    assert not (tmp_path / "SIDE_EFFECT").exists() and not (tmp_path / "b").exists()
    code, _, err = _evaluate(capsys, env, tmp_path / "m", "--tasks", "report", "--eval-list", str(tmp_path / "no"))
    assert code == 2 and "does not exist" in err and "leave out --eval-list" in err, err


REPORT_TEXTS = ["No acute cardiopulmonary process.", "Patchy opacity in the left upper lobe. Small left effusion.",
                "Mild cardiomegaly. Possible right lower lobe consolidation.", "Moderate pulmonary edema.",
                "Heart size is normal. No pleural effusion or pneumothorax."]


def _close_to_the_written(recomputed, written, where):
    """metrics.json's numbers are the recomputed ones, float for float (JSON keeps a float64 exactly)."""
    np.testing.assert_equal(json.loads(json.dumps(recomputed, default=float)), written, err_msg=where)


def test_metrics_json_is_what_its_written_files_give(capsys, env, tmp_path, monkeypatch):
    """Label F1/AUROC, BLEU/ROUGE/CIDEr and VQA scores recomputed from reports.csv and vqa.jsonl alone equal
    metrics.json's. The random LM's reports and answers are swapped for labelled text (as written, with
    their ids), so the scores are not all zero and a swapped argument or dropped row shows."""
    from llmcxr_jax.eval import labeler, vqa_metrics
    from llmcxr_jax.eval.report_metrics import text_metrics

    real_report, real_answer = E.tasks.Generator.report_results, E.tasks.Generator.answer_results
    made = {"report": 0, "vqa": 0}

    def report(self, paths, *args, **kw):
        out = real_report(self, paths, *args, **kw)
        texts = [REPORT_TEXTS[(made["report"] + i) % len(REPORT_TEXTS)] for i in range(len(paths))]
        made["report"] += len(paths)
        return out._replace(texts=texts)

    def answer(self, paths, *args, **kw):
        out = real_answer(self, paths, *args, **kw)
        texts = [("yes", "no", "left")[(made["vqa"] + i) % 3] for i in range(len(paths))]
        made["vqa"] += len(paths)
        return out._replace(texts=texts)

    monkeypatch.setattr(E.tasks.Generator, "report_results", report)
    monkeypatch.setattr(E.tasks.Generator, "answer_results", answer)
    code, _, err = _evaluate(capsys, env, tmp_path, "--tasks", "report,vqa", "--max-new-tokens", "2", "--max-vqa",
                             "6", "--batch-size", "3", "--ci-samples", "0", "--text-tokenizer", "simple")
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    references, generated = _column(tmp_path / "reports.csv", "reference"), _column(tmp_path / "reports.csv",
                                                                                     "generated")
    assert generated == [REPORT_TEXTS[i % len(REPORT_TEXTS)] for i in range(env["n_eval"])]
    for name, texts in (("reference", references), ("generated", generated)):  # the labeler's input files
        with open(tmp_path / f"{name}_reports.csv", newline="", encoding="utf-8") as f:
            assert [row[0] for row in csv.reader(f)] == [" ".join(t.split()) for t in texts], name
    labels = label_metrics(labeler.label_reports(references), labeler.label_reports(generated), ci_samples=0)
    assert 0 < labels["f1_micro"] < 1, labels["f1_micro"]
    _close_to_the_written(labels, m["report"]["labels"], "labels")
    _close_to_the_written(text_metrics(generated, references, tokenizer="simple"), m["report"]["text"], "text")
    rows = [json.loads(line) for line in (tmp_path / "vqa.jsonl").read_text().splitlines()]
    assert len(rows) == m["n_vqa"] == 6
    vqa = vqa_metrics.vqa_scores([r["generated"] for r in rows], [r["reference"] for r in rows],
                                 [r["question_type"] for r in rows])
    assert 0 < vqa["all"]["score"] < 1, rows
    _close_to_the_written(vqa, m["vqa"], "vqa")
