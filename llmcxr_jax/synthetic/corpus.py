"""The synthetic CXR corpus: `synthesize` writes a deterministic root in the exact MIMIC-CXR-JPG
layout (images, reports, split/metadata/CheXpert CSVs, VQA pairs, a Dolly-format jsonl) so the
system runs and is tested with nothing to download. Pixels: phantom.py; words: text.py; Dolly-like rows: dolly.py.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os

import numpy as np
from PIL import Image

from llmcxr_jax.errors import UsageError
from llmcxr_jax.synthetic.dolly import dolly_rows
from llmcxr_jax.synthetic.phantom import render_image, sample_anatomy
from llmcxr_jax.synthetic.text import (
    LABEL_NOTES,
    LABELS,
    Finding,
    chexpert_row,
    report_text,
    sample_findings,
    vqa_pairs,
)

__all__ = ["LABELS", "LABEL_NOTES", "Finding", "plan_corpus", "render_image", "sample_anatomy", "sample_findings",
           "synthesize"]

FORMAT = "llmcxr-synthetic-v1"
MANIFEST = "synthetic.json"
PATHS = {"split_csv": "mimic-cxr-2.0.0-split.csv", "metadata_csv": "mimic-cxr-2.0.0-metadata.csv",
         "chexpert_csv": "mimic-cxr-2.0.0-chexpert.csv", "images": "files", "reports": "reports/files",
         "vqa": "mimic-cxr-jpg_medvqa_v1", "dolly": "databricks-dolly-15k.jsonl", "manifest": MANIFEST}
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral", "": ""}
DOLLY_ROWS = 300
SPLIT_BLOCK = ("train",) * 8 + ("validate", "test")  # each block of 10 subjects: exactly 80/10/10


@dataclasses.dataclass
class CorpusImage:
    index: int           # global image number: its pixels depend only on (seed, index)
    dicom_id: str
    view: str            # ViewPosition as written ("" = unknown; drawn as the study's frontal view)


@dataclasses.dataclass
class CorpusStudy:
    index: int
    study_id: str
    date: str            # YYYYMMDD
    time: str            # HHMMSS.fff as MIMIC writes it (leading zeros dropped)
    frontal: str         # PA | AP
    findings: dict       # CheXpert label -> Finding
    images: list


@dataclasses.dataclass
class CorpusSubject:
    index: int
    subject_id: str
    split: str
    studies: list


def _unique(draw, seen: set) -> str:
    while (x := draw()) in seen:
        pass
    seen.add(x)
    return x


def _study_time(rng) -> str:
    h, m, s, ms = (int(x) for x in rng.integers(0, [24, 60, 60, 1000]))
    text = f"{h * 10000 + m * 100 + s + ms / 1000:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _exam(views) -> str:
    lateral = any(v in ("LATERAL", "LL") for v in views)
    if "AP" in views:
        return "CHEST (AP AND LAT)" if lateral else "CHEST (PORTABLE AP)"
    return "CHEST (PA AND LAT)" if lateral else "CHEST (PA)"


def plan_corpus(num_images: int, seed: int) -> list[CorpusSubject]:
    """Subjects -> studies -> images with ids, dates, views and findings. Generated in order, so a
    smaller corpus is a prefix of a larger one with the same seed (the last study may be cut)."""
    ids = np.random.default_rng([seed, 5])
    seen: set = set()
    subjects, n, study_index = [], 0, 0
    while n < num_images:
        k = len(subjects)
        r = np.random.default_rng([seed, 4, k])
        subject_id = _unique(lambda: str(int(ids.integers(10_000_000, 20_000_000))), seen)
        split = str(np.random.default_rng([seed, 6, k // 10]).permutation(SPLIT_BLOCK)[k % 10])
        date = datetime.date(int(r.integers(2110, 2190)), 1, 1) + datetime.timedelta(days=int(r.integers(0, 365)))
        studies = []
        for j in range(int(r.choice([1, 2, 3, 4], p=[0.4, 0.3, 0.2, 0.1]))):
            if n >= num_images:
                break
            date += datetime.timedelta(days=int(r.integers(1, 400)) if j else 0)
            rs = np.random.default_rng([seed, 3, study_index])
            findings = sample_findings(rs)
            devices = "Support Devices" in findings and findings["Support Devices"].certainty == "positive"
            frontal = "AP" if rs.random() < (0.75 if devices else 0.3) else "PA"
            count = int(rs.choice([1, 2, 3], p=[0.4, 0.5, 0.1]))
            views = [frontal, "LATERAL", frontal if rs.random() < 0.7 else "LL"][:count]
            if len(views) == 3 and rs.random() < 0.15:
                views[2] = ""  # real metadata has images without a ViewPosition
            views = views[: num_images - n]
            dicom = lambda: "-".join(f"{int(x):08x}" for x in ids.integers(0, 2**32, 5))  # noqa: E731
            images = [CorpusImage(n + i, _unique(dicom, seen), v) for i, v in enumerate(views)]
            study_id = _unique(lambda: str(int(ids.integers(50_000_000, 60_000_000))), seen)
            studies.append(CorpusStudy(study_index, study_id, date.strftime("%Y%m%d"), _study_time(rs), frontal,
                                       findings, images))
            n += len(images)
            study_index += 1
        subjects.append(CorpusSubject(k, subject_id, split, studies))
    return subjects


def _arguments(num_images, image_size, seed) -> dict:
    for name, value, low in (("num_images", num_images, 1), ("image_size", image_size, 16), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return {"num_images": int(num_images), "image_size": int(image_size), "seed": int(seed)}


def _existing(out: str, args: dict):
    """The finished corpus's manifest, None to (re)generate, or ValueError for a foreign directory."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; give a directory for the synthetic corpus")
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    path = os.path.join(out, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"--out {out} already holds files and no {MANIFEST}; give an empty or new directory")
    if manifest.get("arguments") != args:
        raise UsageError(f"--out {out} holds a synthetic corpus made with {manifest.get('arguments')}, not {args}; "
                         "give another directory or the same arguments")
    done = manifest.get("complete") and all(os.path.exists(os.path.join(out, PATHS[k]))
                                            for k in ("split_csv", "metadata_csv", "chexpert_csv", "dolly"))
    return manifest if done else None  # an interrupted run with the same arguments is redone in place


