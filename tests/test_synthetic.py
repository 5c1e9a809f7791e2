"""Synthetic MIMIC-CXR-JPG corpus: exact layout, determinism, reports/labels/VQA that agree, and
images that carry their findings (a pixel classifier beats chance on held-out subjects)."""
import ast
import csv
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llmcxr_jax import synthetic
from llmcxr_jax.synthetic.text import LABELS, Finding

SIZE = 64


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _prefix(subject):
    return f"p{subject[:2]}/p{subject}"


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _files_under(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = p
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "root")
    calls = []
    summary = synthetic.synthesize(root, num_images=150, image_size=SIZE, seed=3, progress=calls.append)
    return root, summary, calls


def test_layout_and_counts(corpus):
    root, summary, calls = corpus
    assert calls == list(range(1, 151))
    split = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"))
    meta = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"))
    labels = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"))
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(meta[0]) == list(synthetic.METADATA_COLUMNS)
    assert list(labels[0]) == ["subject_id", "study_id", *LABELS]
    assert len(split) == len(meta) == summary["images"] == 150
    assert [r["dicom_id"] for r in split] == [r["dicom_id"] for r in meta]
    studies = {(r["subject_id"], r["study_id"]) for r in split}
    assert {(r["subject_id"], r["study_id"]) for r in labels} == studies and len(labels) == len(studies)
    assert summary["studies"] == len(studies) and summary["subjects"] == len({s for s, _ in studies})
    assert len({r["dicom_id"] for r in split}) == 150
    for r in meta:
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", r["dicom_id"])
        assert re.fullmatch(r"1\d{7}", r["subject_id"]) and re.fullmatch(r"5\d{7}", r["study_id"])
        assert r["ViewPosition"] in ("PA", "AP", "LATERAL", "LL", "")
        assert r["Rows"] == r["Columns"] == str(SIZE)
        assert re.fullmatch(r"2[01]\d{2}(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])", r["StudyDate"])
        hhmmss, frac = r["StudyTime"].split(".")
        t = int(hhmmss)
        assert t // 10000 < 24 and t // 100 % 100 < 60 and t % 100 < 60 and 1 <= len(frac) <= 3
        path = os.path.join(root, "files", _prefix(r["subject_id"]), f"s{r['study_id']}", f"{r['dicom_id']}.jpg")
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L" and min(im.size) >= SIZE
    assert len({r["subject_id"][:2] for r in meta}) > 1, "the pXX folder should vary"
    for subject, study in studies:
        for folder in ("reports/files", "mimic-cxr-jpg_medvqa_v1"):
            assert os.path.isfile(os.path.join(root, folder, _prefix(subject), f"s{study}.txt"))
    for s in ("train", "validate", "test"):
        rows = [r for r in split if r["split"] == s]
        assert summary["splits"][s]["images"] == len(rows) > 0
        assert summary["splits"][s]["subjects"] == len({r["subject_id"] for r in rows})
    with open(os.path.join(root, "databricks-dolly-15k.jsonl")) as f:
        dolly = [json.loads(line) for line in f]
    assert len(dolly) == summary["dolly_rows"] >= 200
    assert all(set(d) == {"instruction", "context", "response", "category"} and d["instruction"] and d["response"]
               for d in dolly)
    assert len({d["instruction"] for d in dolly}) > 150 and len({d["category"] for d in dolly}) >= 6
    assert summary["paths"]["split_csv"] == os.path.join(root, "mimic-cxr-2.0.0-split.csv")


