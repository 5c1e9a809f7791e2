"""A MIMIC-CXR-JPG root on disk (the real corpus or the synthetic one) -> `CxrRecord` lists for
training stage 1, stage 2 and the evaluation set, with every image left out counted and listed
by reason; also its CheXpert label CSV. The VQA and Dolly readers (data/text_corpora.py) are
re-exported here so that one module answers "what is in the corpus".
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import gzip
import json
import math
import os
import sys
from pathlib import Path

from tqdm import tqdm

from llmcxr_jax import user_files
from llmcxr_jax.data import images
from llmcxr_jax.data.text_corpora import VQA_DIR, ReadResult, VqaExample, VqaItem, read_dolly, read_vqa, vqa_for_records
from llmcxr_jax.errors import MissingInputError, UsageError

__all__ = [
    "CHEXPERT_LABELS", "FRONTAL_VIEWS", "CxrRecord", "MimicCxrCorpus", "Skipped", "evaluation_records",
    "load_corpus", "parse_report", "read_chexpert_labels", "stage_records", "stage_text", "vqa_image_records",
    # re-exported from text_corpora
    "VQA_DIR", "ReadResult", "VqaExample", "VqaItem", "read_dolly", "read_vqa", "vqa_for_records",
]

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
# The 14 CheXpert observations in the order of the label CSV's columns.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices")
_LABEL_VALUES = {"1.0": 1.0, "0.0": 0.0, "-1.0": -1.0, "1": 1.0, "0": 0.0, "-1": -1.0, "": None}
SPLITS = ("train", "validate", "test")
EVAL_SPLITS = ("validate", "test")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
PHYSIONET_HINT = ("get MIMIC-CXR-JPG 2.0.0 from physionet.org/content/mimic-cxr-jpg/2.0.0 (credentialed), "
                  "or make a synthetic corpus with `llmcxr synth`")

# Reasons an image is left out of a selection (the `reason` field of skipped.jsonl).
DUPLICATE = "duplicate dicom_id"
NOT_IN_SPLIT = "not in split csv"
NOT_IN_METADATA = "not in metadata"
UNKNOWN_SPLIT = "unknown split"
MISSING_REPORT = "missing report"
UNREADABLE_REPORT = "unreadable report"
NO_SECTIONS = "no findings or impression"
NO_IMPRESSION = "no impression"
IMAGE_MISSING = "image file missing"
UNREADABLE_IMAGE = "unreadable image"
NOT_EVALUATION_IMAGE = "listed for evaluation, not a validate/test PA/AP image"


@dataclasses.dataclass(frozen=True)
class CxrRecord:
    dicom_id: str
    subject_id: str      # digits, no "p"
    study_id: str        # digits, no "s"
    split: str           # train | validate | test
    view: str            # ViewPosition, "" when unknown
    study_date: str      # "21800506"
    study_time: str      # "213014.531"
    image_path: str      # absolute path of the jpg
    findings: str | None
    impression: str | None


@dataclasses.dataclass(frozen=True)
class Skipped:
    dicom_id: str
    subject_id: str
    study_id: str
    reason: str
    detail: str = ""


# ----------------------------------------------------------------------------- reports

def _after(text: str, marker: str) -> str | None:
    """The text after `marker` when it occurs exactly once (LLM-CXR's `a, b = s.split(m)`)."""
    parts = text.split(marker)
    return parts[1].strip() if len(parts) == 2 else None


def parse_report(text: str) -> tuple[str | None, str | None]:
    """Report text -> (findings, impression), split as LLM-CXR does: non-blank lines stripped and
    joined with single spaces; impression = what follows the only "IMPRESSION:"; findings = what
    follows the only "FINDINGS:", up to the "IMPRESSION:" after it when there is exactly one.
    A marker seen twice makes that section missing, as in the original. Empty sections count as
    missing (the original would train on an empty or space-padded text).
    One fix to the original: an IMPRESSION written before FINDINGS ends where "FINDINGS:" begins
    (the original kept "... FINDINGS: <findings>" inside the impression and dropped the impression
    from the stage-1 text), so findings + impression hold each section once and no header.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    joined = " ".join(s for s in (line.strip() for line in lines) if s)
    findings = _after(joined, "FINDINGS:")
    if findings is not None:
        head = findings.split("IMPRESSION:")
        findings = head[0].strip() if len(head) == 2 else findings
    impression = _after(joined, "IMPRESSION:")
    if impression is not None and "FINDINGS:" in impression:
        impression = impression.split("FINDINGS:", 1)[0].strip()
    return findings or None, impression or None


def stage_text(record: CxrRecord, stage: int) -> str | None:
    """Stage 1: findings + " " + impression (either alone when the other is missing);
    stage 2 and evaluation: the impression only. None when the record has no such text."""
    if stage == 1:
        return " ".join(p for p in (record.findings, record.impression) if p) or None
    if stage == 2:
        return record.impression
    raise UsageError(f"stage must be 1 or 2, got {stage!r}")


def report_path(reports_files: Path, subject_id: str, study_id: str) -> Path:
    return reports_files / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"


def image_path(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


# ----------------------------------------------------------------------------- CSVs

def find_csv(root: Path, name: str) -> Path:
    """ROOT/name or ROOT/name.gz (the plain file wins when both exist)."""
    for path in (Path(root) / name, Path(root) / f"{name}.gz"):
        if path.is_file():
            return path
    raise MissingInputError(f"{name} (or {name}.gz) not found in {root}; {PHYSIONET_HINT}")


def csv_rows(path: Path, columns: tuple[str, ...]):
    """Yields one tuple of stripped strings per data row, the columns picked by header name."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with user_files.csv_faults(path), opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        user_files.check_columns(path, header, columns, "the MIMIC-CXR-JPG 2.0.0 header")
        index = [header.index(c) for c in columns]
        for row in reader:
            if row:
                yield tuple(row[i].strip() if i < len(row) else "" for i in index)


def read_chexpert_labels(root) -> dict[tuple[str, str], dict[str, float | None]]:
    """(subject_id, study_id) -> {label: 1.0 positive | 0.0 negative | -1.0 uncertain | None not
    mentioned} for the CHEXPERT_LABELS, from ROOT's mimic-cxr-2.0.0-chexpert.csv(.gz)."""
    path = find_csv(Path(root), CHEXPERT_CSV)
    out = {}
    for row, (subject, study, *values) in enumerate(csv_rows(path, ("subject_id", "study_id") + CHEXPERT_LABELS), 1):
        bad = [v for v in values if v not in _LABEL_VALUES]
        if bad:
            raise UsageError(f"{path} data row {row}: label value {bad[0]!r} is not 1.0, 0.0, -1.0 or empty")
        out[(subject, study)] = {name: _LABEL_VALUES[v] for name, v in zip(CHEXPERT_LABELS, values)}
    return out


# ----------------------------------------------------------------------------- selection

def _number(text: str) -> float:
    """StudyDate / StudyTime as a number: 90512.0 (09:05:12) sorts before 213014.531, which a
    string comparison gets wrong. Unparseable values sort last."""
    try:
        value = float(text)
    except ValueError:
        return math.inf
    return value if math.isfinite(value) else math.inf


def earliest_frontal(rows) -> frozenset[str]:
    """dicom_ids of the PA/AP images of each subject's earliest study that has a PA/AP image,
    by (StudyDate, StudyTime), ties broken by the smaller study_id. Rows are
    (dicom_id, subject_id, study_id, view, study_date, study_time). This rebuilds LLM-CXR's
    mimic-cxr-2.0.0-selected-pa-ap-earlist-study.pickle (shipped, not its recipe) from the
    metadata alone, so whether a file or report exists never moves the choice to a later study."""
    frontal = [r for r in rows if r[3] in FRONTAL_VIEWS]
    when: dict[tuple[str, str], tuple[float, float]] = {}
    for _, subject, study, _, date, time in frontal:
        t = (_number(date), _number(time))
        if (subject, study) not in when or t < when[(subject, study)]:
            when[(subject, study)] = t
    first: dict[str, tuple] = {}
    for (subject, study), t in when.items():
        key = (t, study)
        if subject not in first or key < first[subject]:
            first[subject] = key
    return frozenset(r[0] for r in frontal if first[r[1]][1] == r[2])


class MimicCxrCorpus:
    """Everything `load_corpus` found: usable records, the three selections and the skips.

    split_ids: split value -> the split csv's dicom ids, sorted (LLM-CXR numbers images in this
    order). given_selection: the PA/AP earliest-study ids came from a list, not the metadata.
    evaluation_ids: a given evaluation list (None: the selection over validate + test).
    """

    def __init__(self, root: Path, reports_files: Path, listed: int, records: list[CxrRecord],
                 skipped: list[Skipped], selected: frozenset[str], *,
                 split_ids: dict[str, tuple[str, ...]] | None = None, given_selection: bool = False,
                 evaluation_ids: frozenset[str] | None = None):
        self.root, self.reports_files, self.listed = root, reports_files, listed
        self.records = records                    # images with a file and findings or impression
        self.selected_pa_ap_earliest = selected   # over all listed images, files or not
        self.skipped = skipped
        self.split_ids = split_ids or {}
        self.given_selection, self.evaluation_ids = given_selection, evaluation_ids
        self.stage1 = [r for r in records if r.split == "train"]
        self.stage2 = self._frontal_earliest(("train",), "stage 2")
        self.evaluation = (self._frontal_earliest(EVAL_SPLITS, "evaluation") if evaluation_ids is None
                           else self._listed_evaluation(evaluation_ids))

    def _listed_evaluation(self, ids: frozenset[str]) -> list[CxrRecord]:
        """The records of a given evaluation list that LLM-CXR's generate_eval.py keeps: validate or
        test split, PA/AP view, an impression. Listed records left out are counted as skipped."""
        out = []
        for r in self.records:
            if r.dicom_id not in ids:
                continue
            if r.split not in EVAL_SPLITS or r.view not in FRONTAL_VIEWS:
                self.skipped.append(Skipped(r.dicom_id, r.subject_id, r.study_id, NOT_EVALUATION_IMAGE,
                                            f"split {r.split}, view {r.view or 'unknown'}"))
            elif not r.impression:
                self.skipped.append(Skipped(r.dicom_id, r.subject_id, r.study_id, NO_IMPRESSION,
                                            "evaluation: the report has no IMPRESSION section"))
            else:
                out.append(r)
        return out

    def list_report(self) -> dict:
        """For each given id list: how many ids it holds and which of them the split csv lacks."""
        out, known = {}, {i for ids in self.split_ids.values() for i in ids}
        for name, ids in (("stage2_list", self.selected_pa_ap_earliest if self.given_selection else None),
                          ("eval_list", self.evaluation_ids)):
            if ids is not None:
                absent = sorted(set(ids) - known)
                out[name] = {"listed": len(ids), "not_in_corpus": len(absent), "not_in_corpus_first": absent[:3]}
        return out

    def _frontal_earliest(self, splits, use: str) -> list[CxrRecord]:
        out = []
        for r in self.records:
            if r.split in splits and r.dicom_id in self.selected_pa_ap_earliest:
                if r.impression:
                    out.append(r)
                else:
                    self.skipped.append(Skipped(r.dicom_id, r.subject_id, r.study_id, NO_IMPRESSION,
                                                f"{use}: the report has no IMPRESSION section"))
        return out

    def skipped_counts(self) -> collections.Counter:
        return collections.Counter(s.reason for s in self.skipped)

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "images_listed": self.listed,
            "records": len(self.records),
            "records_per_split": dict(collections.Counter(r.split for r in self.records)),
            "selected_pa_ap_earliest": len(self.selected_pa_ap_earliest),
            "stage1": len(self.stage1),
            "stage2": len(self.stage2),
            "evaluation": len(self.evaluation),
            "skipped": dict(sorted(self.skipped_counts().items())),
        } | self.list_report()

    def write_skipped(self, path) -> Path:
        """skipped.jsonl: one {dicom_id, subject_id, study_id, reason, detail} per line. A
        directory gets a skipped.jsonl inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "skipped.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for s in self.skipped:
                f.write(json.dumps(dataclasses.asdict(s)) + "\n")
        return path


def stage_records(corpus: MimicCxrCorpus, stage: int) -> list[CxrRecord]:
    """Stage 1: every train image whose report has findings or impression. Stage 2: train PA/AP
    images of each subject's earliest PA/AP study whose report has an impression."""
    if stage == 1:
        return corpus.stage1
    if stage == 2:
        return corpus.stage2
    raise UsageError(f"stage must be 1 or 2, got {stage!r}")