def _write_manifest(out: str, args: dict, summary: dict | None) -> None:
    tmp = os.path.join(out, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "arguments": args, "complete": summary is not None, "summary": summary}, f,
                  indent=1)
    os.replace(tmp, os.path.join(out, MANIFEST))


def _with_paths(summary: dict, out: str) -> dict:
    return {**summary, "root": out, "paths": {k: os.path.join(out, v) for k, v in PATHS.items()}}


def _write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def synthesize(out: str, num_images: int = 1000, image_size: int = 256, seed: int = 0, progress=None) -> dict:
    """Write a synthetic MIMIC-CXR-JPG-layout corpus to `out` and return its summary (counts of
    images, studies, subjects, per split and per finding, VQA pairs, Dolly rows, and paths).

    Deterministic: the same arguments give byte-identical files. `out` must be empty or new, or
    hold a corpus made with the same arguments (then nothing is regenerated; an interrupted one
    is redone in place). `progress`, if given, is called with the number of images written so
    far after each image.

    Conventions: every image of a study shows the study's findings; frontal (PA/AP, and the few
    images with an empty ViewPosition) films show all of them, lateral (LATERAL/LL) films are a
    simpler phantom showing heart size, effusion, edema and devices only. Uncertain (-1.0)
    findings are drawn at half strength and hedged in the report; 0.0 findings are negated in
    the text and not drawn. Image left is the patient's right. See LABEL_NOTES.
    """
    args = _arguments(num_images, image_size, seed)
    out = os.path.abspath(out)
    manifest = _existing(out, args)
    if manifest is not None:
        return _with_paths(manifest["summary"], out)
    os.makedirs(out, exist_ok=True)
    _write_manifest(out, args, None)
    subjects = plan_corpus(num_images, seed)

    split_rows, meta_rows, label_rows = [], [], []
    counts = {"splits": {s: {"subjects": 0, "studies": 0, "images": 0} for s in ("train", "validate", "test")},
              "views": {}, "findings": {label: {"positive": 0, "uncertain": 0, "negative": 0} for label in LABELS},
              "reports": {"full": 0, "impression": 0, "none": 0}, "vqa_pairs": 0}
    done = 0
    for subject in subjects:
        anatomy = sample_anatomy(np.random.default_rng([seed, 2, subject.index]))
        prefix = f"p{subject.subject_id[:2]}/p{subject.subject_id}"
        split = counts["splits"][subject.split]
        split["subjects"] += 1
        for j, study in enumerate(subject.studies):
            split["studies"] += 1
            folder = os.path.join(out, PATHS["images"], prefix, f"s{study.study_id}")
            os.makedirs(folder, exist_ok=True)
            exam = _exam([im.view for im in study.images])
            for im in study.images:
                rng = np.random.default_rng([seed, 1, im.index])
                pixels = render_image(study.findings, im.view or study.frontal, image_size, rng, anatomy)
                Image.fromarray(pixels).save(os.path.join(folder, f"{im.dicom_id}.jpg"), quality=92)
                split_rows.append((im.dicom_id, study.study_id, subject.subject_id, subject.split))
                orientation = "Recumbent" if im.view == "AP" and rng.random() < 0.3 else "Erect" if im.view else ""
                meta_rows.append((im.dicom_id, subject.subject_id, study.study_id, exam, im.view, image_size,
                                  image_size, study.date, study.time, exam, VIEW_MEANING[im.view], orientation))
                counts["views"][im.view] = counts["views"].get(im.view, 0) + 1
                split["images"] += 1
                done += 1
                if progress is not None:
                    progress(done)
            text_rng = np.random.default_rng([seed, 7, study.index])
            text, layout = report_text(study.findings, exam, j == 0, text_rng)
            counts["reports"][layout] += 1
            _write_text(os.path.join(out, PATHS["reports"], prefix, f"s{study.study_id}.txt"), text)
            pairs = vqa_pairs(study.findings, text_rng)
            counts["vqa_pairs"] += len(pairs)
            _write_text(os.path.join(out, PATHS["vqa"], prefix, f"s{study.study_id}.txt"), repr(pairs) + "\n")
            row = chexpert_row(study.findings)
            label_rows.append((subject.subject_id, study.study_id, *(row[label] for label in LABELS)))
            for label, f in study.findings.items():
                counts["findings"][label][f.certainty] += 1

    _write_csv(os.path.join(out, PATHS["split_csv"]), ("dicom_id", "study_id", "subject_id", "split"), split_rows)
    _write_csv(os.path.join(out, PATHS["metadata_csv"]), METADATA_COLUMNS, meta_rows)
    _write_csv(os.path.join(out, PATHS["chexpert_csv"]), ("subject_id", "study_id", *LABELS), label_rows)
    rows = dolly_rows(DOLLY_ROWS, seed)
    with open(os.path.join(out, PATHS["dolly"]), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    counts["findings"]["No Finding"]["positive"] = sum(r[2 + LABELS.index("No Finding")] == "1.0" for r in label_rows)
    summary = {**args, "images": done, "studies": len(label_rows), "subjects": len(subjects), **counts,
               "dolly_rows": len(rows)}
    _write_manifest(out, args, summary)
    return _with_paths(summary, out)


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