def test_split_per_subject_and_dates_increase(corpus):
    root, _, _ = corpus
    split = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"))
    by_subject = {}
    for r in split:
        by_subject.setdefault(r["subject_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_subject.values())
    meta = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"))
    when, exam = {}, {}
    for r in meta:
        key = (r["subject_id"], r["study_id"])
        assert when.setdefault(key, (r["StudyDate"], float(r["StudyTime"]))) == (r["StudyDate"], float(r["StudyTime"]))
        assert exam.setdefault(key, r["PerformedProcedureStepDescription"]) == r["PerformedProcedureStepDescription"]
    per_subject = {}
    for (subject, _), t in when.items():  # dict order = order of first appearance in the CSV
        per_subject.setdefault(subject, []).append(t)
    assert any(len(v) > 1 for v in per_subject.values())
    for times in per_subject.values():
        assert all(a[0] < b[0] for a, b in zip(times, times[1:])), times


# ---- reports agree with labels ------------------------------------------------------------------

KEYWORDS = {
    "Atelectasis": r"atelecta", "Cardiomegaly": r"cardiomegaly|heart|cardiac", "Consolidation": r"consolidat",
    "Edema": r"edema|vascular congestion", "Enlarged Cardiomediastinum": r"mediastin", "Fracture": r"fracture",
    "Lung Lesion": r"nodule|\bmass(es)?\b", "Lung Opacity": r"opacit", "Pleural Effusion": r"effusion",
    "Pneumonia": r"pneumonia", "Pneumothorax": r"pneumothora", "Support Devices": r"tube|catheter|pacemaker|picc",
}
NEGATION = re.compile(r"\bno\b|\bnot\b|without|\bnormal\b|unremarkable")
HEDGE = re.compile(r"possib|cannot be excluded|\bmay\b|borderline|could")


def _mentions(text):
    """A tiny keyword labeler: label -> set of polarities (1.0 / 0.0 / -1.0) of its sentences."""
    flat = " ".join(line.strip() for line in text.splitlines()).lower()
    out = {}
    for s in re.split(r"(?<=\.)\s+", flat):
        polarity = "0.0" if NEGATION.search(s) else "-1.0" if HEDGE.search(s) else "1.0"
        for label, kw in KEYWORDS.items():
            if re.search(kw, s):
                out.setdefault(label, set()).add(polarity)
    return out


def _llmcxr_sections(text):
    """LLM-CXR's stage-1 parsing; None where the report has no usable section."""
    txt = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if "FINDINGS:" in txt:
        f_and_i = txt.split("FINDINGS:")[1]
        return " ".join(p.strip() for p in f_and_i.split("IMPRESSION:"))
    if "IMPRESSION:" in txt:
        return txt.split("IMPRESSION:")[1].strip()
    return None


def test_reports_agree_with_labels(corpus):
    root, summary, _ = corpus
    layouts = {"full": 0, "impression": 0, "none": 0}
    for row in _read_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv")):
        with open(os.path.join(root, "reports/files", _prefix(row["subject_id"]), f"s{row['study_id']}.txt")) as f:
            text = f.read()
        assert text.lstrip().startswith("FINAL REPORT") and "EXAMINATION:" in text and "INDICATION:" in text
        assert text.count("FINDINGS:") <= 1 and text.count("IMPRESSION:") <= 1
        section = _llmcxr_sections(text)
        layouts["none" if section is None else "full" if "FINDINGS:" in text else "impression"] += 1
        assert section is None or len(section) > 10
        got = _mentions(text)
        for label in KEYWORDS:
            value = row[label]
            if value == "":
                assert label not in got, (label, text)
            else:
                assert value in got.get(label, set()), (label, value, text)
                assert "1.0" not in got[label] or value == "1.0", (label, value, text)
        sick = any(row[label] in ("1.0", "-1.0") for label in LABELS if label not in ("No Finding", "Support Devices"))
        assert row["No Finding"] == ("" if sick else "1.0")
    assert layouts == summary["reports"]
    assert layouts["impression"] > 0 and layouts["full"] > layouts["impression"]


def test_vqa_agrees_with_labels(corpus):
    root, summary, _ = corpus
    n, kinds = 0, set()
    for row in _read_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv")):
        rel = os.path.join(_prefix(row["subject_id"]), f"s{row['study_id']}.txt")
        with open(os.path.join(root, "mimic-cxr-jpg_medvqa_v1", rel)) as f:
            first, rest = f.readline(), f.read()
        assert rest == ""
        pairs = ast.literal_eval(first)
        with open(os.path.join(root, "reports/files", rel)) as f:
            report = " ".join(f.read().lower().split())
        for p in pairs:
            assert set(p) == {"question", "answer", "question_type", "finding"} and p["question"].endswith("?")
            kinds.add(p["question_type"])
            value = row[p["finding"]]
            if p["question_type"] == "presence":
                assert p["answer"] == ("Yes." if value == "1.0" else "No."), (p, value)
                assert value != "-1.0"
            else:
                assert value == "1.0", (p, value)
                word = p["answer"].rstrip(".").lower()
                words = {word, "bibasilar"} if word == "bilateral" else {word}
                assert any(w in report for w in words), (p, report)
        n += len(pairs)
    assert n == summary["vqa_pairs"] and kinds == {"presence", "location", "severity"}


# ---- determinism, reruns, refusal --------------------------------------------------------------

def test_deterministic_and_seed_dependent(tmp_path):
    a = synthetic.synthesize(str(tmp_path / "a"), num_images=30, image_size=48, seed=11)
    b = synthetic.synthesize(str(tmp_path / "b"), num_images=30, image_size=48, seed=11)
    c = synthetic.synthesize(str(tmp_path / "c"), num_images=30, image_size=48, seed=12)
    fa, fb, fc = (_files_under(s["root"]) for s in (a, b, c))
    assert fa.keys() == fb.keys()
    for rel, path in fa.items():
        with open(path, "rb") as f1, open(fb[rel], "rb") as f2:
            assert f1.read() == f2.read(), rel
        if rel.endswith(".jpg"):
            np.testing.assert_array_equal(_pixels(path), _pixels(fb[rel]))
    counts = lambda s: {k: v for k, v in s.items() if k not in ("root", "paths")}  # noqa: E731
    assert counts(a) == counts(b)
    with open(fa["mimic-cxr-2.0.0-split.csv"]) as f1, open(fc["mimic-cxr-2.0.0-split.csv"]) as f2:
        assert f1.read() != f2.read()
    jpgs = lambda files: {Path(p).read_bytes() for r, p in files.items() if r.endswith(".jpg")}  # noqa: E731
    assert not jpgs(fa) & jpgs(fc)
    # a smaller corpus is a prefix of a larger one (only its last study may be cut short)
    d = synthetic.synthesize(str(tmp_path / "d"), num_images=20, image_size=48, seed=11)
    rows_a, rows_d = (_read_csv(s["paths"]["split_csv"]) for s in (a, d))
    last = rows_d[-1]["study_id"]
    kept = [r for r in rows_d if r["study_id"] != last]
    assert kept == rows_a[: len(kept)] and len(kept) > 10


def test_rerun_returns_without_regenerating(tmp_path):
    out = str(tmp_path / "c")
    first = synthetic.synthesize(out, num_images=12, image_size=32, seed=0)
    stamps = {rel: os.stat(p).st_mtime_ns for rel, p in _files_under(out).items()}
    calls = []
    again = synthetic.synthesize(out, num_images=12, image_size=32, seed=0, progress=calls.append)
    assert again == first and calls == []
    assert {rel: os.stat(p).st_mtime_ns for rel, p in _files_under(out).items()} == stamps
    with pytest.raises(ValueError, match="num_images"):
        synthetic.synthesize(out, num_images=13, image_size=32, seed=0)


def test_refuses_foreign_directory_and_bad_arguments(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files") as e:
        synthetic.synthesize(str(tmp_path / "x"), num_images=4, image_size=32)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path / "x")) == ["notes.txt"]
    for kwargs in ({"num_images": 0}, {"image_size": 8}, {"seed": -1}, {"num_images": 2.5}):
        with pytest.raises(ValueError):
            synthetic.synthesize(str(tmp_path / "y"), **{"num_images": 4, "image_size": 32, **kwargs})


def test_render_image_shows_findings():
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    anat = synthetic.sample_anatomy(np.random.default_rng(1))
    normal = synthetic.render_image({}, "PA", 96, rng(), anat)
    assert normal.dtype == np.uint8 and normal.shape == (96, 96)
    np.testing.assert_array_equal(normal, synthetic.render_image({}, "PA", 96, rng(), anat))
    draw = lambda f: synthetic.render_image({f.label: f}, "PA", 96, rng(), anat)  # noqa: E731
    big = draw(Finding("Cardiomegaly", "positive", severity=2))
    # the enlarged heart whitens the lower lung beside it (image right = patient left)
    region = (slice(55, 75), slice(62, 80))
    assert big[region].mean() > normal[region].mean() + 20
    fluid = draw(Finding("Pleural Effusion", "positive", "right", 2))
    right_base, left_base = (slice(50, 68), slice(12, 30)), (slice(50, 68), slice(66, 84))
    assert fluid[right_base].mean() > normal[right_base].mean() + 20
    assert abs(fluid[left_base].mean() - normal[left_base].mean()) < 5
    negated = draw(Finding("Pleural Effusion", "negative"))
    np.testing.assert_array_equal(negated, normal)
    assert synthetic.render_image({}, "LATERAL", 96, rng(), anat).shape == (96, 96)


def test_catheters_stay_visible_on_small_films():
    """A jugular catheter is a third of a pixel wide at 64 px; drawn at that width it falls between
    pixel centres. The renderer's line floor keeps it showing in every row of its course."""
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    anat = synthetic.sample_anatomy(np.random.default_rng(1))
    cvc = {"Support Devices": Finding("Support Devices", "positive", devices=("cvc",))}
    normal = synthetic.render_image({}, "PA", 64, rng(), anat).astype(int)
    line = synthetic.render_image(cvc, "PA", 64, rng(), anat).astype(int)
    assert (line - normal)[5:26].max(axis=1).min() >= 18


def test_a_small_pneumothorax_shows_a_rim_on_small_films():
    """A 1.5 cm rim is 2 px at 64 px, which an f8 VQ-GAN's codes lose; the renderer keeps a small
    pneumothorax's airspace at least ~3 px wide at the hilum there, on the side it is on only."""
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    anat = synthetic.sample_anatomy(np.random.default_rng(1))
    ptx = {"Pneumothorax": Finding("Pneumothorax", "positive", "right", 0)}
    normal = synthetic.render_image({}, "PA", 64, rng(), anat).astype(int)
    darker = normal - synthetic.render_image(ptx, "PA", 64, rng(), anat).astype(int)
    rows = darker[28:36]  # around the hilum
    assert (rows[:, :32] >= 20).sum(axis=1).min() >= 3  # the patient's right is the image's left
    assert (rows[:, 32:] >= 20).sum() == 0


# ---- the images carry their findings -------------------------------------------------------------

def _auroc(score, y):
    ranks = np.argsort(np.argsort(score)) + 1.0
    pos = y.sum()
    return (ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(y) - pos))