def evaluation_records(corpus: MimicCxrCorpus) -> list[CxrRecord]:
    """validate + test PA/AP images of each subject's earliest PA/AP study, impression present:
    LLM-CXR's selected-pa-ap-earliest-study pickle restricted to those splits, whose released
    eval_dicom_ids.pickle lists 3,530 images of the real corpus. Given that list (load_corpus's
    evaluation_ids), its validate/test PA/AP images with an impression."""
    return corpus.evaluation


def vqa_image_records(corpus: MimicCxrCorpus, splits=("train",)) -> list[CxrRecord]:
    """The images LLM-CXR pairs with VQA questions: PA/AP images of the earliest PA/AP study in
    `splits`, whether or not the report has an impression (the questions are the text)."""
    return [r for r in corpus.records if r.split in splits and r.dicom_id in corpus.selected_pa_ap_earliest]


# ----------------------------------------------------------------------------- loading

def _image_error(path: str) -> str | None:
    try:
        images.load_image(path, 32, 1)
    except images.ImageError as e:
        return str(e)
    return None


def _read_reports(reports_files: Path, studies, progress: bool) -> dict:
    """(subject, study) -> (findings, impression, reason, detail); each report read once."""
    out = {}
    for subject, study in tqdm(studies, desc="reading reports", unit="report", file=sys.stderr,
                               disable=not progress, mininterval=2.0):
        path = report_path(reports_files, subject, study)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            out[(subject, study)] = (None, None, MISSING_REPORT, str(path))
            continue
        except OSError as e:
            out[(subject, study)] = (None, None, UNREADABLE_REPORT, f"{path}: {e}")
            continue
        findings, impression = parse_report(text)
        reason = NO_SECTIONS if findings is None and impression is None else ""
        out[(subject, study)] = (findings, impression, reason, str(path) if reason else "")
    return out


def load_corpus(root, *, reports_root=None, check_images: bool = False, progress: bool = True,
                image_threads: int = 4, pa_ap_earliest=None, evaluation_ids=None) -> MimicCxrCorpus:
    """Reads ROOT's split and metadata CSVs (.csv or .csv.gz), each study's report (once) and
    checks each image file exists (decodes it too with check_images). `reports_root` is the
    unzipped mimic-cxr-reports root (files/pXX/... under it); default ROOT/reports.
    pa_ap_earliest: dicom ids that replace the selection rebuilt from the metadata (the keys of
    LLM-CXR's shipped selected-pa-ap-earlist-study pickle); evaluation_ids: the evaluation images
    (its eval_dicom_ids.pickle) instead of that selection over validate + test. Ids the corpus
    lacks are counted in summary() (list_report), not dropped silently."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise MissingInputError(f"MIMIC-CXR-JPG root {root} is not a directory; {PHYSIONET_HINT}")
    split_csv, meta_csv = find_csv(root, SPLIT_CSV), find_csv(root, METADATA_CSV)
    reports_files = (Path(reports_root).expanduser().resolve() if reports_root else root / "reports") / "files"
    if not reports_files.is_dir():
        raise MissingInputError(f"report folder {reports_files} not found; unzip mimic-cxr-reports.zip "
                                "(physionet.org/content/mimic-cxr/2.0.0) so files/pXX/... lies under "
                                "ROOT/reports, or pass reports_root")
    skipped: list[Skipped] = []
    split_rows: dict[str, tuple[str, str, str]] = {}
    for dicom, study, subject, split in csv_rows(split_csv, ("dicom_id", "study_id", "subject_id", "split")):
        if dicom in split_rows:
            skipped.append(Skipped(dicom, subject, study, DUPLICATE, f"listed twice in {split_csv.name}"))
        else:
            split_rows[dicom] = (subject, study, split)
    meta: dict[str, tuple[str, str, str]] = {}
    columns = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
    for dicom, subject, study, view, date, time in csv_rows(meta_csv, columns):
        if dicom not in split_rows:
            skipped.append(Skipped(dicom, subject, study, NOT_IN_SPLIT, f"absent from {split_csv.name}"))
        meta.setdefault(dicom, (view, date, time))

    rows = []   # (dicom, subject, study, view, date, time, split) of images both CSVs know
    for dicom, (subject, study, split) in split_rows.items():
        if split not in SPLITS:
            skipped.append(Skipped(dicom, subject, study, UNKNOWN_SPLIT, f"split {split!r} in {split_csv.name}"))
        elif dicom not in meta:
            skipped.append(Skipped(dicom, subject, study, NOT_IN_METADATA, f"absent from {meta_csv.name}"))
        else:
            rows.append((dicom, subject, study, *meta[dicom], split))
    selected = (frozenset(pa_ap_earliest) if pa_ap_earliest is not None
                else earliest_frontal([r[:6] for r in rows]))
    split_ids: dict[str, list[str]] = collections.defaultdict(list)
    for dicom, (_, _, split) in split_rows.items():
        split_ids[split].append(dicom)

    reports = _read_reports(reports_files, sorted({(r[1], r[2]) for r in rows}), progress)
    records = []
    for dicom, subject, study, view, date, time, split in tqdm(
            rows, desc="finding images", unit="image", file=sys.stderr, disable=not progress, mininterval=2.0):
        findings, impression, reason, detail = reports[(subject, study)]
        path = image_path(root, subject, study, dicom)
        if reason:
            skipped.append(Skipped(dicom, subject, study, reason, detail))
        elif not os.path.isfile(path):
            skipped.append(Skipped(dicom, subject, study, IMAGE_MISSING, str(path)))
        else:
            records.append(CxrRecord(dicom, subject, study, split, view, date, time, str(path),
                                     findings, impression))
    if check_images:
        with concurrent.futures.ThreadPoolExecutor(max_workers=image_threads) as pool:
            errors = list(tqdm(pool.map(_image_error, [r.image_path for r in records]), total=len(records),
                               desc="decoding images", unit="image", file=sys.stderr,
                               disable=not progress, mininterval=2.0))
        skipped += [Skipped(r.dicom_id, r.subject_id, r.study_id, UNREADABLE_IMAGE, e)
                    for r, e in zip(records, errors) if e]
        records = [r for r, e in zip(records, errors) if not e]
    return MimicCxrCorpus(root, reports_files, len(split_rows), records, skipped, selected,
                          split_ids={k: tuple(sorted(v)) for k, v in split_ids.items()},
                          given_selection=pa_ap_earliest is not None,
                          evaluation_ids=None if evaluation_ids is None else frozenset(evaluation_ids))