def test_images_carry_their_findings(tmp_path):
    """Ridge classifier on 16x16 pixels (+ left/right asymmetry) of frontal films, trained on
    60% of subjects, scored on the other 40%."""
    root = str(tmp_path / "clf")
    synthetic.synthesize(root, num_images=600, image_size=SIZE, seed=1)
    labels = {r["study_id"]: r for r in _read_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"))}
    meta = _read_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"))
    meta = [r for r in meta if r["ViewPosition"] in ("PA", "AP")]
    feats = []
    for r in meta:
        path = os.path.join(root, "files", _prefix(r["subject_id"]), f"s{r['study_id']}", f"{r['dicom_id']}.jpg")
        with Image.open(path) as im:
            a = np.asarray(im.resize((16, 16), Image.Resampling.BOX), np.float32)
        a = (a - a.mean()) / (a.std() + 1e-6)
        feats.append(np.r_[a.ravel(), np.abs(a - a[:, ::-1])[:, :8].ravel(), 1.0])
    x = np.asarray(feats)
    train = np.array([int(r["subject_id"]) % 5 < 3 for r in meta])
    results = {}
    for label in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax"):
        value = np.array([labels[r["study_id"]][label] for r in meta])
        known = value != "-1.0"
        y = (value == "1.0").astype(np.float64)
        tr, te = train & known, ~train & known
        assert 0.15 < y[known].mean() < 0.45, (label, y[known].mean())
        w = np.linalg.solve(x[tr].T @ x[tr] + 10.0 * np.eye(x.shape[1]), x[tr].T @ (2 * y[tr] - 1))
        results[label] = (_auroc(x[te] @ w, y[te]), int(y[te].sum()), int(te.sum()))
    print("held-out AUROC (positives/total):", {k: f"{a:.3f} ({p}/{n})" for k, (a, p, n) in results.items()})
    for label, (auc, _, _) in results.items():
        assert auc >= 0.8, (label, results)


@pytest.mark.slow
def test_thousand_images_under_a_minute(tmp_path):
    start = time.perf_counter()
    summary = synthetic.synthesize(str(tmp_path / "big"), num_images=1000, image_size=256, seed=0)
    seconds = time.perf_counter() - start
    print(f"1000 images at 256 px in {seconds:.1f} s ({1000 / seconds:.0f} images/s)")
    assert summary["images"] == 1000 and seconds < 60
